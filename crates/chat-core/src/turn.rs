//! The "turn completed" message: the one schema chat-stream produces and
//! db-writer consumes (through SQS, or directly when SQS is unreachable).
//!
//! Versioned: every message carries `v`. A worker that meets a version it
//! does not know reports the message failed (it ends in the DLQ, where a
//! newer worker can redrive it) instead of guessing.
//!
//! Answers too large for one SQS message travel by claim check: the
//! producer writes the answer's parts to the table itself (see
//! [`crate::store::Store::put_answer_parts`]) and the message carries only
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
}

impl TurnStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TurnStatus::Completed => "completed",
            TurnStatus::Interrupted => "interrupted",
            TurnStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "completed" => Some(TurnStatus::Completed),
            "interrupted" => Some(TurnStatus::Interrupted),
            "failed" => Some(TurnStatus::Failed),
            _ => None,
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
    pub fn encode(&self) -> String {
        // Serialising plain strings and numbers cannot fail; an empty body
        // would be reported as poison by the worker rather than lost silently.
        serde_json::to_string(self).unwrap_or_default()
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
        let rec: TurnRecord =
            serde_json::from_value(value).map_err(|e| PoisonError::Invalid(e.to_string()))?;
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

/// Splits `text` into parts of at most `max` bytes, never inside a UTF-8
/// character.
pub fn split_utf8(text: &str, max: usize) -> Vec<&str> {
    let max = max.max(4);
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len().min(max);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (a, b) = rest.split_at(cut);
        parts.push(a);
        rest = b;
    }
    parts
}

/// `YYYY-MM-DD` (UTC) of a Unix time in ms: the usage record's day.
pub fn utc_day(ms: u64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let days = (ms / 86_400_000) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// RFC 3339 UTC timestamp with milliseconds, e.g. `2023-11-14T22:13:20.000Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        utc_day(ms),
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms % 1000
    )
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

    #[test]
    fn split_keeps_characters_whole_and_loses_nothing() {
        let text = "aé😀".repeat(1000);
        for max in [4, 5, 7, 100, 4096] {
            let parts = split_utf8(&text, max);
            assert!(parts.iter().all(|p| p.len() <= max && !p.is_empty()));
            assert_eq!(parts.concat(), text);
        }
        assert!(split_utf8("", 10).is_empty());
    }

    #[test]
    fn utc_day_matches_known_dates() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(utc_day(1_700_000_000_000), "2023-11-14");
        assert_eq!(utc_day(1_709_251_199_999), "2024-02-29");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
