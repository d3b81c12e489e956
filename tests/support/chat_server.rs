//! chat-stream's router on a real socket, and the one request helper the
//! tests share.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde_json::Value;
use tokio::sync::oneshot;

/// chat-stream's router served in-process on 127.0.0.1:0.
pub struct ChatServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl ChatServer {
    /// `env` overrides the defaults: `ANTHROPIC_BASE_URL` (required) and any
    /// other config variable.
    pub async fn start(env: &[(&str, &str)]) -> ChatServer {
        let mut map: HashMap<String, String> = HashMap::new();
        map.insert("LOG_LEVEL".into(), "warn".into());
        // Tests steer model-sim through model names, so any model is allowed
        // unless a test says otherwise.
        map.insert("MODEL_ALLOWLIST".into(), "*".into());
        // Callers name themselves with x-dev-user unless a test sets
        // AUTH_MODE=api_key.
        map.insert("AUTH_MODE".into(), "dev".into());
        for (k, v) in env {
            map.insert((*k).into(), (*v).into());
        }
        if !map.contains_key("ANTHROPIC_API_KEY_SECRET_ARN")
            && map.contains_key("ANTHROPIC_BASE_URL")
        {
            map.entry("ANTHROPIC_API_KEY".into())
                .or_insert_with(|| "test-key".into());
        }
        let config = chat_core::Config::from_source(&map).expect("test config");
        chat_core::logging::init(config.log_level);
        let origins = config.cors_allow_origins.clone();
        let dev = config.auth == chat_core::auth::AuthMode::Dev;
        let state = chat_core::build_state(config).await.expect("state");
        // As chat-stream's local server mode does.
        let router = chat_core::api::with_local_trace(chat_core::app(state));
        let router = if origins.is_empty() {
            router
        } else {
            router.layer(chat_core::api::local_cors(&origins, dev))
        };
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(chat_core::server::serve(listener, router, async {
            let _ = rx.await;
        }));
        ChatServer {
            addr,
            stop: Some(tx),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for ChatServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl ChatServer {
    /// `POST /chat` with `body`, as `user` (`x-dev-user`, for `AUTH_MODE=dev`)
    /// when given: the one request helper the tests share.
    pub async fn post_chat(&self, user: Option<&str>, body: &Value) -> reqwest::Response {
        let mut req = reqwest::Client::new().post(self.url("/chat")).json(body);
        if let Some(u) = user {
            req = req.header("x-dev-user", u);
        }
        req.send().await.unwrap()
    }
}
