//! DynamoDB: one table for conversations, messages, usage and API keys.
//!
//! Key design (also in README "Data model"):
//!
//! | item | PK | SK | notes |
//! | --- | --- | --- | --- |
//! | conversation | `CONV#{id}` | `META` | owner, title, created_at, updated_at, message_count; `GSI1PK = USER#{owner}`, `GSI1SK = {updated_at:013}#{id}` |
//! | turn (user message + answer) | `CONV#{id}` | `TURN#{started_at:013}#{turn_id}` | in order by start time; `answer` inline, or `answer_parts` |
//! | answer part (claim check) | `CONV#{id}` | `PART#{started_at:013}#{turn_id}#{k:04}` | only for answers over [`ITEM_INLINE_MAX_BYTES`] |
//! | usage per user per day | `USER#{id}` | `USAGE#{YYYY-MM-DD}` | requests, input_tokens, output_tokens (atomic ADD) |
//! | API key | `APIKEY#{sha256 hex}` | `APIKEY` | user_id, label; the key itself is never stored |
//!
//! Access is GetItem, Query, BatchWriteItem and TransactWriteItems only:
//! a user's conversations come from the sparse GSI1 (only conversation
//! items carry its keys), newest first; a conversation's turns from one
//! Query on its partition. Nothing scans.
//!
//! Writes are idempotent: each turn is a conditional Put
//! (`attribute_not_exists`) in the same transaction as the counters it
//! changes, so a redelivered turn cancels its transaction, is recognised
//! by the cancellation reason, and is dropped before the rest is retried:
//! the counters move exactly once per turn.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeValue, Put, PutRequest, TransactWriteItem, Update, WriteRequest,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::turn::{ANSWER_PART_BYTES, ITEM_INLINE_MAX_BYTES, TurnRecord, TurnStatus, split_utf8};

type Item = HashMap<String, AttributeValue>;

/// TransactWriteItems takes at most 100 actions and 4 MB.
const TXN_MAX_ACTIONS: usize = 100;
const TXN_MAX_BYTES: usize = 3_500_000;
/// BatchWriteItem takes at most 25 puts.
const BATCH_WRITE_MAX: usize = 25;
/// Rounds of retry for transactions that were cancelled by a conflict or
/// throttled, and for BatchWriteItem's UnprocessedItems.
const WRITE_ROUNDS: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DynamoDB {op} failed: {message}")]
    Dynamo { op: &'static str, message: String },
    #[error("stored item is malformed: {0}")]
    Corrupt(String),
    #[error("invalid cursor")]
    BadCursor,
}

fn dynamo_err<E: std::fmt::Debug>(op: &'static str, e: E) -> StoreError {
    // The SDK's Display for service errors is terse ("service error");
    // Debug carries the code and message.
    let message = format!("{e:?}");
    let message = message.chars().take(500).collect();
    StoreError::Dynamo { op, message }
}

pub fn conv_pk(id: &str) -> String {
    format!("CONV#{id}")
}
pub const META_SK: &str = "META";
pub fn turn_sk(started_at_ms: u64, turn_id: &str) -> String {
    format!("TURN#{started_at_ms:013}#{turn_id}")
}
pub fn part_sk(started_at_ms: u64, turn_id: &str, k: u32) -> String {
    format!("PART#{started_at_ms:013}#{turn_id}#{k:04}")
}
pub fn user_pk(id: &str) -> String {
    format!("USER#{id}")
}
pub fn usage_sk(day: &str) -> String {
    format!("USAGE#{day}")
}
pub fn cache_pk(key: &str) -> String {
    format!("CACHE#{key}")
}
pub const CACHE_SK: &str = "CACHE";

