//! Stopping an answer on request (`DELETE /chat/streams/{id}`).
//!
//! In Lambda a client that drops its connection does not stop the
//! invocation (it keeps running and is billed), and the stop request
//! usually reaches another environment than the one streaming. So every
//! answer watches for a stop where the fleet can leave one:
//!
//! - in this process (the local server, or a request that lands on the
//!   same environment): a registry of the answers streaming here;
//! - with Redis: the key `stop:{turn_id}`, set by the stop request after
//!   it checked the owner of the answer's live stream. One task per
//!   process reads the keys of every answer streaming here each
//!   `STOP_POLL_MS` (100): one pipeline of `EXISTS` (in cluster mode, where
//!   the keys are on different slots, one command each, sent together on
//!   the multiplexed connection), not a task and a timer per answer;
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
use std::time::Duration;

use tokio::sync::watch;

use crate::state::AppState;
use crate::util::now_ms;

/// Where a stop request is looked for (and left).
#[derive(Default)]
pub struct Stops {
    /// Answers streaming in this process: turn id -> (owner, signal).
    here: Mutex<HashMap<String, (String, watch::Sender<bool>)>>,
    /// Answers streaming here whose `stop:` key is read in Redis.
    polled: Mutex<Polled>,
}

#[derive(Default)]
struct Polled {
    /// turn id -> signal.
    turns: HashMap<String, watch::Sender<bool>>,
    /// Whether the poller task runs (it ends when no answer is left).
    running: bool,
}

/// Keys per pipeline of the poller.
const POLL_CHUNK: usize = 500;

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
        let poller = match state.deps().live.clone() {
            Some(live) => {
                let mut polled = self.polled.lock().unwrap_or_else(|p| p.into_inner());
                polled.turns.insert(turn_id.to_owned(), tx);
                if !polled.running {
                    polled.running = true;
                    let every = state.config().timeouts.stop_poll;
                    tokio::spawn(poll_redis(self.clone(), live.link().clone(), every));
                }
                None
            }
            None => poll_table(state, turn_id, owner, tx),
        };
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

/// Reads the `stop:` keys of every answer of this process watched in
/// Redis, each `every`, until none is left.
async fn poll_redis(stops: Arc<Stops>, link: Arc<crate::redis::RedisLink>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let turns: Vec<String> = {
            let mut polled = stops.polled.lock().unwrap_or_else(|p| p.into_inner());
            if polled.turns.is_empty() {
                polled.running = false;
                return;
            }
            polled.turns.keys().cloned().collect()
        };
        let found = stopped_in_redis(&link, &turns).await;
        if found.is_empty() {
            continue;
        }
        let mut polled = stops.polled.lock().unwrap_or_else(|p| p.into_inner());
        for turn in found {
            if let Some(tx) = polled.turns.remove(turn) {
                let _ = tx.send(true);
            }
        }
    }
}

/// Which of `turns` have a stop request in Redis (none when Redis does
/// not answer: the next round asks again).
async fn stopped_in_redis<'t>(link: &crate::redis::RedisLink, turns: &'t [String]) -> Vec<&'t str> {
    let mut found = Vec::new();
    if link.is_cluster() {
        let asks = turns.iter().map(|t| async move {
            let mut p = redis::pipe();
            p.cmd("EXISTS").arg(stop_key(t));
            (t, link.pipe::<(i64,)>(&p, link.timeout()).await)
        });
        for (t, seen) in futures_util::future::join_all(asks).await {
            if let Some((1,)) = seen {
                found.push(t.as_str());
            }
        }
        return found;
    }
    for chunk in turns.chunks(POLL_CHUNK) {
        let mut p = redis::pipe();
        for t in chunk {
            p.cmd("EXISTS").arg(stop_key(t));
        }
        if let Some(seen) = link.pipe::<Vec<i64>>(&p, link.timeout()).await {
            found.extend(
                chunk
                    .iter()
                    .zip(seen)
                    .filter(|(_, n)| *n == 1)
                    .map(|(t, _)| t.as_str()),
            );
        }
    }
    found
}

/// Watches the table for a stop of this answer (without Redis); `None`
/// when there is no table either (only this process can stop it then).
fn poll_table(
    state: &AppState,
    turn_id: &str,
    owner: &str,
    tx: watch::Sender<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let deps = state.deps();
    let timeouts = state.config().timeouts;
    let turn_id = turn_id.to_owned();
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
            .polled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .turns
            .remove(&self.turn_id);
        self.stops
            .here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.turn_id);
    }
}
