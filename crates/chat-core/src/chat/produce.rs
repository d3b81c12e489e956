//! Between the relay and the client's body: frames go to the body until
//! the client leaves or stops reading; the relay decides what the answer
//! does then.

use bytes::Bytes;

use super::Relay;

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
