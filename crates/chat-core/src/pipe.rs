//! A one-sender, one-receiver queue between two tasks of one answer (the
//! relay and the client's body; the relay and the live-stream tee) whose
//! memory grows only as far as items wait.
//!
//! Not a tokio channel: `tokio::sync::mpsc` allocates a block of 32 slots
//! when the channel is made (1 to 2 KiB per answer here), and an open
//! answer at model speed has one or two items waiting, not 32. With 1,000
//! answers open, the blocks were about 3 MB of the local server's heap.
//! Here the items sit in a `VecDeque` that starts empty; wake-ups go
//! through two `Notify`s (see [`Pipe::wait_for`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::sync::Notify;

/// See the module docs. `bound`: how many items [`Pipe::send`] lets wait
/// before it waits for room ([`Pipe::push`] ignores it).
pub struct Pipe<T> {
    state: Mutex<State<T>>,
    bound: usize,
    /// Wakes the receiver: an item, or the sender gone.
    to_receiver: Notify,
    /// Wakes the sender: room, or the receiver gone.
    to_sender: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    sender_done: bool,
    receiver_gone: bool,
}

impl<T> State<T> {
    /// Moves every waiting item into `batch`; true if there were any.
    fn take_into(&mut self, batch: &mut Vec<T>) -> bool {
        let any = !self.items.is_empty();
        batch.extend(self.items.drain(..));
        any
    }
}

/// The receiver has gone: the item was not queued.
#[derive(Debug, PartialEq, Eq)]
pub struct Gone;

