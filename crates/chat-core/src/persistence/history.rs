//! A conversation's recent turns, for the next turn's model request.
//!
//! Two sources, read in parallel and merged by `turn_id`:
//! - DynamoDB (what db-writer has written);
//! - the recent-turns buffer in Redis: chat-stream appends each completed
//!   turn there before its invocation ends, so the next turn sees it even
//!   while the turn is still in the queue.
//!
//! Consistency: a completed turn is always in at least one of the two when
//! the invocation that produced it ends. The buffer keeps the last
//! `max_turns` turns of a conversation for `buffer_ttl` (default a day,
//! far longer than the queue's normal delay); when the buffer write fails
//! (Redis down or absent), the producer writes the turn to DynamoDB
//! directly before the invocation ends instead of leaving it to the queue
//! (see [`crate::persist`]). The one gap: Redis losing its data while
//! turns wait in a backed-up queue; those turns reappear when db-writer
//! writes them.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::persistence::store::{Store, StoredTurn};
use crate::persistence::turn::{TurnRecord, TurnStatus};
use crate::provider::{Message, Role};
use crate::redis::{RedisLink, tag};

/// Bounds of the history sent to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// At most this many previous turns (each a user message and an answer).
    pub max_turns: u32,
    /// At most about this many tokens of history (4 bytes per token
    /// estimate); the newest turns are kept.
    pub max_tokens: u32,
    /// How long the Redis buffer keeps a conversation's recent turns.
    pub buffer_ttl: Duration,
}

/// One turn in the recent-turns buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferedTurn {
    pub turn_id: String,
    pub started_at_ms: u64,
    pub user_id: String,
    pub user_message: String,
    pub answer: String,
    /// The conversation's first turn: a buffer holding it holds the whole
    /// conversation.
    #[serde(default)]
    pub first: bool,
}

impl BufferedTurn {
    pub fn from_record(r: &TurnRecord, answer: &str, first: bool) -> Self {
        Self {
            turn_id: r.turn_id.clone(),
            started_at_ms: r.started_at_ms,
            user_id: r.user_id.clone(),
            user_message: r.user_message.clone(),
            answer: answer.to_owned(),
            first,
        }
    }
}

/// Whether the buffer alone has everything the history can use: the whole
/// conversation (it still holds the first turn), or at least `max_turns`
/// turns (the newest ones; anything older is beyond the bound anyway).
pub fn buffer_suffices(turns: &[BufferedTurn], max_turns: u32) -> bool {
    !turns.is_empty() && (turns.len() >= max_turns as usize || turns.iter().any(|t| t.first))
}

fn past(t: BufferedTurn) -> PastTurn {
    PastTurn {
        turn_id: t.turn_id,
        started_at_ms: t.started_at_ms,
        user_message: t.user_message,
        answer: t.answer,
    }
}

/// The recent-turns buffer: one Redis list per conversation.
pub struct RecentBuffer {
    redis: Arc<RedisLink>,
    limits: HistoryLimits,
}

/// Buffer reads and writes may take longer than the rate limiter's checks
/// (`REDIS_TIMEOUT_MS`): a missed read can hide the latest turn, and a
/// missed write costs a direct DynamoDB write.
const BUFFER_TIMEOUT: Duration = Duration::from_millis(250);

fn buffer_key(conversation_id: &str) -> String {
    format!("hist:{{{}}}", tag(conversation_id))
}

impl RecentBuffer {
    pub fn new(redis: Arc<RedisLink>, limits: HistoryLimits) -> Self {
        Self { redis, limits }
    }

    /// Appends a completed turn; false when Redis did not take it.
    pub async fn push(&self, conversation_id: &str, turn: &BufferedTurn) -> bool {
        let Ok(json) = serde_json::to_string(turn) else {
            return false;
        };
        let key = buffer_key(conversation_id);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .rpush(&key, json)
            .ignore()
            .ltrim(&key, -(self.limits.max_turns.max(1) as isize), -1)
            .ignore()
            .expire(&key, self.limits.buffer_ttl.as_secs().max(1) as i64)
            .ignore();
        self.redis.pipe::<()>(&pipe, BUFFER_TIMEOUT).await.is_some()
    }

