//! The local HTTP server mode: the same router Lambda runs, on a socket.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// Streams one HTTP/2 client connection may carry at once (hyper's
/// default is 200); the per-user stream limit still applies to each.
pub const MAX_H2_STREAMS: u32 = 4096;

/// Serves `app` on `listener` until `shutdown` resolves, then finishes the
/// requests in flight. Takes the listener (not an address) so tests can bind
/// port 0 and read the port back. Each connection speaks HTTP/1.1 or, when
/// the client opens with the HTTP/2 preface (prior knowledge, "h2c"),
/// HTTP/2: a proxy in front may multiplex many answers on one connection.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's HTTP/1.1 buffers stay at their defaults: a connection's
    // read buffer grows to 16 KiB, but capping it at hyper's smallest
    // setting (8 KiB, which also caps the request head) did not move the
    // peak RSS of 1,000 slow streams measurably.
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, as
                    // axum::serve does, rather than spin or stop.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small SSE frames must leave at once, not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        // The peer's address is the client's (see `api::client_ip`).
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that leaves mid-answer ends its connection here.
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use axum::Router;
    use axum::extract::Request;
    use axum::routing::get;

    /// Both protocols on one port, and the peer's address in every
    /// request's extensions (what `api::client_ip` counts limits by).
    #[tokio::test]
    async fn serves_http1_and_h2c_with_the_peer_address() {
        let app = Router::new().route(
            "/ip",
            get(|req: Request| async move { crate::api::client_ip(req.extensions()) }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = format!("http://{}/ip", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(super::serve(listener, app, async {
            let _ = stopped.await;
        }));
        let h1 = reqwest::Client::new();
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        for (client, version) in [
            (&h1, reqwest::Version::HTTP_11),
            (&h2, reqwest::Version::HTTP_2),
        ] {
            let resp = client.get(&url).send().await.unwrap();
            assert_eq!(resp.version(), version);
            assert_eq!(resp.text().await.unwrap(), "127.0.0.1");
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