pub fn api_key_pk(hash_hex: &str) -> String {
    format!("APIKEY#{hash_hex}")
}
pub const GSI1: &str = "GSI1";

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
fn get_s<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}
fn get_n(item: &Item, k: &str) -> Option<u64> {
    item.get(k)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

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
    fn from_item(item: &Item) -> Result<Self, StoreError> {
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
    fn from_item(item: &Item) -> Result<Self, StoreError> {
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

/// A page position, opaque to clients: the LastEvaluatedKey as base64url
/// JSON. Decoding checks it belongs to the partition being read, so a
/// crafted cursor cannot step into someone else's data.
pub fn encode_cursor(key: &Item) -> String {
    let map: serde_json::Map<String, serde_json::Value> = key
        .iter()
        .filter_map(|(k, v)| v.as_s().ok().map(|s| (k.clone(), s.clone().into())))
        .collect();
    URL_SAFE_NO_PAD.encode(serde_json::Value::Object(map).to_string())
}

/// `partition` is the (attribute, value) the cursor must carry; `sort`
/// names the other key attributes it may carry.
pub fn decode_cursor(
    cursor: &str,
    partition: (&str, &str),
    others: &[&str],
) -> Result<Item, StoreError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor.trim())
        .map_err(|_| StoreError::BadCursor)?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|_| StoreError::BadCursor)?;
    let mut out = Item::new();
    for (k, v) in map {
        let ok = k == partition.0 || others.contains(&k.as_str());
        let serde_json::Value::String(v) = v else {
            return Err(StoreError::BadCursor);
        };
        if !ok {
            return Err(StoreError::BadCursor);
        }
        out.insert(k, s(v));
    }
    if out
        .get(partition.0)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
        != Some(partition.1)
        || out.len() != others.len() + 1
    {
        return Err(StoreError::BadCursor);
    }
    Ok(out)
}

/// The table and the client that reaches it. Counts its calls, so the
/// benchmarks can report DynamoDB calls per turn.
pub struct Store {
    client: Client,
    table: String,
    /// Retention: items get `expires_at` this far in the future (TTL).
    retention: Option<Duration>,
    calls: AtomicU64,
}

#[derive(Clone, Copy)]
enum Action {
    Turn(usize),
    Meta(usize),
    Usage,
}

/// (user, day).
type UserDay = (String, String);
/// (requests, input tokens, output tokens).
type Counts = (u64, u64, u64);

/// One transaction being built: the turns in it (indexes into the input),
/// and the counter updates they add up to.
#[derive(Default)]
struct Txn {
    turns: Vec<usize>,
    convs: Vec<(String, Vec<usize>)>,
    usage: Vec<(UserDay, Counts)>,
    bytes: usize,
}

impl Txn {
    fn actions(&self) -> usize {
        self.turns.len() + self.convs.len() + self.usage.len()
    }
}

impl Store {
    pub fn new(client: Client, table: impl Into<String>, retention: Option<Duration>) -> Self {
        Self {
            client,
            table: table.into(),
            retention,
            calls: AtomicU64::new(0),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// DynamoDB calls made so far by this store.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    fn expires_at(&self, from_ms: u64) -> Option<u64> {
        self.retention.map(|r| from_ms / 1000 + r.as_secs())
    }

    /// A cheap read that proves the table answers (GetItem of a key that
    /// never exists; needs no extra permission).
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.get_item("HEALTH".into(), "HEALTH").await.map(|_| ())
    }

