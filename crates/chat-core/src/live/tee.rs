//! Copies an answer's events into its Redis Stream, off the hot path.
//!
//! An event's data is the client's frame's own bytes (a [`Bytes`] slice
//! of it, no copy): each event is encoded once.

use bytes::Bytes;
use tokio::sync::mpsc;

/// One event on its way to the stream.
pub(super) struct Queued {
    pub seq: u64,
    pub event: &'static str,
    pub data: Bytes,
}

impl Queued {
    /// See [`super::Entry::is_terminal`].
    pub fn is_terminal(&self) -> bool {
        matches!(self.event, "done" | "error" | "abort" | "gone")
    }
}

/// The sending half of a stream's tee; dropping it ends the tee.
pub struct Tee {
    pub(super) tx: Option<mpsc::UnboundedSender<Queued>>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Tee {
    /// Queues one event (never blocks, never fails the answer). `data`
    /// is shared, not copied.
    pub fn send(&self, seq: u64, event: &'static str, data: Bytes) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Queued { seq, event, data });
        }
    }

    /// Ends the tee and waits until everything queued is in Redis.
    pub async fn flush(&mut self) {
        self.tx = None;
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}
