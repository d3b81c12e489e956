//! Copies an answer's events into its Redis Stream, off the hot path.

use tokio::sync::mpsc;

use super::Entry;

/// The sending half of a stream's tee; dropping it ends the tee.
pub struct Tee {
    pub(super) tx: Option<mpsc::UnboundedSender<Entry>>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Tee {
    /// Queues one event (never blocks, never fails the answer).
    pub fn send(&self, seq: u64, event: &str, data: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Entry {
                seq,
                event: event.to_owned(),
                data: data.to_owned(),
            });
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
