//! Where a turn goes when neither SQS nor DynamoDB takes it: a bounded
//! spool of files in the environment's `/tmp`, retried at the start of the
//! environment's next turn (or next start in the same environment). By
//! default the log then says only ids and sizes: a turn's text never goes
//! to the logs. `TURN_LOST_LOG_RECORD=true` also logs the whole record, for
//! operators who prefer durability in CloudWatch over privacy.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::persistence::turn::TurnRecord;

/// Spool settings (part of the persistence settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// `TURN_SPOOL_DIR` (default `/tmp/turn-spool`).
    pub dir: PathBuf,
    /// `TURN_SPOOL_MAX_BYTES` (default 64 MiB of Lambda's 512 MB `/tmp`).
    pub max_bytes: u64,
    /// `TURN_LOST_LOG_RECORD` (default false).
    pub log_record: bool,
}

pub struct Spool {
    config: SpoolConfig,
    /// Something may be waiting in the spool.
    pending: AtomicBool,
}

impl Spool {
    /// Notes whether an earlier process of this environment left turns.
    pub fn new(config: SpoolConfig) -> Self {
        let pending = std::fs::read_dir(&config.dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        Self {
            config,
            pending: AtomicBool::new(pending),
        }
    }

    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }

    /// Keeps a turn that could not be stored. `false`: the spool is full
    /// (or `/tmp` failed) and the turn is lost.
    pub async fn keep(&self, rec: &TurnRecord) -> bool {
        let body = rec.encode();
        let c = &self.config;
        let kept = async {
            tokio::fs::create_dir_all(&c.dir).await?;
            let mut used = 0u64;
            let mut dir = tokio::fs::read_dir(&c.dir).await?;
            while let Some(e) = dir.next_entry().await? {
                used += e.metadata().await.map(|m| m.len()).unwrap_or(0);
            }
            if used + body.len() as u64 > c.max_bytes {
                return Ok::<bool, std::io::Error>(false);
            }
            let tmp = c.dir.join(format!(".{}.tmp", rec.turn_id));
            tokio::fs::write(&tmp, &body).await?;
            tokio::fs::rename(&tmp, c.dir.join(format!("{}.json", rec.turn_id))).await?;
            Ok(true)
        }
        .await;
        let kept = kept.unwrap_or_else(|e| {
            tracing::error!(error = %e, "turn spool unusable");
            false
        });
        if kept {
            self.pending.store(true, Ordering::Relaxed);
        }
        if c.log_record {
            tracing::error!(
                turn_id = %rec.turn_id,
                record = %body,
                spooled = kept,
                "turn_lost: neither SQS nor DynamoDB took the turn; replay this record"
            );
        } else {
            tracing::error!(
                turn_id = %rec.turn_id,
                conversation_id = %rec.conversation_id,
                user_message_bytes = rec.user_message.len(),
                answer_bytes = rec.answer_bytes,
                spooled = kept,
                "turn_lost: neither SQS nor DynamoDB took the turn; spooled for the next invocation"
            );
        }
        kept
    }

    /// The spooled turns, with their files; clears `pending` (a turn that
    /// fails again is kept and sets it again).
    pub async fn take(&self) -> Vec<(PathBuf, TurnRecord)> {
        self.pending.store(false, Ordering::Relaxed);
        let mut out = Vec::new();
        let Ok(mut dir) = tokio::fs::read_dir(&self.config.dir).await else {
            return out;
        };
        while let Ok(Some(e)) = dir.next_entry().await {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match tokio::fs::read_to_string(&path).await {
                Ok(body) => match TurnRecord::decode(&body) {
                    Ok(rec) => out.push((path, rec)),
                    Err(why) => {
                        tracing::error!(error = %why, file = %path.display(), "unreadable spooled turn dropped");
                        let _ = tokio::fs::remove_file(&path).await;
                    }
                },
                Err(_) => self.pending.store(true, Ordering::Relaxed),
            }
        }
        out
    }

    /// A spooled turn is stored now.
    pub async fn done(&self, path: &std::path::Path) {
        if tokio::fs::remove_file(path).await.is_err() {
            self.pending.store(true, Ordering::Relaxed);
        }
    }

    /// A spooled turn failed again: it stays.
    pub fn again(&self) {
        self.pending.store(true, Ordering::Relaxed);
    }
}