impl<T> Pipe<T> {
    pub fn new(bound: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                sender_done: false,
                receiver_gone: false,
            }),
            bound: bound.max(1),
            to_receiver: Notify::new(),
            to_sender: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` whatever is waiting (the tee: never holds the relay).
    pub fn push(&self, item: T) {
        self.lock().items.push_back(item);
        self.to_receiver.notify_waiters();
    }

    /// Runs `ready` on the state until it gives a result, waiting on
    /// `notify` between tries. The first try registers nothing: an item
    /// or room that is already there costs one lock. A wait registers
    /// before it checks again, so no wake-up is lost in between.
    async fn wait_for<R>(
        &self,
        notify: &Notify,
        mut ready: impl FnMut(&mut State<T>) -> Option<R>,
    ) -> R {
        if let Some(r) = ready(&mut self.lock()) {
            return r;
        }
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = ready(&mut self.lock()) {
                return r;
            }
            notified.await;
        }
    }

    /// Queues `item` once fewer than `bound` items wait; `Err` once the
    /// receiver has gone.
    pub async fn send(&self, item: T) -> Result<(), Gone> {
        let mut item = Some(item);
        let bound = self.bound;
        let sent = self
            .wait_for(&self.to_sender, |s| {
                if s.receiver_gone {
                    Some(Err(Gone))
                } else if s.items.len() < bound {
                    s.items.extend(item.take());
                    Some(Ok(()))
                } else {
                    None
                }
            })
            .await;
        if sent.is_ok() {
            self.to_receiver.notify_waiters();
        }
        sent
    }

    /// Resolves once the receiver has gone.
    pub async fn receiver_gone(&self) {
        self.wait_for(&self.to_sender, |s| s.receiver_gone.then_some(()))
            .await
    }

    /// The next item; `None` once the sender is done and nothing waits.
    pub async fn recv(&self) -> Option<T> {
        let item = self
            .wait_for(&self.to_receiver, |s| match s.items.pop_front() {
                Some(item) => Some(Some(item)),
                None => s.sender_done.then_some(None),
            })
            .await;
        if item.is_some() {
            self.to_sender.notify_waiters();
        }
        item
    }

    /// Moves every waiting item into `batch`, waiting for one if none
    /// does; false once the sender is done and nothing waits.
    pub async fn recv_all(&self, batch: &mut Vec<T>) -> bool {
        let took = self
            .wait_for(&self.to_receiver, |s| {
                if s.take_into(batch) {
                    Some(true)
                } else {
                    s.sender_done.then_some(false)
                }
            })
            .await;
        if took {
            self.to_sender.notify_waiters();
        }
        took
    }

    /// Moves every waiting item into `batch` without waiting; true if it
    /// took any.
    pub fn take_ready(&self, batch: &mut Vec<T>) -> bool {
        let took = self.lock().take_into(batch);
        if took {
            self.to_sender.notify_waiters();
        }
        took
    }

    /// Gathers a burst: lets the runtime's other ready tasks run, turn by
    /// turn, while each turn brings more items (at most [`MAX_TURNS`];
    /// [`IDLE_TURNS`] turns that bring none end it), moving them into
    /// `batch`. Never waits for a later event or a timer: a turn is one
    /// pass of the scheduler's queue. For the writers at the ends of an
    /// answer (the client's body, the live stream's tee): a model that
    /// sends deltas faster than they are written reaches the socket in one
    /// write instead of one write per delta.
    pub async fn gather(&self, batch: &mut Vec<T>) {
        let mut idle = 0;
        for _ in 0..MAX_TURNS {
            YieldOnce(false).await;
            if self.take_ready(batch) {
                idle = 0;
            } else {
                idle += 1;
                if idle == IDLE_TURNS {
                    break;
                }
            }
        }
    }

    /// No more items will come (what waits is still received).
    pub fn sender_done(&self) {
        self.lock().sender_done = true;
        self.to_receiver.notify_waiters();
    }

    /// Nothing more will be received: a waiting or later send fails, and
    /// what waits is dropped.
    pub fn receiver_gone_now(&self) {
        let items = {
            let mut s = self.lock();
            s.receiver_gone = true;
            std::mem::take(&mut s.items)
        };
        drop(items);
        self.to_sender.notify_waiters();
    }
}

/// How many scheduler turns [`Pipe::gather`] takes at most.
pub const MAX_TURNS: usize = 16;
/// How many turns in a row that bring nothing end [`Pipe::gather`]: the
/// model's HTTP/1.1 client hands over one chunk at a time, and a chunk can
/// take a turn or two to pass through it and the relay.
pub const IDLE_TURNS: usize = 3;

/// Pending once, with the task woken at once: tokio puts a task that
/// wakes itself at the back of its run queue (`tokio::task::yield_now`
/// instead waits for the next poll of the I/O driver, which a busy
/// runtime makes only every few dozen tasks).
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Makes a pipe: its sending half marks the sender done when dropped, its
/// receiving half marks the receiver gone.
pub fn pipe<T>(bound: usize) -> (Sender<T>, Receiver<T>) {
    let p = std::sync::Arc::new(Pipe::new(bound));
    (Sender(p.clone()), Receiver(p))
}

/// The sending half of a [`pipe`].
pub struct Sender<T>(std::sync::Arc<Pipe<T>>);

/// The receiving half of a [`pipe`].
pub struct Receiver<T>(std::sync::Arc<Pipe<T>>);

impl<T> std::ops::Deref for Sender<T> {
    type Target = Pipe<T>;
    fn deref(&self) -> &Pipe<T> {
        &self.0
    }
}

impl<T> std::ops::Deref for Receiver<T> {
    type Target = Pipe<T>;
    fn deref(&self) -> &Pipe<T> {
        &self.0
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.0.sender_done();
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.receiver_gone_now();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Items arrive in order; the sender waits at the bound until the
    /// receiver takes one; after the sender is done, what waits is still
    /// received, then `None`.
    #[tokio::test]
    async fn bounded_in_order_and_drained_after_the_sender_is_done() {
        let p = Arc::new(Pipe::new(2));
        p.send(1).await.unwrap();
        p.send(2).await.unwrap();
        let third = {
            let p = p.clone();
            tokio::spawn(async move { p.send(3).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!third.is_finished(), "the third send waits for room");
        assert_eq!(p.recv().await, Some(1));
        third.await.unwrap().unwrap();
        p.sender_done();
        assert_eq!(p.recv().await, Some(2));
        assert_eq!(p.recv().await, Some(3));
        assert_eq!(p.recv().await, None);
    }

    /// A receiver waiting before anything is sent wakes for it; `push`
    /// ignores the bound; `recv_all` takes everything that waits.
    #[tokio::test]
    async fn a_waiting_receiver_wakes_and_recv_all_takes_what_waits() {
        let p = Arc::new(Pipe::new(1));
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.recv().await })
        };
        tokio::task::yield_now().await;
        p.push("a");
        assert_eq!(waiter.await.unwrap(), Some("a"));
        p.push("b");
        p.push("c");
        let mut batch = Vec::new();
        assert!(p.recv_all(&mut batch).await);
        assert_eq!(batch, ["b", "c"]);
        p.sender_done();
        assert!(!p.recv_all(&mut batch).await);
    }

    /// `gather` takes a burst that another task makes one item per turn
    /// of the scheduler (as the relay makes frames from the model's
    /// chunks), and ends on its own when nothing more comes.
    #[tokio::test(flavor = "current_thread")]
    async fn gather_takes_a_burst_and_ends_when_it_stops() {
        let p = Arc::new(Pipe::new(64));
        let receiver = {
            let p = p.clone();
            tokio::spawn(async move {
                let mut batch = Vec::new();
                assert!(p.recv_all(&mut batch).await);
                let woke_with = batch.len();
                p.gather(&mut batch).await;
                (woke_with, batch)
            })
        };
        tokio::task::yield_now().await;
        let burst = {
            let p = p.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    p.push(i);
                    YieldOnce(false).await;
                }
            })
        };
        let (woke_with, batch) = receiver.await.unwrap();
        assert!(woke_with < 10, "woke before the burst was over");
        assert_eq!(batch, (0..10).collect::<Vec<_>>());
        burst.await.unwrap();
        // Nothing more comes: gather returns with nothing (only scheduler
        // turns, no timer).
        let mut more = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), p.gather(&mut more))
            .await
            .unwrap();
        assert!(more.is_empty());
    }

    /// When the receiver goes, a sender waiting for room and any later
    /// send fail, and `receiver_gone` resolves.
    #[tokio::test]
    async fn the_receiver_going_fails_the_sender() {
        let p = Arc::new(Pipe::new(1));
        p.send(1).await.unwrap();
        let blocked = {
            let p = p.clone();
            tokio::spawn(async move { p.send(2).await })
        };
        let watching = {
            let p = p.clone();
            tokio::spawn(async move { p.receiver_gone().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        p.receiver_gone_now();
        assert_eq!(blocked.await.unwrap(), Err(Gone));
        tokio::time::timeout(Duration::from_secs(1), watching)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.send(3).await, Err(Gone));
    }
}
