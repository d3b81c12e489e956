//! db-writer's logic: one SQS batch of turn messages in, DynamoDB writes and
//! a partial-batch-failure response out; plus the local poller that feeds
//! a queue to the same handler the way Lambda's event source mapping does.
//!
//! Per message:
//! - not JSON, no or unknown schema version, invalid: reported failed, so
//!   SQS redelivers it until `maxReceiveCount` and then moves it to the
//!   DLQ; it never holds back the rest of the batch;
//! - already written (a redelivery): success, nothing changes;
//! - written: success;
//! - DynamoDB failing: reported failed (retried later).

use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use tracing::Instrument;

use crate::persistence::store::{Store, WriteOutcome};
use crate::persistence::turn::TurnRecord;

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    pub received: usize,
    pub written: usize,
    pub duplicates: usize,
    /// Malformed or unknown-version messages (end in the DLQ).
    pub poison: usize,
    /// Valid turns that could not be written (conversation owned by
    /// someone else: permanent; DynamoDB trouble: retried).
    pub failed: usize,
}

/// The span a batch is handled under, in the invocation's trace
/// (`trace_header`: Lambda's; `None` locally).
pub fn batch_span(trace_header: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "batch",
        trace_header = tracing::field::Empty,
        batch_size = tracing::field::Empty,
        failed = tracing::field::Empty,
    );
    if let Some(h) = trace_header {
        span.record("trace_header", h);
    }
    span
}

/// The SQS batch handler. Each message gets a `turn` span in the trace it
/// was sent from (its `AWSTraceHeader`), ended when its write is.
pub async fn handle_batch(store: &Store, event: &SqsEvent) -> (SqsBatchResponse, BatchReport) {
    let calls_before = store.calls();
    let started = Instant::now();
    let mut resp = SqsBatchResponse::default();
    let mut report = BatchReport {
        received: event.records.len(),
        ..BatchReport::default()
    };
    let mut recs = Vec::with_capacity(event.records.len());
    let mut ids = Vec::with_capacity(event.records.len());
    let mut spans = Vec::with_capacity(event.records.len());
    for msg in &event.records {
        let id = msg.message_id.clone().unwrap_or_default();
        let span = tracing::info_span!(
            "turn",
            message_id = %id,
            trace_header = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        if let Some(h) = msg.attributes.get("AWSTraceHeader") {
            span.record("trace_header", h.as_str());
        }
        let decoded = msg.body.as_deref().map(TurnRecord::decode).unwrap_or(Err(
            crate::persistence::turn::PoisonError::NotJson("no body".into()),
        ));
        match decoded {
            Ok(r) => {
                recs.push(r);
                ids.push(id);
                spans.push(span);
            }
            Err(e) => {
                report.poison += 1;
                span.record("outcome", "poison");
                let _in = span.enter();
                tracing::warn!(
                    message_id = %id,
                    receive_count = msg.attributes.get("ApproximateReceiveCount").map(String::as_str),
                    error = %e,
                    "poison message: reported failed (goes to the DLQ after maxReceiveCount)"
                );
                resp.add_failure(id);
            }
        }
    }
    let outcomes = store
        .write_turns(&recs)
        .instrument(tracing::info_span!("write_turns", turns = recs.len()))
        .await;
    for (((id, rec), outcome), span) in ids.into_iter().zip(&recs).zip(outcomes).zip(spans) {
        let _in = span.enter();
        match outcome {
            WriteOutcome::Written => {
                report.written += 1;
                span.record("outcome", "written");
            }
            WriteOutcome::Duplicate => {
                report.duplicates += 1;
                span.record("outcome", "duplicate");
            }
            WriteOutcome::Rejected(why) | WriteOutcome::Failed(why) => {
                report.failed += 1;
                span.record("outcome", "failed");
                tracing::warn!(message_id = %id, turn_id = %rec.turn_id, error = %why, "turn not written");
                resp.add_failure(id);
            }
        }
    }
    let batch = tracing::Span::current();
    batch.record("batch_size", report.received);
    batch.record("failed", report.failed + report.poison);
    crate::obs::emf::Metrics::new()
        .count("BatchSize", report.received as f64)
        .count("TurnsWritten", report.written as f64)
        .count("Duplicates", report.duplicates as f64)
        .count("PoisonMessages", report.poison as f64)
        .count("WriteFailures", report.failed as f64)
        .ms("BatchTime", started.elapsed().as_secs_f64() * 1e3)
        .emit();
    tracing::info!(
        received = report.received,
        written = report.written,
        duplicates = report.duplicates,
        poison = report.poison,
        failed = report.failed,
        dynamodb_calls = store.calls() - calls_before,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "batch"
    );
    (resp, report)
}

/// How the local poller batches, like an event source mapping's
/// `BatchSize` and `MaximumBatchingWindowInSeconds`.
#[derive(Debug, Clone)]
pub struct PollerConfig {
    pub queue_url: String,
    pub batch_size: usize,
    pub batching_window: Duration,
    /// Long-poll wait of the first receive of a batch (0-20 s).
    pub wait: Duration,
}

/// Receives one batch (up to `batch_size`, gathering for at most the
/// batching window), hands it to [`handle_batch`], and deletes what
/// succeeded. Failed messages stay: they come back after the visibility
/// timeout, and SQS moves them to the DLQ after `maxReceiveCount`.
/// Returns `None` when the queue gave nothing.
pub async fn poll_once(
    store: &Store,
    sqs: &aws_sdk_sqs::Client,
    cfg: &PollerConfig,
) -> Result<Option<BatchReport>, String> {
    let mut messages: Vec<aws_sdk_sqs::types::Message> = Vec::new();
    let window_end = Instant::now() + cfg.batching_window;
    loop {
        let want = (cfg.batch_size - messages.len()).min(10) as i32;
        let wait = if messages.is_empty() {
            cfg.wait.as_secs().min(20) as i32
        } else {
            0
        };
        let out = sqs
            .receive_message()
            .queue_url(&cfg.queue_url)
            .max_number_of_messages(want)
            .wait_time_seconds(wait)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .map_err(|e| format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e)))?;
        let got = out.messages().len();
        messages.extend(out.messages().iter().cloned());
        if messages.is_empty() || messages.len() >= cfg.batch_size || Instant::now() >= window_end {
            break;
        }
        if got == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    if messages.is_empty() {
        return Ok(None);
    }
    let mut event = SqsEvent::default();
    for m in &messages {
        let mut e = SqsMessage::default();
        e.message_id = m.message_id().map(str::to_owned);
        e.receipt_handle = m.receipt_handle().map(str::to_owned);
        e.body = m.body().map(str::to_owned);
        e.md5_of_body = m.md5_of_body().map(str::to_owned);
        if let Some(attrs) = m.attributes() {
            e.attributes = attrs
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                .collect();
        }
        e.event_source = Some("aws:sqs".into());
        event.records.push(e);
    }
    let (resp, report) = handle_batch(store, &event)
        .instrument(batch_span(None))
        .await;
    let failed: std::collections::HashSet<&str> = resp
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    let done: Vec<_> = messages
        .iter()
        .filter(|m| !m.message_id().is_some_and(|id| failed.contains(id)))
        .filter_map(|m| Some((m.message_id()?, m.receipt_handle()?)))
        .collect();
    for chunk in done.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .filter_map(|(i, (_, handle))| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(format!("m{i}"))
                    .receipt_handle(*handle)
                    .build()
                    .ok()
            })
            .collect::<Vec<_>>();
        sqs.delete_message_batch()
            .queue_url(&cfg.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| format!("{}", aws_sdk_sqs::error::DisplayErrorContext(&e)))?;
    }
    Ok(Some(report))
}