    /// One GetItem by key.
    async fn get_item(&self, pk: String, sk: &str) -> Result<Option<Item>, StoreError> {
        self.count();
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(pk))
            .key("SK", s(sk))
            .send()
            .await
            .map_err(|e| dynamo_err("GetItem", e))?;
        Ok(out.item)
    }

    /// A cached answer (the `CACHE#{key}` item): its JSON and when it
    /// expires (epoch seconds).
    pub async fn cache_get(&self, key: &str) -> Result<Option<(String, u64)>, StoreError> {
        let item = self.get_item(cache_pk(key), CACHE_SK).await?;
        Ok(item.and_then(|item| {
            let answer = get_s(&item, "answer")?.to_owned();
            Some((answer, get_n(&item, "expires_at").unwrap_or(0)))
        }))
    }

    /// Stores a cached answer until `expires_at` (epoch seconds; DynamoDB
    /// TTL deletes it some time after, so readers check it themselves).
    pub async fn cache_put(
        &self,
        key: &str,
        answer_json: String,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        self.count();
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(cache_pk(key)))
            .item("SK", s(CACHE_SK))
            .item("answer", s(answer_json))
            .item("expires_at", n(expires_at))
            .send()
            .await
            .map_err(|e| dynamo_err("PutItem", e))?;
        Ok(())
    }

    pub async fn get_conversation(&self, id: &str) -> Result<Option<ConversationMeta>, StoreError> {
        self.get_item(conv_pk(id), META_SK)
            .await?
            .as_ref()
            .map(ConversationMeta::from_item)
            .transpose()
    }

    /// One Query of a conversation's items whose sort key starts with
    /// `prefix`, in `forward` order, from `start`: the items and where the
    /// next page starts.
    async fn query_prefix(
        &self,
        id: &str,
        prefix: &str,
        forward: bool,
        limit: Option<u32>,
        start: Option<Item>,
    ) -> Result<(Vec<Item>, Option<Item>), StoreError> {
        self.count();
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk AND begins_with(SK, :p)")
            .expression_attribute_values(":pk", s(conv_pk(id)))
            .expression_attribute_values(":p", s(prefix))
            .scan_index_forward(forward)
            .set_limit(limit.map(|l| l.max(1) as i32))
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| dynamo_err("Query", e))?;
        let next = out.last_evaluated_key().cloned();
        Ok((out.items.unwrap_or_default(), next))
    }

    /// The newest `limit` turns, oldest first. Claim-checked answers are
    /// not loaded (see [`Store::load_parts`]).
    pub async fn recent_turns(&self, id: &str, limit: u32) -> Result<Vec<StoredTurn>, StoreError> {
        let (items, _) = self
            .query_prefix(id, "TURN#", false, Some(limit), None)
            .await?;
        let mut turns = items
            .iter()
            .map(StoredTurn::from_item)
            .collect::<Result<Vec<_>, _>>()?;
        turns.reverse();
        Ok(turns)
    }

    /// One page of a conversation's turns, oldest first, with whole answers
    /// (parts loaded in parallel), and the cursor of the next page.
    pub async fn turns_page(
        &self,
        id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<StoredTurn>, Option<String>), StoreError> {
        let start = cursor
            .map(|c| decode_cursor(c, ("PK", &conv_pk(id)), &["SK"]))
            .transpose()?;
        let (items, next) = self
            .query_prefix(id, "TURN#", true, Some(limit), start)
            .await?;
        let mut turns = items
            .iter()
            .map(StoredTurn::from_item)
            .collect::<Result<Vec<_>, _>>()?;
        let loads = turns
            .iter_mut()
            .filter(|t| !t.answer_loaded())
            .map(|t| async { self.load_parts(id, t).await });
        for r in futures_util::future::join_all(loads).await {
            r?;
        }
        Ok((turns, next.as_ref().map(encode_cursor)))
    }

    /// Reads a claim-checked answer's parts (one Query) into `turn.answer`.
    pub async fn load_parts(&self, id: &str, turn: &mut StoredTurn) -> Result<(), StoreError> {
        let Some(parts) = turn.answer_parts else {
            return Ok(());
        };
        let prefix = format!("PART#{:013}#{}#", turn.started_at_ms, turn.turn_id);
        let mut text = String::with_capacity(turn.answer_bytes as usize);
        let mut start: Option<Item> = None;
        let mut seen = 0u32;
        loop {
            let (items, next) = self.query_prefix(id, &prefix, true, None, start).await?;
            for item in &items {
                text.push_str(get_s(item, "text").unwrap_or_default());
                seen += 1;
            }
            match next {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        if seen != parts || text.len() as u64 != turn.answer_bytes {
            return Err(StoreError::Corrupt(format!(
                "turn {} has {seen} of {parts} answer parts ({} of {} bytes)",
                turn.turn_id,
                text.len(),
                turn.answer_bytes
            )));
        }
        turn.answer = text;
        Ok(())
    }

    /// A user's conversations, most recently updated first.
    pub async fn list_conversations(
        &self,
        user: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<ConversationMeta>, Option<String>), StoreError> {
        let pk = user_pk(user);
        let start = cursor
            .map(|c| decode_cursor(c, ("GSI1PK", &pk), &["GSI1SK", "PK", "SK"]))
            .transpose()?;
        self.count();
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(GSI1)
            .key_condition_expression("GSI1PK = :pk")
            .expression_attribute_values(":pk", s(&pk))
            .scan_index_forward(false)
            .limit(limit.max(1) as i32)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| dynamo_err("Query", e))?;
        let convs = out
            .items()
            .iter()
            .map(ConversationMeta::from_item)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((convs, out.last_evaluated_key().map(encode_cursor)))
    }

    /// The user an API key (by its SHA-256, hex) belongs to, unless it is
    /// unknown or disabled.
    pub async fn lookup_api_key(&self, hash_hex: &str) -> Result<Option<String>, StoreError> {
        let item = self.get_item(api_key_pk(hash_hex), "APIKEY").await?;
        Ok(item.as_ref().and_then(|item| {
            let disabled = item
                .get("disabled")
                .and_then(|v| v.as_bool().ok())
                .copied()
                .unwrap_or(false);
            (!disabled)
                .then(|| get_s(item, "user_id").map(str::to_owned))
                .flatten()
        }))
    }

    pub async fn put_api_key(
        &self,
        hash_hex: &str,
        user: &str,
        label: &str,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.count();
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(api_key_pk(hash_hex)))
            .item("SK", s("APIKEY"))
            .item("type", s("api_key"))
            .item("user_id", s(user))
            .item("label", s(label))
            .item("created_at", n(now_ms))
            .send()
            .await
            .map_err(|e| dynamo_err("PutItem", e))?;
        Ok(())
    }

    /// Usage of one user on one day: (requests, input tokens, output tokens).
    pub async fn usage(&self, user: &str, day: &str) -> Result<(u64, u64, u64), StoreError> {
        let item = self.get_item(user_pk(user), &usage_sk(day)).await?;
        Ok(item
            .as_ref()
            .map(|i| {
                (
                    get_n(i, "requests").unwrap_or(0),
                    get_n(i, "input_tokens").unwrap_or(0),
                    get_n(i, "output_tokens").unwrap_or(0),
                )
            })
            .unwrap_or((0, 0, 0)))
    }

    /// Claim check: writes a turn's answer as parts (idempotent puts, so a
    /// retry rewrites the same items) and leaves only `answer_parts` in the
    /// record.
    pub async fn put_answer_parts(&self, rec: &mut TurnRecord) -> Result<(), StoreError> {
        let Some(answer) = rec.answer.take() else {
            return Ok(());
        };
        let parts = split_utf8(&answer, ANSWER_PART_BYTES);
        let pk = conv_pk(&rec.conversation_id);
        let expires = self.expires_at(rec.started_at_ms);
        let mut requests = Vec::with_capacity(parts.len());
        for (k, text) in parts.iter().enumerate() {
            let mut item = Item::new();
            item.insert("PK".into(), s(&pk));
            item.insert(
                "SK".into(),
                s(part_sk(rec.started_at_ms, &rec.turn_id, k as u32)),
            );
            item.insert("type".into(), s("answer_part"));
            item.insert("text".into(), s(*text));
            if let Some(e) = expires {
                item.insert("expires_at".into(), n(e));
            }
            let put = PutRequest::builder()
                .set_item(Some(item))
                .build()
                .map_err(|e| dynamo_err("BatchWriteItem", e))?;
            requests.push(WriteRequest::builder().put_request(put).build());
        }
        // A part is up to 300 KB and a BatchWriteItem takes 16 MB: a batch
        // of up to 25 fits.
        if let Err(e) = self.batch_write(requests).await {
            rec.answer = Some(answer);
            return Err(e);
        }
        rec.answer_bytes = answer.len() as u64;
        rec.answer_parts = Some(parts.len() as u32);
        Ok(())
    }

    /// BatchWriteItem in chunks of 25, retrying UnprocessedItems with
    /// backoff.
    async fn batch_write(&self, requests: Vec<WriteRequest>) -> Result<(), StoreError> {
        for chunk in requests.chunks(BATCH_WRITE_MAX) {
            let mut pending = chunk.to_vec();
            let mut round = 0;
            while !pending.is_empty() {
                if round == WRITE_ROUNDS {
                    return Err(StoreError::Dynamo {
                        op: "BatchWriteItem",
                        message: format!("{} items still unprocessed", pending.len()),
                    });
                }
                if round > 0 {
                    tokio::time::sleep(backoff(round)).await;
                }
                round += 1;
                self.count();
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, pending)
                    .send()
                    .await
                    .map_err(|e| dynamo_err("BatchWriteItem", e))?;
                pending = out
                    .unprocessed_items()
                    .and_then(|m| m.get(&self.table))
                    .cloned()
                    .unwrap_or_default();
            }
        }
        Ok(())
    }

    /// Writes turns idempotently and in as few calls as the limits allow
    /// (up to 100 actions per transaction): each turn's item, plus per
    /// transaction one counter update per conversation and per user-day.
    /// The outcome of each input, in input order.
    pub async fn write_turns(&self, recs: &[TurnRecord]) -> Vec<WriteOutcome> {
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; recs.len()];
        let mut recs: Vec<TurnRecord> = recs.to_vec();
        let mut seen = std::collections::HashSet::new();
        let mut pending = Vec::new();
        for (i, r) in recs.iter_mut().enumerate() {
            if !seen.insert(r.turn_id.clone()) {
                outcomes[i] = Some(WriteOutcome::Duplicate);
                continue;
            }
            let inline = r.answer.as_ref().map_or(0, String::len) + r.user_message.len();
            if r.answer.is_some() && inline > ITEM_INLINE_MAX_BYTES {
                if let Err(e) = self.put_answer_parts(r).await {
                    outcomes[i] = Some(WriteOutcome::Failed(e.to_string()));
                    continue;
                }
            }
            if r.user_message.len() > ITEM_INLINE_MAX_BYTES {
                outcomes[i] = Some(WriteOutcome::Rejected(
                    "user message is larger than a turn item can hold".into(),
                ));
                continue;
            }
            pending.push(i);
        }
        let mut round = 0;
        while !pending.is_empty() && round < WRITE_ROUNDS {
            if round > 0 {
                tokio::time::sleep(backoff(round)).await;
            }
            round += 1;
            let txns = pack(&recs, &pending);
            let runs = txns.iter().map(|t| self.run_txn(&recs, t));
            let results = futures_util::future::join_all(runs).await;
            pending.clear();
            for (txn, result) in txns.iter().zip(results) {
                match result {
                    TxnResult::Ok => {
                        for &i in &txn.turns {
                            outcomes[i] = Some(WriteOutcome::Written);
                        }
                    }
                    TxnResult::Cancelled(decided) => {
                        for (i, o) in decided {
                            outcomes[i] = Some(o);
                        }
                        pending.extend(txn.turns.iter().filter(|&&i| outcomes[i].is_none()));
                    }
                    TxnResult::Failed(e) => {
                        tracing::warn!(error = %e, turns = txn.turns.len(), "turn transaction failed");
                        for &i in &txn.turns {
                            outcomes[i] = None;
                        }
                        pending.extend(&txn.turns);
                        if round == WRITE_ROUNDS {
                            for &i in &txn.turns {
                                outcomes[i] = Some(WriteOutcome::Failed(e.to_string()));
                            }
                        }
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| WriteOutcome::Failed("still conflicting after retries".into()))
            })
            .collect()
    }

    async fn run_txn(&self, recs: &[TurnRecord], txn: &Txn) -> TxnResult {
        let mut items = Vec::with_capacity(txn.actions());
        let mut kinds = Vec::with_capacity(txn.actions());
        for &i in &txn.turns {
            match self.turn_put(&recs[i]) {
                Ok(p) => items.push(TransactWriteItem::builder().put(p).build()),
                Err(e) => return TxnResult::Failed(e),
            }
            kinds.push(Action::Turn(i));
        }
        for (ci, (_, turns)) in txn.convs.iter().enumerate() {
            match self.meta_update(recs, turns) {
                Ok(u) => items.push(TransactWriteItem::builder().update(u).build()),
                Err(e) => return TxnResult::Failed(e),
            }
            kinds.push(Action::Meta(ci));
        }
        for ((user, day), (reqs, input, output)) in &txn.usage {
            match self.usage_update(user, day, *reqs, *input, *output) {
                Ok(u) => items.push(TransactWriteItem::builder().update(u).build()),
                Err(e) => return TxnResult::Failed(e),
            }
            kinds.push(Action::Usage);
        }
        self.count();
        let err = match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => return TxnResult::Ok,
            Err(e) => e,
        };
        let reasons = err
            .as_service_error()
            .and_then(|se| match se {
                aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => {
                    Some(c.cancellation_reasons().to_vec())
                }
                _ => None,
            });
        let Some(reasons) = reasons.filter(|r| r.len() == kinds.len()) else {
            return TxnResult::Failed(dynamo_err("TransactWriteItems", err));
        };
        let mut decided = Vec::new();
        for (kind, reason) in kinds.iter().zip(&reasons) {
            if reason.code() != Some("ConditionalCheckFailed") {
                continue;
            }
            match *kind {
                Action::Turn(i) => decided.push((i, WriteOutcome::Duplicate)),
                Action::Meta(ci) => {
                    for &i in &txn.convs[ci].1 {
                        decided.push((
                            i,
                            WriteOutcome::Rejected(
                                "the conversation belongs to another user".into(),
                            ),
                        ));
                    }
                }
                Action::Usage => {}
            }
        }
        if decided.is_empty() {
            // Cancelled for another reason (a conflicting transaction,
            // throttling): everything is retried.
            return TxnResult::Failed(dynamo_err("TransactWriteItems", err));
        }
        TxnResult::Cancelled(decided)
    }

    fn turn_put(&self, r: &TurnRecord) -> Result<Put, StoreError> {
        let mut item = Item::new();
        item.insert("PK".into(), s(conv_pk(&r.conversation_id)));
        item.insert("SK".into(), s(turn_sk(r.started_at_ms, &r.turn_id)));
        item.insert("type".into(), s("turn"));
        item.insert("turn_id".into(), s(&r.turn_id));
        item.insert("user_id".into(), s(&r.user_id));
        item.insert("status".into(), s(r.status.as_str()));
        item.insert("model".into(), s(&r.model));
        item.insert("user_message".into(), s(&r.user_message));
        match (&r.answer, r.answer_parts) {
            (Some(a), _) => {
                item.insert("answer".into(), s(a));
            }
            (None, Some(p)) => {
                item.insert("answer_parts".into(), n(p));
            }
            (None, None) => {}
        }
        item.insert("answer_bytes".into(), n(r.answer_bytes));
        item.insert("started_at".into(), n(r.started_at_ms));
        item.insert("completed_at".into(), n(r.completed_at_ms));
        item.insert("input_tokens".into(), n(r.input_tokens));
        item.insert("output_tokens".into(), n(r.output_tokens));
        if let Some(v) = &r.stop_reason {
            item.insert("stop_reason".into(), s(v));
        }
        if let Some(v) = &r.error_code {
            item.insert("error_code".into(), s(v));
        }
        if let Some(e) = self.expires_at(r.started_at_ms) {
            item.insert("expires_at".into(), n(e));
        }
        Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(PK)")
            .build()
            .map_err(|e| dynamo_err("TransactWriteItems", e))
    }

    /// The conversation's counters for `turns` (all of one conversation),
    /// creating it on its first turn. Fails the transaction if the
    /// conversation belongs to someone else.
    fn meta_update(&self, recs: &[TurnRecord], turns: &[usize]) -> Result<Update, StoreError> {
        let first = turns
            .iter()
            .map(|&i| &recs[i])
            .min_by_key(|r| r.started_at_ms)
            .ok_or_else(|| StoreError::Corrupt("empty conversation group".into()))?;
        let updated = turns
            .iter()
            .map(|&i| recs[i].completed_at_ms)
            .max()
            .unwrap_or(first.completed_at_ms);
        let title: String = first.user_message.chars().take(80).collect();
        let mut set =
            "#owner = if_not_exists(#owner, :owner), #title = if_not_exists(#title, :title), \
             #created = if_not_exists(#created, :created), #updated = :updated, \
             #g1pk = :g1pk, #g1sk = :g1sk, #type = :type"
                .to_owned();
        let mut b = Update::builder()
            .table_name(&self.table)
            .key("PK", s(conv_pk(&first.conversation_id)))
            .key("SK", s(META_SK))
            .condition_expression("attribute_not_exists(#owner) OR #owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#title", "title")
            .expression_attribute_names("#created", "created_at")
            .expression_attribute_names("#updated", "updated_at")
            .expression_attribute_names("#g1pk", "GSI1PK")
            .expression_attribute_names("#g1sk", "GSI1SK")
            .expression_attribute_names("#type", "type")
            .expression_attribute_names("#mc", "message_count")
            .expression_attribute_names("#tc", "turn_count")
            .expression_attribute_values(":owner", s(&first.user_id))
            .expression_attribute_values(":title", s(title))
            .expression_attribute_values(":created", n(first.started_at_ms))
            .expression_attribute_values(":updated", n(updated))
            .expression_attribute_values(":g1pk", s(user_pk(&first.user_id)))
            .expression_attribute_values(
                ":g1sk",
                s(format!("{updated:013}#{}", first.conversation_id)),
            )
            .expression_attribute_values(":type", s("conversation"))
            .expression_attribute_values(":mc", n(2 * turns.len()))
            .expression_attribute_values(":tc", n(turns.len()));
        if let Some(e) = self.expires_at(updated) {
            set.push_str(", #exp = :exp");
            b = b
                .expression_attribute_names("#exp", "expires_at")
                .expression_attribute_values(":exp", n(e));
        }
        b.update_expression(format!("SET {set} ADD #mc :mc, #tc :tc"))
            .build()
            .map_err(|e| dynamo_err("TransactWriteItems", e))
    }

    fn usage_update(
        &self,
        user: &str,
        day: &str,
        requests: u64,
        input: u64,
        output: u64,
    ) -> Result<Update, StoreError> {
        Update::builder()
            .table_name(&self.table)
            .key("PK", s(user_pk(user)))
            .key("SK", s(usage_sk(day)))
            .update_expression("SET #type = :type ADD #r :r, #i :i, #o :o")
            .expression_attribute_names("#type", "type")
            .expression_attribute_names("#r", "requests")
            .expression_attribute_names("#i", "input_tokens")
            .expression_attribute_names("#o", "output_tokens")
            .expression_attribute_values(":type", s("usage"))
            .expression_attribute_values(":r", n(requests))
            .expression_attribute_values(":i", n(input))
            .expression_attribute_values(":o", n(output))
            .build()
            .map_err(|e| dynamo_err("TransactWriteItems", e))
    }
}

