//! The producer: makes a finished turn durable after the client has its
//! final event, without the client waiting for it.
//!
//! Durable before the invocation ends: Lambda freezes the environment once
//! the response is complete, so work left running after that may never
//! finish. The relay therefore sends `done` (the client has the whole
//! answer), then keeps the response body open until [`Persister::persist`]
//! has returned, then ends the body. The client sees no delay (the final
//! event was already flushed); the invocation lasts a few ms longer.
//!
//! The path of one turn:
//! 1. In parallel: append it to the recent-turns buffer (Redis) and send
//!    the versioned message to SQS (answers too large for a message go by
//!    claim check, [`crate::persistence::store::Store::put_answer_parts`]).
//! 2. SQS failing after the SDK's retries (bounded by the operation
//!    timeout): write the turn to DynamoDB directly (idempotent, so a
//!    message that did get through is a no-op later).
//! 3. The buffer write failing: write to DynamoDB directly as well, so the
//!    next turn can read it (see [`crate::history`]).
//! 4. Both failing: the record is spooled under `/tmp` (bounded) and sent
//!    again at the start of the environment's next turn; the log says
//!    `turn_lost` with ids and sizes (see [`crate::persistence::spool`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;
use tracing::Instrument;

use crate::persistence::history::{BufferedTurn, RecentBuffer};
use crate::persistence::spool::Spool;
use crate::persistence::store::{Store, WriteOutcome};
use crate::persistence::turn::{SQS_MESSAGE_MAX_BYTES, TurnRecord, TurnStatus};

/// Where a turn went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistPath {
    /// On the queue; db-writer writes it.
    Queued,
    /// Written to the table directly (SQS down, no queue, or the buffer
    /// missed it).
    Direct,
    /// Queued and also written directly (the buffer missed it).
    QueuedAndDirect,
    /// Neither worked: spooled for the next invocation (or, with the spool
    /// full, lost).
    Lost,
}

impl PersistPath {
    pub fn as_str(self) -> &'static str {
        match self {
            PersistPath::Queued => "queued",
            PersistPath::Direct => "direct",
            PersistPath::QueuedAndDirect => "queued+direct",
            PersistPath::Lost => "lost",
        }
    }
}

pub struct Queue {
    pub client: aws_sdk_sqs::Client,
    pub url: String,
}

pub struct Persister {
    store: Arc<Store>,
    queue: Option<Queue>,
    buffer: Option<Arc<RecentBuffer>>,
    /// Sends to SQS that failed in a row (0 after a success).
    queue_failures: AtomicU32,
    queue_used: AtomicBool,
    spool: Spool,
}

impl Persister {
    pub fn new(
        store: Arc<Store>,
        queue: Option<Queue>,
        buffer: Option<Arc<RecentBuffer>>,
        spool: Spool,
    ) -> Self {
        Self {
            store,
            queue,
            buffer,
            queue_failures: AtomicU32::new(0),
            queue_used: AtomicBool::new(false),
            spool,
        }
    }

    /// Sends the turns an earlier invocation could not store. Runs first
    /// in [`persist`](Self::persist), so inside an invocation, after its
    /// client has the final event.
    async fn replay_spool(&self) {
        for (path, rec) in self.spool.take().await {
            let stored = self.enqueue(&rec).await.is_ok() || self.write_direct(&rec).await;
            if stored {
                tracing::info!(turn_id = %rec.turn_id, "spooled turn stored");
                self.spool.done(&path).await;
            } else {
                self.spool.again();
            }
        }
    }

