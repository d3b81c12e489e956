//! The chat page (`web/`) in a real browser: Playwright (`playwright-core`,
//! tests/web/package-lock.json) drives Debian's chromium against the local
//! stack. This file starts the stack and serves the page from its own
//! origin (so CORS is exercised as deployed); `tests/web/page.test.mjs`
//! is the browser side.
//!
//! Between the page and chat-stream sits a small TCP proxy that, when
//! armed, cuts the connection of the next `POST /chat` after a few
//! hundred bytes of its answer: the page must resume the answer without a
//! second model call.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use e2e::{ChatServer, LocalAws, RedisServer, repo_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes of a cut answer's body (after its headers) the page gets before
/// the connection drops: the `meta` event and a few deltas.
const CUT_AFTER: usize = 420;

/// Forwards connections to `target`; when `armed`, the next connection
/// that carries a `POST /chat` is cut after [`CUT_AFTER`] answer bytes.
async fn proxy(target: SocketAddr, armed: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let armed = armed.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let cut = Arc::new(AtomicBool::new(false));
                let cut_up = cut.clone();
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if buf[..n].starts_with(b"POST /chat ")
                            && armed.swap(false, Ordering::SeqCst)
                        {
                            cut_up.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 16 * 1024];
                // Body bytes of the cut answer sent so far (None: still in
                // its headers).
                let mut body: Option<usize> = None;
                let mut head = Vec::new();
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if cut.load(Ordering::SeqCst) {
                        let mut chunk = &buf[..n];
                        if body.is_none() {
                            head.extend_from_slice(chunk);
                            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                                let _ = cw.write_all(chunk).await;
                                continue;
                            };
                            let in_chunk = end + 4 - (head.len() - chunk.len());
                            let _ = cw.write_all(&chunk[..in_chunk]).await;
                            chunk = &chunk[in_chunk..];
                            body = Some(0);
                        }
                        let sent = body.unwrap_or(0);
                        let room = CUT_AFTER.saturating_sub(sent);
                        let _ = cw.write_all(&chunk[..chunk.len().min(room)]).await;
                        body = Some(sent + chunk.len().min(room));
                        if sent + chunk.len() >= CUT_AFTER {
                            // Drop both sides: the page sees its answer break.
                            break;
                        }
                        continue;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    addr
}

struct Site {
    root: PathBuf,
    config: String,
    armed: Arc<AtomicBool>,
    sim: Arc<model_sim::Sim>,
}