    /// Drops a conversation's buffered turns; false when Redis did not
    /// answer.
    pub async fn forget(&self, conversation_id: &str) -> bool {
        let mut pipe = redis::pipe();
        pipe.del(buffer_key(conversation_id)).ignore();
        self.redis.pipe::<()>(&pipe, BUFFER_TIMEOUT).await.is_some()
    }

    /// The buffered turns, oldest first; `None` when Redis did not answer.
    pub async fn load(&self, conversation_id: &str) -> Option<Vec<BufferedTurn>> {
        let mut pipe = redis::pipe();
        pipe.lrange(buffer_key(conversation_id), 0, -1);
        let (raw,): (Vec<String>,) = self.redis.pipe(&pipe, BUFFER_TIMEOUT).await?;
        Some(
            raw.iter()
                .filter_map(|s| serde_json::from_str(s).ok())
                .collect(),
        )
    }
}

/// Why history could not be loaded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HistoryError {
    /// Unknown, or someone else's: the same answer for both.
    #[error("conversation not found")]
    NotFound,
    #[error("conversation history is unavailable: {0}")]
    Unavailable(String),
}

/// A previous turn, from either source.
#[derive(Debug, Clone, PartialEq)]
pub struct PastTurn {
    pub turn_id: String,
    pub started_at_ms: u64,
    pub user_message: String,
    pub answer: String,
}

/// The newest turns that fit the bounds, oldest first.
pub fn select(mut turns: Vec<PastTurn>, limits: &HistoryLimits) -> Vec<PastTurn> {
    turns.sort_by(|a, b| (a.started_at_ms, &a.turn_id).cmp(&(b.started_at_ms, &b.turn_id)));
    turns.dedup_by(|a, b| a.turn_id == b.turn_id);
    let budget = u64::from(limits.max_tokens) * 4;
    let mut used = 0u64;
    let mut keep = 0usize;
    for t in turns.iter().rev() {
        let cost = (t.user_message.len() + t.answer.len()) as u64;
        if keep as u32 >= limits.max_turns || used + cost > budget {
            break;
        }
        used += cost;
        keep += 1;
    }
    turns.split_off(turns.len() - keep)
}

/// The messages to send before the new user message.
pub fn to_messages(turns: &[PastTurn]) -> Vec<Message> {
    let mut out = Vec::with_capacity(turns.len() * 2);
    for t in turns {
        out.push(Message {
            role: Role::User,
            content: t.user_message.clone(),
        });
        out.push(Message {
            role: Role::Assistant,
            content: t.answer.clone(),
        });
    }
    out
}

fn usable(t: &StoredTurn) -> Option<PastTurn> {
    // Interrupted and failed turns are kept for the record, not replayed:
    // a half answer would mislead the model. Claim-checked answers (over
    // 300 KB, far beyond any history budget) are not loaded here.
    (t.status == TurnStatus::Completed && t.answer_loaded() && !t.answer.is_empty()).then(|| {
        PastTurn {
            turn_id: t.turn_id.clone(),
            started_at_ms: t.started_at_ms,
            user_message: t.user_message.clone(),
            answer: t.answer.clone(),
        }
    })
}

