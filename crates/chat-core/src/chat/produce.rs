//! Between the relay and the client's body: frames go to the body until
//! the client leaves or stops reading; the relay decides what the answer
//! does then. The body writes frames that are ready together.

use std::convert::Infallible;

use axum::body::Body;
use bytes::{Bytes, BytesMut};

use super::Relay;
use crate::pipe::Receiver;

/// Runs the relay and hands its frames to the client's body. When the
/// client leaves: with `finish` (live streams on), the answer runs to its
/// end, so it can be resumed, followed and cached, and the turn is stored
/// complete; without, the relay is dropped, which stops the model call and
/// records the turn as interrupted. A client that stops reading but keeps
/// its socket open counts as gone once one frame has waited
/// `CLIENT_SEND_TIMEOUT_MS`: nothing else bounds a send to the body.
pub(super) async fn produce(mut relay: Relay, tx: crate::pipe::Sender<Bytes>, finish: bool) {
    let send_limit = relay.state.config().timeouts.client_send;
    let mut client = Some(tx);
    loop {
        let (frame, left) = {
            let next = relay.next_frame();
            tokio::pin!(next);
            match &client {
                Some(tx) => tokio::select! {
                    biased;
                    f = &mut next => (f, false),
                    () = tx.receiver_gone() => {
                        if !finish {
                            return;
                        }
                        (next.await, true)
                    }
                },
                None => (next.await, false),
            }
        };
        if left {
            client = None;
            tracing::info!(
                seq = relay.seq,
                "client left; finishing the answer for resume and cache"
            );
        }
        let Some(frame) = frame else { return };
        if let Some(tx) = &client {
            let sent = match tokio::time::timeout(send_limit, tx.send(frame)).await {
                Ok(r) => r.is_ok(),
                Err(_) => {
                    tracing::info!(seq = relay.seq, "client stopped reading; detached");
                    false
                }
            };
            if !sent {
                if !finish {
                    return;
                }
                client = None;
            }
        }
    }
}

/// The client's body: the relay's frames, several to a write when several
/// are ready. The first write takes what is there when the body is first
/// polled (`meta` and the first delta, queued before the response was
/// returned: never held back). After that, a frame that finds the body
/// waiting waits for the burst it belongs to ([`crate::pipe::Pipe::gather`],
/// a few turns of the scheduler, never a timer), and goes out with it.
///
/// Why: the model's HTTP/1.1 client hands the relay one chunk at a time
/// (hyper's body channel holds one), so deltas that arrive in one read
/// from the model reached the client as one `writev` each, and the client
/// read each on its own: the largest single cost of a fast answer in
/// `perf` (a third of chat-stream's CPU under 20 concurrent answers).
pub(super) fn body(rx: Receiver<Bytes>) -> Body {
    struct Frames {
        rx: Receiver<Bytes>,
        batch: Vec<Bytes>,
        opened: bool,
    }
    let frames = Frames {
        rx,
        batch: Vec::new(),
        opened: false,
    };
    Body::from_stream(futures_util::stream::unfold(frames, |mut f| async move {
        if !f.rx.recv_all(&mut f.batch).await {
            return None;
        }
        if f.opened {
            f.rx.gather(&mut f.batch).await;
        }
        f.opened = true;
        Some((Ok::<_, Infallible>(join(&mut f.batch)), f))
    }))
}

/// The frames of `batch` as one buffer (the frame itself when alone).
fn join(batch: &mut Vec<Bytes>) -> Bytes {
    if batch.len() == 1 {
        return batch.pop().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(batch.iter().map(Bytes::len).sum());
    for b in batch.drain(..) {
        out.extend_from_slice(&b);
    }
    out.freeze()
}