async fn file(State(site): State<Arc<Site>>, Path(name): Path<String>) -> Response {
    let ok = matches!(
        name.as_str(),
        "index.html" | "app.js" | "chat.js" | "auth.js" | "style.css"
    );
    if !ok {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Ok(body) = std::fs::read(site.root.join(&name)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let kind = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        _ => "text/css; charset=utf-8",
    };
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// Serves `web/` (with a `config.js` for this stack) and the test's
/// control routes on `listener`.
fn site(
    listener: TcpListener,
    sim: Arc<model_sim::Sim>,
    api: &str,
    issuer: &str,
    armed: Arc<AtomicBool>,
) {
    let site = Arc::new(Site {
        root: repo_root().join("web"),
        config: format!(
            "window.CHAT_CONFIG = {{api: {api:?}, auth: \"jwt\", issuer: {issuer:?}, clientId: \"chat-web\"}};"
        ),
        armed,
        sim,
    });
    let app = Router::new()
        .route(
            "/",
            get(|State(s): State<Arc<Site>>| async move {
                file(State(s), Path("index.html".to_owned())).await
            }),
        )
        .route(
            "/config.js",
            get(|State(s): State<Arc<Site>>| async move {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    s.config.clone(),
                )
            }),
        )
        .route("/{name}", get(file))
        .route(
            "/control/arm-drop",
            post(|State(s): State<Arc<Site>>| async move {
                s.armed.store(true, Ordering::SeqCst);
                "armed"
            }),
        )
        .route(
            "/control/sim",
            get(|State(s): State<Arc<Site>>| async move {
                axum::Json(serde_json::json!({
                    "calls": s.sim.calls(),
                    "cancelled": s.sim.cancelled(),
                    "completed": s.sim.completed(),
                }))
            }),
        )
        .with_state(site);
    tokio::spawn(async move { axum::serve(listener, app).await });
}

/// The stack, the page on its own origin, and `node --test <file>`.
/// `redis`: with Redis (live streams: resume); without, table only.
async fn browser_run(
    file: &str,
    redis: bool,
    extra: &[(&str, &str)],
    issuer_config: oidc_sim::IssuerConfig,
) {
    let root = repo_root();
    let node_modules = root.join("tests/web/node_modules/playwright-core");
    assert!(
        node_modules.exists(),
        "tests/web/node_modules is missing (make test installs it)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing (make test installs Debian's chromium)"
    );
    let aws = LocalAws::create(&[]).await;
    let redis = if redis {
        Some(RedisServer::start().await)
    } else {
        None
    };
    // 30 tokens at 40 a second: each answer arrives over most of a second.
    let sim = Arc::new(e2e::sim(50, 40.0, 30).await);
    let issuer = oidc_sim::start(([127, 0, 0, 1], 0).into(), issuer_config)
        .await
        .unwrap();
    // The page's origin is known before chat-stream starts (its CORS list).
    let web_listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let web = web_listener.local_addr().unwrap();
    let origin = format!("http://{web}");
    let (sim_url, iss) = (sim.url(), issuer.url());
    let redis_url = redis.as_ref().map(RedisServer::url);
    let mut env = vec![
        ("ANTHROPIC_BASE_URL", sim_url.as_str()),
        ("AUTH_MODE", "jwt"),
        ("JWT_ISSUER", iss.as_str()),
        ("JWT_AUDIENCE", "chat-stream"),
        ("TABLE_NAME", aws.table.as_str()),
        ("CORS_ALLOW_ORIGINS", origin.as_str()),
    ];
    if let Some(u) = &redis_url {
        env.extend([("REDIS_URL", u.as_str()), ("REDIS_TIMEOUT_MS", "1000")]);
    }
    env.extend_from_slice(extra);
    let server = ChatServer::start(&env).await;
    let armed = Arc::new(AtomicBool::new(false));
    let api = format!("http://{}", proxy(server.addr, armed.clone()).await);
    site(web_listener, sim.clone(), &api, &iss, armed);
    let shots = root.join("target/test-artifacts");
    std::fs::create_dir_all(&shots).unwrap();
    let out = tokio::process::Command::new("node")
        .current_dir(root.join("tests/web"))
        .args(["--test", "--test-reporter=spec", file])
        .env("WEB_URL", format!("http://{web}"))
        .env("CHROMIUM", &chromium)
        .env("SCREENSHOT", shots.join("chat-page.png"))
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
}

#[tokio::test]
async fn the_chat_page_in_a_real_browser() {
    browser_run("page.test.mjs", true, &[], Default::default()).await;
}

/// The template's default deployment (no Redis): a cut answer cannot be
/// resumed, so the page reloads the finished turn from history; and a
/// second answer while one streams meets `MAX_STREAMS_PER_USER` (1 here):
/// a 429 whose countdown the page shows.
#[tokio::test]
async fn the_chat_page_without_redis() {
    browser_run(
        "page-no-redis.test.mjs",
        false,
        &[("MAX_STREAMS_PER_USER", "1")],
        Default::default(),
    )
    .await;
}

/// Tokens that expire after 3 s (and no leeway): the page's next request
/// gets `token_expired`, it signs in again, and the conversation that was
/// on screen comes back.
#[tokio::test]
async fn the_chat_page_signs_in_again_when_its_token_expires() {
    let issuer = oidc_sim::IssuerConfig {
        token_ttl: std::time::Duration::from_secs(3),
        ..Default::default()
    };
    browser_run(
        "page-expiry.test.mjs",
        false,
        &[("JWT_LEEWAY_SECS", "0")],
        issuer,
    )
    .await;
}
