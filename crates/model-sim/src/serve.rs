//! The server: accepts connections, counts them, and speaks HTTP/1.1 or
//! HTTP/2 (h2c) on each, whichever the client opens with.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::{SimState, router};

/// Streams one HTTP/2 connection may carry at once. hyper's server default
/// is 200; the benchmarks put 1,000 slow streams on one connection.
const MAX_H2_STREAMS: u32 = 16_384;

/// Serves the sim on `listener` until `shutdown` resolves, counting
/// connections. Each connection speaks HTTP/1.1 or, when the client opens
/// with the HTTP/2 preface (prior knowledge, "h2c"), HTTP/2: the real model
/// APIs speak HTTP/2 over TLS, and a client that multiplexes its streams
/// onto one connection should be measurable against the sim too.
pub async fn serve(
    listener: TcpListener,
    state: Arc<SimState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;

    let app = router(state.clone());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(MAX_H2_STREAMS);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
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
        state.stats.connections.fetch_add(1, Ordering::SeqCst);
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A connection the client dropped mid-answer ends here.
            let _ = conn.await;
        });
    }
    drop(listener);
    // In-flight answers end on their own; a slow one is not waited for.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use crate::{Knobs, Sim, SimConfig};

    async fn ask(client: &reqwest::Client, url: &str, text: &str) -> (reqwest::Version, String) {
        let resp = client
            .post(format!("{url}/v1/messages"))
            .header("x-api-key", "k")
            .header("anthropic-version", "2023-06-01")
            .json(
                &json!({"model": "claude-sonnet-4-5", "max_tokens": 8, "stream": true,
                          "messages": [{"role": "user", "content": text}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        (resp.version(), resp.text().await.unwrap())
    }

    /// One port speaks both: HTTP/1.1, and HTTP/2 to a client that opens
    /// with its preface (h2c), with the same answer; many h2 streams at
    /// once ride one connection (more than hyper's default of 200).
    #[tokio::test]
    async fn serves_http1_and_h2c_on_one_port() {
        let sim = Sim::start(SimConfig::default()).await.unwrap();
        let url = sim.url();
        let h1 = reqwest::Client::new();
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let (v1, body1) = ask(&h1, &url, "same question").await;
        let (v2, body2) = ask(&h2, &url, "same question").await;
        assert_eq!(v1, reqwest::Version::HTTP_11);
        assert_eq!(v2, reqwest::Version::HTTP_2);
        assert!(body1.contains("message_stop"), "{body1}");
        // The same answer (each message has its own id).
        let words = |b: &str| -> Vec<String> {
            b.lines()
                .filter(|l| l.contains("text_delta"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(words(&body1).len(), 8);
        assert_eq!(words(&body1), words(&body2));
        assert_eq!(sim.connections(), 2);

        // 300 answers held at their first token for 3 s: all 300 reach the
        // sim before any ends (hyper's default would have held 100 back).
        let slow = Sim::start(SimConfig {
            knobs: Knobs {
                ttft: Duration::from_secs(3),
                ..Knobs::default()
            },
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let url = slow.url();
        let asks: Vec<_> = (0..300)
            .map(|i| {
                let (h2, url) = (h2.clone(), url.clone());
                tokio::spawn(async move { ask(&h2, &url, &format!("q{i}")).await })
            })
            .collect();
        while slow.calls() < 300 {
            assert_eq!(slow.completed(), 0, "{} of 300 arrived", slow.calls());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(slow.completed(), 0);
        for a in futures_util::future::join_all(asks).await {
            assert_eq!(a.unwrap().0, reqwest::Version::HTTP_2);
        }
        assert_eq!(slow.connections(), 1);
    }
}