/// Polls until `shutdown` resolves; errors are logged and retried after a
/// pause (the queue or the table may come back).
pub async fn poll_loop(
    store: &Store,
    sqs: &aws_sdk_sqs::Client,
    cfg: &PollerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = poll_once(store, sqs, cfg) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "poll failed; retrying in 1 s");
                    tokio::select! {
                        _ = &mut shutdown => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}

/// db-writer's configuration: the table, retention, and (outside Lambda)
/// how the local poller batches.
#[derive(Debug, Clone, PartialEq)]
pub struct WriterConfig {
    pub log_level: tracing::Level,
    pub table: String,
    pub retention: Option<Duration>,
    /// `TURN_QUEUE_URL`: polled when not running under Lambda.
    pub queue_url: Option<String>,
    /// `POLL_BATCH_SIZE` (1-1000, default 100): like the event source
    /// mapping's BatchSize.
    pub batch_size: usize,
    /// `POLL_BATCHING_WINDOW_MS` (default 500): like
    /// MaximumBatchingWindowInSeconds.
    pub batching_window: Duration,
}

/// The local poller (outside Lambda): reads `TURN_QUEUE_URL` the way the
/// event source mapping would, until Ctrl-C or SIGTERM.
pub async fn poll_local(
    store: &Store,
    config: &WriterConfig,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(queue_url) = config.queue_url.clone() else {
        return Err(Box::new(crate::error::ConfigError::new(
            "TURN_QUEUE_URL",
            "not set (the queue the local poller reads)",
        )));
    };
    let sdk = crate::aws::aws_sdk_config(Duration::from_secs(25), Duration::from_secs(30)).await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let cfg = PollerConfig {
        queue_url,
        batch_size: config.batch_size,
        batching_window: config.batching_window,
        wait: Duration::from_secs(1),
    };
    tracing::info!(queue = %cfg.queue_url, table = %config.table, "db-writer polling");
    poll_loop(store, &sqs, &cfg, crate::server::shutdown_signal()).await;
    Ok(())
}

/// db-writer's table client, built once at init (with its time in the
/// log, the cold start's share that is ours).
pub async fn build_store(config: &WriterConfig) -> std::sync::Arc<Store> {
    let t = std::time::Instant::now();
    let store = crate::persistence::store::store_for(
        &config.table,
        config.retention,
        crate::persistence::store::StoreRole::Writer,
    )
    .await;
    tracing::info!(
        clients_ms = crate::util::ms(t.elapsed()),
        "db-writer initialised"
    );
    std::sync::Arc::new(store)
}
