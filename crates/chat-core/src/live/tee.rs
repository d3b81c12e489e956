//! Copies an answer's events into its Redis Stream, off the hot path.
//!
//! An event's data is the client's frame's own bytes (a [`Bytes`] slice
//! of it, no copy): each event is encoded once. The queue between the
//! relay and the tee's task is a plain `VecDeque` that grows only as far
//! as events wait (one or two at model speeds), not a channel: a tokio
//! channel allocates a block of 32 slots up front, 2 KiB per answer that
//! 1,000 open answers paid for nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::Notify;

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

/// The events waiting for the tee's task, and whether more may come.
#[derive(Default)]
pub(super) struct Queue {
    state: Mutex<(VecDeque<Queued>, bool)>,
    ready: Notify,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, (VecDeque<Queued>, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, q: Queued) {
        self.lock().0.push_back(q);
        // Stores a permit when the task is not waiting: never lost.
        self.ready.notify_one();
    }

    fn close(&self) {
        self.lock().1 = true;
        self.ready.notify_one();
    }

    /// Waits until events are queued or the sender is gone, and moves the
    /// queued events into `batch`; false once closed and empty.
    pub(super) async fn next_batch(&self, batch: &mut Vec<Queued>) -> bool {
        loop {
            {
                let mut s = self.lock();
                if !s.0.is_empty() {
                    batch.extend(s.0.drain(..));
                    return true;
                }
                if s.1 {
                    return false;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// The sending half of a stream's tee; dropping it ends the tee.
pub struct Tee {
    pub(super) queue: Arc<Queue>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Tee {
    /// Queues one event (never blocks, never fails the answer). `data`
    /// is shared, not copied.
    pub fn send(&self, seq: u64, event: &'static str, data: Bytes) {
        self.queue.push(Queued { seq, event, data });
    }

    /// Ends the tee and waits until everything queued is in Redis.
    pub async fn flush(&mut self) {
        self.queue.close();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // The task writes what is queued, then ends.
        self.queue.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, event: &'static str) -> Queued {
        Queued {
            seq,
            event,
            data: Bytes::from_static(b"x"),
        }
    }

    /// Events queued before the task waits are not lost; a close after
    /// events leaves them to be taken first; then the queue says it is
    /// over.
    #[tokio::test]
    async fn a_batch_takes_what_waits_and_close_ends_it_after_the_rest() {
        let q = std::sync::Arc::new(Queue::default());
        q.push(ev(1, "meta"));
        q.push(ev(2, "delta"));
        let mut batch = Vec::new();
        assert!(q.next_batch(&mut batch).await);
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);

        // A waiting task wakes for a push from elsewhere.
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut b = Vec::new();
                let more = q.next_batch(&mut b).await;
                (more, b.len())
            })
        };
        tokio::task::yield_now().await;
        q.push(ev(3, "done"));
        assert_eq!(waiter.await.unwrap(), (true, 1));

        q.push(ev(4, "delta"));
        q.close();
        batch.clear();
        assert!(q.next_batch(&mut batch).await);
        assert_eq!(batch.len(), 1);
        assert!(!q.next_batch(&mut batch).await);
    }
}