enum TxnResult {
    Ok,
    /// Some actions' conditions failed: their turns are decided; the rest
    /// must be retried in a new transaction.
    Cancelled(Vec<(usize, WriteOutcome)>),
    Failed(StoreError),
}

fn backoff(round: u32) -> Duration {
    let base = 50u64 << round.min(5);
    Duration::from_millis(base / 2 + fastrand::u64(0..=base / 2))
}

/// An upper bound of a turn item's size in a transaction.
fn approx_bytes(r: &TurnRecord) -> usize {
    r.user_message.len() + r.answer.as_ref().map_or(0, String::len) + 512
}

/// Groups turns into transactions of at most 100 actions and ~3.5 MB:
/// one Put per turn, one Update per conversation and per user-day.
fn pack(recs: &[TurnRecord], pending: &[usize]) -> Vec<Txn> {
    let mut out = Vec::new();
    let mut cur = Txn::default();
    for &i in pending {
        let r = &recs[i];
        let day = crate::turn::utc_day(r.completed_at_ms);
        let new_conv = !cur.convs.iter().any(|(c, _)| *c == r.conversation_id);
        let new_usage = !cur
            .usage
            .iter()
            .any(|((u, d), _)| *u == r.user_id && *d == day);
        let need = 1 + usize::from(new_conv) + usize::from(new_usage);
        let bytes = approx_bytes(r);
        if !cur.turns.is_empty()
            && (cur.actions() + need > TXN_MAX_ACTIONS || cur.bytes + bytes > TXN_MAX_BYTES)
        {
            out.push(std::mem::take(&mut cur));
        }
        cur.turns.push(i);
        cur.bytes += bytes;
        match cur.convs.iter_mut().find(|(c, _)| *c == r.conversation_id) {
            Some((_, v)) => v.push(i),
            None => cur.convs.push((r.conversation_id.clone(), vec![i])),
        }
        let tokens = (1, u64::from(r.input_tokens), u64::from(r.output_tokens));
        match cur
            .usage
            .iter_mut()
            .find(|((u, d), _)| *u == r.user_id && *d == day)
        {
            Some((_, t)) => {
                t.0 += tokens.0;
                t.1 += tokens.1;
                t.2 += tokens.2;
            }
            None => cur.usage.push(((r.user_id.clone(), day), tokens)),
        }
    }
    if !cur.turns.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::TURN_SCHEMA_VERSION;

    fn rec(turn: &str, conv: &str, user: &str) -> TurnRecord {
        TurnRecord {
            v: TURN_SCHEMA_VERSION,
            turn_id: turn.into(),
            conversation_id: conv.into(),
            user_id: user.into(),
            started_at_ms: 1_700_000_000_000,
            completed_at_ms: 1_700_000_000_500,
            status: TurnStatus::Completed,
            model: "m".into(),
            user_message: "q".into(),
            answer: Some("a".into()),
            answer_parts: None,
            answer_bytes: 1,
            stop_reason: None,
            input_tokens: 2,
            output_tokens: 3,
            error_code: None,
        }
    }

    #[test]
    fn pack_shares_counter_updates_and_respects_the_action_limit() {
        // 300 turns in 10 conversations of 2 users: every transaction stays
        // within 100 actions, and counters are one update per
        // conversation / user-day per transaction, not one per turn.
        let recs: Vec<_> = (0..300)
            .map(|i| {
                rec(
                    &format!("t{i}"),
                    &format!("c{}", i % 10),
                    &format!("u{}", i % 2),
                )
            })
            .collect();
        let pending: Vec<usize> = (0..recs.len()).collect();
        let txns = pack(&recs, &pending);
        assert!(txns.iter().all(|t| t.actions() <= TXN_MAX_ACTIONS));
        assert_eq!(txns.iter().map(|t| t.turns.len()).sum::<usize>(), 300);
        assert_eq!(txns.len(), 4, "88 turns + 10 + 2 updates per transaction");
        let usage: u64 = txns
            .iter()
            .flat_map(|t| t.usage.iter().map(|(_, v)| v.0))
            .sum();
        assert_eq!(usage, 300);
    }

    #[test]
    fn pack_splits_by_size() {
        let mut recs: Vec<_> = (0..20).map(|i| rec(&format!("t{i}"), "c", "u")).collect();
        for r in &mut recs {
            r.answer = Some("x".repeat(250_000));
        }
        let txns = pack(&recs, &(0..20).collect::<Vec<_>>());
        assert!(txns.len() >= 2);
        assert!(txns.iter().all(|t| t.bytes <= TXN_MAX_BYTES));
    }

    #[test]
    fn cursors_round_trip_and_stay_in_their_partition() {
        let mut key = Item::new();
        key.insert("PK".into(), s("CONV#a"));
        key.insert("SK".into(), s("TURN#1"));
        let c = encode_cursor(&key);
        assert_eq!(decode_cursor(&c, ("PK", "CONV#a"), &["SK"]).ok(), Some(key));
        assert!(decode_cursor(&c, ("PK", "CONV#b"), &["SK"]).is_err());
        assert!(decode_cursor("not base64!", ("PK", "CONV#a"), &["SK"]).is_err());
        let mut extra = Item::new();
        extra.insert("PK".into(), s("CONV#a"));
        extra.insert("SK".into(), s("x"));
        extra.insert("GSI1PK".into(), s("USER#b"));
        assert!(decode_cursor(&encode_cursor(&extra), ("PK", "CONV#a"), &["SK"]).is_err());
    }

    #[test]
    fn turn_keys_sort_in_time_order() {
        assert!(turn_sk(999, "z") < turn_sk(1000, "a"));
        assert!(part_sk(5, "t", 9) < part_sk(5, "t", 10));
    }
}