    /// The queue as last seen: `ok`, `failing` (3+ sends in a row failed;
    /// turns go to the table directly), `degraded`, `unknown` (not used
    /// yet) or `off` (no queue: direct writes).
    pub fn queue_health(&self) -> &'static str {
        if self.queue.is_none() {
            return "off";
        }
        match self.queue_failures.load(Ordering::Relaxed) {
            0 if self.queue_used.load(Ordering::Relaxed) => "ok",
            0 => "unknown",
            1..=2 => "degraded",
            _ => "failing",
        }
    }

    /// Makes the turn durable; see the module docs for the order.
    /// `new_conversation`: this turn started the conversation.
    pub async fn persist(&self, rec: TurnRecord, new_conversation: bool) -> PersistPath {
        if self.spool.pending() {
            self.replay_spool().await;
        }
        let started = Instant::now();
        let buffered = async {
            match (&self.buffer, rec.status, &rec.answer) {
                (Some(b), TurnStatus::Completed, Some(answer)) => {
                    b.push(
                        &rec.conversation_id,
                        &BufferedTurn::from_record(&rec, answer, new_conversation),
                    )
                    .await
                }
                // Only completed turns are replayed as history.
                (_, TurnStatus::Interrupted | TurnStatus::Failed | TurnStatus::Stopped, _) => true,
                _ => false,
            }
        };
        let (buffered, queued) = tokio::join!(buffered, self.enqueue(&rec));
        let path = match (queued, buffered) {
            (Ok(()), true) => PersistPath::Queued,
            (Ok(()), false) => {
                if self.write_direct(&rec).await {
                    PersistPath::QueuedAndDirect
                } else {
                    // Queued, so not lost; the next turn may miss it until
                    // db-writer runs.
                    PersistPath::Queued
                }
            }
            (Err(why), _) => {
                tracing::warn!(error = %why, turn_id = %rec.turn_id, "queue unavailable; writing the turn directly");
                if self.write_direct(&rec).await {
                    PersistPath::Direct
                } else {
                    PersistPath::Lost
                }
            }
        };
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if path == PersistPath::Lost {
            self.spool.keep(&rec).await;
        } else {
            tracing::debug!(turn_id = %rec.turn_id, path = path.as_str(), persist_ms = ms, "turn persisted");
        }
        path
    }

    /// Sends the turn to SQS, claim-checking an answer that would not fit
    /// (only then is the record copied).
    async fn enqueue(&self, rec: &TurnRecord) -> Result<(), String> {
        let Some(q) = &self.queue else {
            return Err("no queue configured".into());
        };
        let mut body = rec.encode();
        if body.len() > SQS_MESSAGE_MAX_BYTES {
            let mut reference = rec.clone();
            self.store
                .put_answer_parts(&mut reference)
                .await
                .map_err(|e| e.to_string())?;
            body = reference.encode();
            if body.len() > SQS_MESSAGE_MAX_BYTES {
                return Err("turn too large for a message even without its answer".into());
            }
        }
        let span = tracing::info_span!("queue_send");
        let trace = span.in_scope(crate::obs::outgoing_trace_header);
        let t = Instant::now();
        let mut send = q.client.send_message().queue_url(&q.url).message_body(body);
        if let Some(h) = trace {
            // One trace across chat-stream and db-writer: SQS hands the
            // header to the consumer as the message's AWSTraceHeader.
            send = send.message_system_attributes(
                aws_sdk_sqs::types::MessageSystemAttributeNameForSends::AwsTraceHeader,
                aws_sdk_sqs::types::MessageSystemAttributeValue::builder()
                    .data_type("String")
                    .string_value(h)
                    .build()
                    .map_err(|e| e.to_string())?,
            );
        }
        let sent = send.send().instrument(span).await;
        crate::obs::emf::Metrics::new()
            .dim("outcome", if sent.is_ok() { "ok" } else { "queue_error" })
            .ms("QueueSendTime", crate::util::ms(t.elapsed()))
            .ids()
            .emit();
        self.queue_used.store(true, Ordering::Relaxed);
        match sent {
            Ok(_) => {
                self.queue_failures.store(0, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.queue_failures.fetch_add(1, Ordering::Relaxed);
                Err(format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e)))
            }
        }
    }

    async fn write_direct(&self, rec: &TurnRecord) -> bool {
        match self
            .store
            .write_turns(std::slice::from_ref(rec))
            .await
            .first()
        {
            Some(WriteOutcome::Written | WriteOutcome::Duplicate) => true,
            Some(WriteOutcome::Rejected(why) | WriteOutcome::Failed(why)) => {
                tracing::warn!(error = %why, turn_id = %rec.turn_id, "direct turn write failed");
                false
            }
            None => false,
        }
    }
}