/// Loads a conversation's history for `caller`. The buffer is asked first
/// (one Redis round trip); when it holds all the history can use (see
/// [`buffer_suffices`]), DynamoDB is not asked at all, so a conversation in
/// progress costs no table read before the model is called. Otherwise the
/// conversation and its recent turns come from DynamoDB, in parallel, and
/// are merged with what the buffer has.
pub async fn load(
    store: &Store,
    buffer: Option<&RecentBuffer>,
    conversation_id: &str,
    caller: &str,
    limits: &HistoryLimits,
) -> Result<Vec<PastTurn>, HistoryError> {
    let buffered = match buffer {
        Some(b) => b.load(conversation_id).await,
        None => None,
    };
    if let Some(turns) = &buffered {
        if buffer_suffices(turns, limits.max_turns) {
            // Entries are written by chat-stream for the authenticated
            // owner only, so the first one names the owner.
            if turns.first().map(|t| t.user_id.as_str()) != Some(caller) {
                return Err(HistoryError::NotFound);
            }
            let turns = buffered.into_iter().flatten().map(past).collect();
            return Ok(select(turns, limits));
        }
    }
    let (meta, stored) = tokio::join!(
        store.get_conversation(conversation_id),
        store.recent_turns(conversation_id, limits.max_turns)
    );
    let buffer_failed = buffer.is_some() && buffered.is_none();
    let buffered = buffered.unwrap_or_default();
    let owner = match &meta {
        Ok(Some(m)) => Some(m.owner.as_str()),
        // Not written yet and the buffer did not answer: the conversation
        // may well exist; do not call it unknown.
        Ok(None) if buffer_failed => {
            return Err(HistoryError::Unavailable(
                "recent-turns buffer unavailable".into(),
            ));
        }
        Ok(None) => buffered.first().map(|t| t.user_id.as_str()),
        Err(e) => match buffered.first() {
            // The table is failing but the buffer knows the conversation:
            // answer from the buffer rather than fail the chat.
            Some(t) => {
                tracing::warn!(error = %e, "history from the buffer only: DynamoDB failed");
                Some(t.user_id.as_str())
            }
            None => return Err(HistoryError::Unavailable(e.to_string())),
        },
    };
    if owner != Some(caller) {
        return Err(HistoryError::NotFound);
    }
    let mut turns: Vec<PastTurn> = match stored {
        Ok(t) => t.iter().filter_map(usable).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "stored turns unavailable; using the buffer");
            Vec::new()
        }
    };
    turns.extend(
        buffered
            .into_iter()
            .filter(|t| t.user_id == caller)
            .map(past),
    );
    Ok(select(turns, limits))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, at: u64, len: usize) -> PastTurn {
        PastTurn {
            turn_id: id.into(),
            started_at_ms: at,
            user_message: "q".repeat(len),
            answer: "a".repeat(len),
        }
    }

    fn limits(max_turns: u32, max_tokens: u32) -> HistoryLimits {
        HistoryLimits {
            max_turns,
            max_tokens,
            buffer_ttl: Duration::from_secs(60),
        }
    }

    fn ids(v: &[PastTurn]) -> Vec<&str> {
        v.iter().map(|t| t.turn_id.as_str()).collect()
    }

    #[test]
    fn keeps_the_newest_turns_in_order_without_duplicates() {
        let turns = vec![t("c", 3, 1), t("a", 1, 1), t("b", 2, 1), t("b", 2, 1)];
        assert_eq!(
            ids(&select(turns.clone(), &limits(10, 1000))),
            ["a", "b", "c"]
        );
        assert_eq!(ids(&select(turns, &limits(2, 1000))), ["b", "c"]);
    }

    #[test]
    fn stops_at_the_token_budget() {
        // Each turn costs 2 * 40 bytes = 20 tokens.
        let turns = vec![t("a", 1, 40), t("b", 2, 40), t("c", 3, 40)];
        assert_eq!(ids(&select(turns.clone(), &limits(10, 45))), ["b", "c"]);
        assert_eq!(
            ids(&select(turns.clone(), &limits(10, 19))),
            Vec::<&str>::new()
        );
        // A turn that alone exceeds the budget ends the history there.
        let turns = vec![t("a", 1, 1), t("big", 2, 1000), t("c", 3, 1)];
        assert_eq!(ids(&select(turns, &limits(10, 100))), ["c"]);
    }

    fn b(id: &str, first: bool) -> BufferedTurn {
        BufferedTurn {
            turn_id: id.into(),
            started_at_ms: 1,
            user_id: "u".into(),
            user_message: "q".into(),
            answer: "a".into(),
            first,
        }
    }

    #[test]
    fn the_buffer_suffices_from_the_first_turn_or_with_max_turns() {
        assert!(!buffer_suffices(&[], 3));
        assert!(buffer_suffices(&[b("a", true)], 3));
        assert!(!buffer_suffices(&[b("b", false), b("c", false)], 3));
        assert!(buffer_suffices(
            &[b("b", false), b("c", false), b("d", false)],
            3
        ));
    }

    #[test]
    fn messages_alternate_user_and_assistant() {
        let m = to_messages(&[t("a", 1, 1), t("b", 2, 2)]);
        let roles: Vec<_> = m.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::User, Role::Assistant, Role::User, Role::Assistant]
        );
        assert_eq!(m[3].content, "aa");
    }
}
