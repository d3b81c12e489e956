//! Copies an answer's events into its Redis Stream, off the hot path.
//!
//! An event's data is the client's frame's own bytes (a [`Bytes`] slice
//! of it, no copy): each event is encoded once. Events wait for the tee's
//! task in a [`crate::pipe`], which grows only as far as events wait.

use bytes::Bytes;

use crate::pipe;

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

/// The sending half of a stream's tee; dropping it ends the tee (the task
/// writes what is queued, then ends).
pub struct Tee {
    pub(super) queue: Option<pipe::Sender<Queued>>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Tee {
    /// Queues one event (never blocks, never fails the answer). `data`
    /// is shared, not copied.
    pub fn send(&self, seq: u64, event: &'static str, data: Bytes) {
        if let Some(q) = &self.queue {
            q.push(Queued { seq, event, data });
        }
    }

    /// Ends the tee and waits until everything queued is in Redis.
    pub async fn flush(&mut self) {
        self.queue = None;
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tee's side of the pipe: a close after events leaves them to
    /// be written first, then the task's loop ends.
    #[tokio::test]
    async fn events_queued_before_the_end_are_still_taken() {
        let (tx, rx) = pipe::pipe::<Queued>(1);
        for seq in 1..=3 {
            tx.push(Queued {
                seq,
                event: "delta",
                data: Bytes::from_static(b"x"),
            });
        }
        drop(tx);
        let mut batch = Vec::new();
        assert!(rx.recv_all(&mut batch).await);
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(!rx.recv_all(&mut batch).await);
    }
}
