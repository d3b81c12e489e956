//! The "turn completed" message: the one schema chat-stream produces and
//! db-writer consumes (through SQS, or directly when SQS is unreachable).
//!
//! Versioned: every message carries `v`. A worker that meets a version it
//! does not know reports the message failed (it ends in the DLQ, where a
//! newer worker can redrive it) instead of guessing.
//!
//! Answers too large for one SQS message travel by claim check: the
//! producer writes the answer's parts to the table itself (see
//! [`crate::persistence::store::Store::put_answer_parts`]) and the message carries only
//! `answer_parts`. The size limits are below.

use serde::{Deserialize, Serialize};

/// The schema version this build produces and understands.
pub const TURN_SCHEMA_VERSION: u32 = 1;

/// SQS's message limit (256 KiB). A turn whose encoded message is larger
/// sends its answer by claim check.
pub const SQS_MESSAGE_MAX_BYTES: usize = 256 * 1024;

/// A turn item holds its answer inline while answer and user message
/// together stay under this (DynamoDB's item limit is 400 KB); above it the
/// answer is stored in parts.
pub const ITEM_INLINE_MAX_BYTES: usize = 300 * 1024;

/// One part of a claim-checked answer, well under DynamoDB's 400 KB item
/// limit once keys and attribute names are added.
pub const ANSWER_PART_BYTES: usize = 300 * 1024;

/// How a turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnStatus {
    /// The client got the whole answer and the `done` event.
    Completed,
    /// The client went away before the answer ended; `answer` is what had
    /// been relayed.
    Interrupted,
    /// The model failed after the stream started; `answer` is what had been
    /// relayed, `error_code` says why.
    Failed,
    /// Stopped on request (`DELETE /chat/streams/{id}`); `answer` is what
    /// had been relayed.
    Stopped,
    /// A status this build does not know (a newer producer during a rolling
    /// deploy): stored as sent (see [`TurnRecord::status_raw`]), never
    /// taken for a completed answer.
    #[serde(other)]
    Other,
}

impl TurnStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnStatus::Completed => "completed",
            TurnStatus::Interrupted => "interrupted",
            TurnStatus::Failed => "failed",
            TurnStatus::Stopped => "stopped",
            TurnStatus::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "completed" => Some(TurnStatus::Completed),
            "interrupted" => Some(TurnStatus::Interrupted),
            "failed" => Some(TurnStatus::Failed),
            "stopped" => Some(TurnStatus::Stopped),
            _ => Some(TurnStatus::Other),
        }
    }
}

/// One completed (or interrupted, or failed) turn: the user's message and
/// the answer, with who, when and what it cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    pub v: u32,
    /// Unguessable, unique; the idempotency key of the write.
    pub turn_id: String,
    pub conversation_id: String,
    /// The authenticated owner.
    pub user_id: String,
    /// Milliseconds since the Unix epoch; orders the turns of a conversation.
    pub started_at_ms: u64,
    pub completed_at_ms: u64,
    pub status: TurnStatus,
    /// The status as the producer wrote it, when this build does not know
    /// it (`status` is then `Other`): what the table stores.
    #[serde(skip)]
    pub status_raw: Option<String>,
    /// The model that answered.
    pub model: String,
    pub user_message: String,
    /// The answer, when it travels inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// The number of parts already written to the table (claim check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_parts: Option<u32>,
    /// The answer's length in bytes (either way).
    pub answer_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    pub input_tokens: u32,
    pub output_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
}

/// Why a message cannot be processed, ever: it goes to the DLQ.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PoisonError {
    #[error("message body is not JSON: {0}")]
    NotJson(String),
    #[error("message has no schema version (field v)")]
    NoVersion,
    #[error("schema version {0} is not known to this worker (it knows {TURN_SCHEMA_VERSION})")]
    UnknownVersion(u64),
    #[error("message does not match schema v{TURN_SCHEMA_VERSION}: {0}")]
    Invalid(String),
}

impl TurnRecord {
    /// The status word to store.
    pub fn status_word(&self) -> &str {
        self.status_raw.as_deref().unwrap_or(self.status.as_str())
    }

    pub fn encode(&self) -> String {
        // Serialising plain strings and numbers cannot fail; an empty body
        // would be reported as poison by the worker rather than lost silently.
        match &self.status_raw {
            None => serde_json::to_string(self).unwrap_or_default(),
            // A newer producer's status word travels on as it was written
            // (found by the sqs_turn fuzz target: it became "other").
            Some(raw) => {
                let mut v = serde_json::to_value(self).unwrap_or_default();
                v["status"] = serde_json::Value::String(raw.clone());
                v.to_string()
            }
        }
    }

