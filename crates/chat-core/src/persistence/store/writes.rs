//! Writes: turns with their counters in idempotent transactions, answer
//! parts by BatchWriteItem (see the [module docs](super)).

use std::time::Duration;

use aws_sdk_dynamodb::types::{Put, PutRequest, TransactWriteItem, Update, WriteRequest};

use super::*;
use crate::persistence::turn::{ANSWER_PART_BYTES, ITEM_INLINE_MAX_BYTES, TurnRecord};
use crate::util::split_utf8;

/// TransactWriteItems takes at most 100 actions and 4 MB.
const TXN_MAX_ACTIONS: usize = 100;
const TXN_MAX_BYTES: usize = 3_500_000;
/// BatchWriteItem takes at most 25 puts.
const BATCH_WRITE_MAX: usize = 25;
/// Rounds of retry for transactions that were cancelled by a conflict or
/// throttled, and for BatchWriteItem's UnprocessedItems.
const WRITE_ROUNDS: u32 = 4;

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
    pub(super) async fn batch_write(&self, requests: Vec<WriteRequest>) -> Result<(), StoreError> {
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
        let mut written_convs: Vec<Vec<usize>> = Vec::new();
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
                        written_convs.extend(txn.convs.iter().map(|(_, t)| t.clone()));
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
        let settles = written_convs.iter().map(|t| self.settle_meta(&recs, t));
        futures_util::future::join_all(settles).await;
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
        item.insert("status".into(), s(r.status_word()));
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
        // Turns arrive out of order (a standard queue, several writers,
        // redelivery, the direct-write fallback): here every time-ordered
        // field is only set when missing; [`Store::settle_meta`] then moves
        // it forward (updated) or back (created, title) with a condition.
        let mut set =
            "#owner = if_not_exists(#owner, :owner), #title = if_not_exists(#title, :title), \
             #created = if_not_exists(#created, :created), #updated = if_not_exists(#updated, :updated), \
             #g1pk = :g1pk, #g1sk = if_not_exists(#g1sk, :g1sk), #type = :type"
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
            set.push_str(", #exp = if_not_exists(#exp, :exp)");
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
        let day = crate::util::utc_day(r.completed_at_ms);
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
#[path = "writes_tests.rs"]
mod tests;
