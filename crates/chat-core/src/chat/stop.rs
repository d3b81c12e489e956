//! Stopping an answer on request (`DELETE /chat/streams/{id}`).
//!
//! In Lambda a client that drops its connection does not stop the
//! invocation (it keeps running and is billed), and the stop request
//! usually reaches another environment than the one streaming. So every
//! answer watches for a stop where the fleet can leave one:
//!
//! - in this process (the local server, or a request that lands on the
//!   same environment): a registry of the answers streaming here;
//! - with Redis: the key `stop:{turn_id}`, read every `STOP_POLL_MS`
//!   (100; one GET per answer per interval), set by the stop request
//!   after it checked the owner of the answer's live stream;
//! - without Redis, with the table: the answer's `STREAM#{turn_id}` item
//!   (written when it starts), read every `STOP_POLL_TABLE_MS` (1000; one
//!   eventually consistent GetItem, half a read unit), updated by the stop
//!   request on condition that the caller owns it.
//!
//! A stopped answer ends its model call, is recorded as `stopped` with the
//! text so far, and ends with `done` and `stop_reason: "stopped"`; its
//! followers get the same `done` from its live stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::state::AppState;
use crate::util::now_ms;

/// Where a stop request is looked for (and left).
#[derive(Default)]
pub struct Stops {
    /// Answers streaming in this process: turn id -> (owner, signal).
    here: Mutex<HashMap<String, (String, watch::Sender<bool>)>>,
}

fn stop_key(turn_id: &str) -> String {
    format!("stop:{{{}}}", crate::redis::tag(turn_id))
}

/// What a stop request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// The answer was told to stop.
    Accepted,
    /// No such answer of this caller's (unknown, over, or someone else's).
    NotFound,
    /// Neither Redis nor the table answered.
    Unavailable,
}

impl Stops {
    /// Starts watching for a stop of answer `turn_id` of `owner`; the watch
    /// ends when the returned value is dropped.
    pub fn watch(self: &Arc<Self>, state: &AppState, turn_id: &str, owner: &str) -> StopWatch {
        let (tx, rx) = watch::channel(false);
        self.here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(turn_id.to_owned(), (owner.to_owned(), tx.clone()));
        let poller = poll(state, turn_id, owner, tx);
        StopWatch {
            rx,
            stops: self.clone(),
            turn_id: turn_id.to_owned(),
            poller,
        }
    }

    /// Asks answer `turn_id` of `owner` to stop.
    pub async fn request(&self, state: &AppState, turn_id: &str, owner: &str) -> StopRequest {
        {
            let here = self.here.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((o, tx)) = here.get(turn_id) {
                if o != owner {
                    return StopRequest::NotFound;
                }
                let _ = tx.send(true);
                return StopRequest::Accepted;
            }
        }
        let deps = state.deps();
        if let Some(live) = &deps.live {
            return match live.owner(turn_id).await {
                Ok(Some(o)) if o == owner => {
                    let mut p = redis::pipe();
                    let keep_ms = state.config().timeouts.total.as_millis() as u64 + 60_000;
                    p.cmd("SET")
                        .arg(stop_key(turn_id))
                        .arg(1)
                        .arg("PX")
                        .arg(keep_ms);
                    match live.link().pipe::<((),)>(&p, live.link().timeout()).await {
                        Some(_) => StopRequest::Accepted,
                        None => StopRequest::Unavailable,
                    }
                }
                Ok(_) => StopRequest::NotFound,
                Err(_) => StopRequest::Unavailable,
            };
        }
        if let Some(store) = &deps.store {
            return match store.request_stop(turn_id, owner).await {
                Ok(true) => StopRequest::Accepted,
                Ok(false) => StopRequest::NotFound,
                Err(e) => {
                    tracing::warn!(error = %e, "stop request could not be recorded");
                    StopRequest::Unavailable
                }
            };
        }
        StopRequest::NotFound
    }
}

/// Watches Redis or the table for a stop of this answer; `None` when
/// neither is there (only this process can stop it then).
fn poll(
    state: &AppState,
    turn_id: &str,
    owner: &str,
    tx: watch::Sender<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let deps = state.deps();
    let timeouts = state.config().timeouts;
    let turn_id = turn_id.to_owned();
    if let Some(live) = deps.live.clone() {
        let every = timeouts.stop_poll;
        return Some(tokio::spawn(async move {
            let key = stop_key(&turn_id);
            loop {
                tokio::time::sleep(every).await;
                let mut p = redis::pipe();
                p.cmd("EXISTS").arg(&key);
                let link = live.link();
                if let Some((1,)) = link.pipe::<(i64,)>(&p, link.timeout()).await {
                    let _ = tx.send(true);
                    return;
                }
            }
        }));
    }
    let store = deps.store.clone()?;
    let every = timeouts.stop_poll_table;
    let expires = now_ms() / 1000 + timeouts.total.as_secs() + 60;
    let owner = owner.to_owned();
    Some(tokio::spawn(async move {
        if let Err(e) = store.stream_started(&turn_id, &owner, expires).await {
            tracing::warn!(error = %e, "stream record not written; a stop request from elsewhere will not reach this answer");
            return;
        }
        loop {
            tokio::time::sleep(every).await;
            if let Ok(true) = store.stop_requested(&turn_id).await {
                let _ = tx.send(true);
                return;
            }
        }
    }))
}

/// One answer's watch for a stop request.
pub struct StopWatch {
    rx: watch::Receiver<bool>,
    stops: Arc<Stops>,
    turn_id: String,
    poller: Option<tokio::task::JoinHandle<()>>,
}

impl StopWatch {
    /// Resolves when a stop was asked for (never, if it is not).
    pub async fn stopped(&mut self) {
        if self.rx.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for StopWatch {
    fn drop(&mut self) {
        if let Some(p) = self.poller.take() {
            p.abort();
        }
        self.stops
            .here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.turn_id);
    }
}