    /// Parses and checks a message body. Every error is permanent.
    pub fn decode(body: &str) -> Result<Self, PoisonError> {
        let value: serde_json::Value =
            serde_json::from_str(body).map_err(|e| PoisonError::NotJson(e.to_string()))?;
        let v = value
            .get("v")
            .and_then(serde_json::Value::as_u64)
            .ok_or(PoisonError::NoVersion)?;
        if v != u64::from(TURN_SCHEMA_VERSION) {
            return Err(PoisonError::UnknownVersion(v));
        }
        // Fields this build does not know are ignored, and a status it does
        // not know is kept as sent: a newer producer's turns are stored, not
        // sent to the DLQ, during a rolling deploy.
        let raw_status = value
            .get("status")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        let mut rec: TurnRecord =
            serde_json::from_value(value).map_err(|e| PoisonError::Invalid(e.to_string()))?;
        if rec.status == TurnStatus::Other {
            rec.status_raw = raw_status.filter(|s| {
                !s.is_empty()
                    && s.len() <= 32
                    && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            });
            if rec.status_raw.is_none() {
                return Err(PoisonError::Invalid("status is not a status word".into()));
            }
        }
        rec.check().map_err(PoisonError::Invalid)?;
        Ok(rec)
    }

    fn check(&self) -> Result<(), String> {
        let id_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'.'))
        };
        if !id_ok(&self.turn_id) {
            return Err("turn_id is empty or has characters outside A-Z a-z 0-9 - _ : .".into());
        }
        if !id_ok(&self.conversation_id) {
            return Err("conversation_id is empty or malformed".into());
        }
        if !id_ok(&self.user_id) {
            return Err("user_id is empty or malformed".into());
        }
        match (&self.answer, self.answer_parts) {
            (Some(_), Some(_)) => Err("answer and answer_parts are both set".into()),
            (None, None) => Err("neither answer nor answer_parts is set".into()),
            (None, Some(0)) => Err("answer_parts is 0".into()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> TurnRecord {
        TurnRecord {
            v: TURN_SCHEMA_VERSION,
            turn_id: "t1".into(),
            conversation_id: "c1".into(),
            user_id: "u1".into(),
            started_at_ms: 1_700_000_000_000,
            completed_at_ms: 1_700_000_001_000,
            status: TurnStatus::Completed,
            status_raw: None,
            model: "m".into(),
            user_message: "hi".into(),
            answer: Some("hello".into()),
            answer_parts: None,
            answer_bytes: 5,
            stop_reason: Some("end_turn".into()),
            input_tokens: 3,
            output_tokens: 2,
            error_code: None,
        }
    }

    #[test]
    fn a_newer_producers_status_and_fields_are_kept_not_poison() {
        let mut v: serde_json::Value = serde_json::from_str(&sample().encode()).unwrap();
        v["status"] = "paused".into();
        v["a_field_from_the_future"] = serde_json::json!({"x": 1});
        let rec = TurnRecord::decode(&v.to_string()).unwrap();
        assert_eq!(rec.status, TurnStatus::Other);
        assert_eq!(rec.status_word(), "paused");
        // Encoded again (spooled, re-sent) it keeps its word (a fuzz find).
        let again = TurnRecord::decode(&rec.encode()).unwrap();
        assert_eq!(again.status_word(), "paused");
        v["status"] = "NOT A STATUS!".into();
        assert!(matches!(
            TurnRecord::decode(&v.to_string()),
            Err(PoisonError::Invalid(_))
        ));
        v["status"] = 5.into();
        assert!(TurnRecord::decode(&v.to_string()).is_err());
    }

    #[test]
    fn round_trips_and_rejects_poison() {
        let r = sample();
        assert_eq!(TurnRecord::decode(&r.encode()), Ok(r.clone()));
        assert!(matches!(
            TurnRecord::decode("{not json"),
            Err(PoisonError::NotJson(_))
        ));
        assert_eq!(
            TurnRecord::decode(r#"{"turn_id":"x"}"#),
            Err(PoisonError::NoVersion)
        );
        let mut v2: serde_json::Value = serde_json::from_str(&r.encode()).unwrap();
        v2["v"] = 2.into();
        assert_eq!(
            TurnRecord::decode(&v2.to_string()),
            Err(PoisonError::UnknownVersion(2))
        );
        let mut both = r.clone();
        both.answer_parts = Some(2);
        assert!(matches!(
            TurnRecord::decode(&both.encode()),
            Err(PoisonError::Invalid(_))
        ));
        let mut bad_id = r;
        bad_id.conversation_id = "a/b".into();
        assert!(matches!(
            TurnRecord::decode(&bad_id.encode()),
            Err(PoisonError::Invalid(_))
        ));
    }
}
