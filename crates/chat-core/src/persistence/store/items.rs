//! What is read back: conversation summaries and turns.

use super::{Item, StoreError, get_n, get_s};
use crate::persistence::turn::TurnStatus;

/// A conversation's summary (its `META` item).
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationMeta {
    pub id: String,
    pub owner: String,
    pub title: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub message_count: u64,
}

impl ConversationMeta {
    pub(super) fn from_item(item: &Item) -> Result<Self, StoreError> {
        let pk = get_s(item, "PK").unwrap_or_default();
        let id = pk
            .strip_prefix("CONV#")
            .ok_or_else(|| StoreError::Corrupt(format!("conversation key {pk:?}")))?;
        Ok(Self {
            id: id.to_owned(),
            owner: get_s(item, "owner").unwrap_or_default().to_owned(),
            title: get_s(item, "title").unwrap_or_default().to_owned(),
            created_at_ms: get_n(item, "created_at").unwrap_or(0),
            updated_at_ms: get_n(item, "updated_at").unwrap_or(0),
            message_count: get_n(item, "message_count").unwrap_or(0),
        })
    }
}

/// A turn as stored. `answer` is empty until [`Store::load_parts`] ran for
/// a claim-checked answer (`answer_parts` is set).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTurn {
    pub turn_id: String,
    pub started_at_ms: u64,
    pub completed_at_ms: u64,
    pub status: TurnStatus,
    pub model: String,
    pub user_message: String,
    pub answer: String,
    pub answer_parts: Option<u32>,
    pub answer_bytes: u64,
    pub stop_reason: Option<String>,
    pub input_tokens: u32,
    pub output_tokens: u32,
    pub error_code: Option<String>,
}

impl StoredTurn {
    pub(super) fn from_item(item: &Item) -> Result<Self, StoreError> {
        let turn_id = get_s(item, "turn_id")
            .ok_or_else(|| StoreError::Corrupt("turn without turn_id".into()))?
            .to_owned();
        let status = get_s(item, "status")
            .and_then(TurnStatus::parse)
            .ok_or_else(|| StoreError::Corrupt(format!("turn {turn_id} has no valid status")))?;
        Ok(Self {
            started_at_ms: get_n(item, "started_at").unwrap_or(0),
            completed_at_ms: get_n(item, "completed_at").unwrap_or(0),
            status,
            model: get_s(item, "model").unwrap_or_default().to_owned(),
            user_message: get_s(item, "user_message").unwrap_or_default().to_owned(),
            answer: get_s(item, "answer").unwrap_or_default().to_owned(),
            answer_parts: get_n(item, "answer_parts").map(|v| v as u32),
            answer_bytes: get_n(item, "answer_bytes").unwrap_or(0),
            stop_reason: get_s(item, "stop_reason").map(str::to_owned),
            input_tokens: get_n(item, "input_tokens").unwrap_or(0) as u32,
            output_tokens: get_n(item, "output_tokens").unwrap_or(0) as u32,
            error_code: get_s(item, "error_code").map(str::to_owned),
            turn_id,
        })
    }

    /// Whether the whole answer is in `answer`.
    pub fn answer_loaded(&self) -> bool {
        self.answer_parts.is_none() || self.answer.len() as u64 == self.answer_bytes
    }
}

/// What happened to one turn given to [`Store::write_turns`].
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    Written,
    /// Already stored (a redelivery): nothing changed.
    Duplicate,
    /// Can never be written (e.g. the conversation belongs to someone
    /// else): permanent.
    Rejected(String),
    /// Could not be written now (throttling, network): try again later.
    Failed(String),
}
