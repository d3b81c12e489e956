//! Fleet-wide counters in the DynamoDB table, for deployments without
//! Redis (the template's default): every Lambda environment counts in the
//! same items, so N environments do not give a caller N times a limit.
//!
//! Each check is one conditional `UpdateItem` (one round trip, atomic):
//! the count moves only when the limit still has room, and a refusal
//! returns the item as it was (`ReturnValuesOnConditionCheckFailure`), so
//! the caller learns which limit refused and when it resets without a
//! second call. Every item carries `expires_at`, the table's TTL
//! attribute, and the checks themselves ignore what has expired (TTL
//! deletes late), so a count outlives its window by nothing that matters.
//!
//! | counter | PK | SK | attributes |
//! | --- | --- | --- | --- |
//! | requests and tokens in a minute | `LIMIT#{caller}` | `RATE#{minute}` | `r`, `t` |
//! | open streams of a user | `LIMIT#{caller}` | `STREAMS` | `slots` (string set of `id expiry`) |
//!
//! The client has one short timeout and no retry: a slow table costs one
//! timeout, after which the caller falls back to the in-memory limiter
//! and the table is skipped for [`SKIP_AFTER_FAILURE`].
//!
//! Uses: the AWS SDK only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};

/// After a failed call the table is not asked again for this long.
pub const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(2);

type Item = HashMap<String, AttributeValue>;

/// What a conditional count found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Counted; the values after the update.
    Yes { requests: u64, tokens: u64 },
    /// Refused; the values that refused it.
    No { requests: u64, tokens: u64 },
}

/// Counters in the chat table. Counts its calls, so the benchmarks can
/// report round trips per request.
pub struct TableCounters {
    client: Client,
    table: String,
    calls: AtomicU64,
    down_until: Mutex<Option<Instant>>,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn num(item: &Item, k: &str) -> u64 {
    item.get(k)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v.max(0.0) as u64)
}

/// The old item of a refused conditional update; `None` for any other
/// error.
fn refused_item(e: &SdkError<UpdateItemError>) -> Option<Item> {
    match e.as_service_error() {
        Some(UpdateItemError::ConditionalCheckFailedException(c)) => {
            Some(c.item().cloned().unwrap_or_default())
        }
        _ => None,
    }
}

impl TableCounters {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            calls: AtomicU64::new(0),
            down_until: Mutex::new(None),
        }
    }

    /// The table's client with one attempt of at most `timeout`.
    pub async fn connect(table: &str, timeout: Duration) -> Self {
        let sdk = crate::aws::aws_sdk_config(timeout, timeout).await;
        Self::new(Client::new(&sdk), table)
    }

    /// DynamoDB calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn usable(&self) -> bool {
        let d = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        d.is_none_or(|t| Instant::now() >= t)
    }

    fn failed(&self, op: &str, e: &dyn std::fmt::Debug) {
        tracing::warn!(op, error = ?e, "limit counters in the table unavailable; limiting per instance");
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + SKIP_AFTER_FAILURE);
    }

    fn update(
        &self,
        pk: String,
        sk: &str,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(pk))
            .key("SK", s(sk))
    }

    /// Counts one request and `tokens` reserved tokens of `caller` in
    /// minute `minute`, if fewer than `rpm` requests and `tpm` tokens are
    /// counted there (0 = no limit). `None`: the table did not answer.
    pub async fn count_minute(
        &self,
        caller: &str,
        minute: u64,
        rpm: u32,
        tpm: u32,
        tokens: u32,
        expires_at: u64,
    ) -> Option<Counted> {
        if !self.usable() {
            return None;
        }
        let mut cond = Vec::new();
        let mut req = self
            .update(format!("LIMIT#{caller}"), &format!("RATE#{minute}"))
            .update_expression("ADD r :one, t :tok SET expires_at = :exp")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":tok", n(tokens))
            .expression_attribute_values(":exp", n(expires_at))
            .return_values(ReturnValue::UpdatedNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        if rpm > 0 {
            cond.push("(attribute_not_exists(r) OR r < :rpm)");
            req = req.expression_attribute_values(":rpm", n(rpm));
        }
        if tpm > 0 {
            cond.push("(attribute_not_exists(t) OR t < :tpm)");
            req = req.expression_attribute_values(":tpm", n(tpm));
        }
        if !cond.is_empty() {
            req = req.condition_expression(cond.join(" AND "));
        }
        match req.send().await {
            Ok(out) => {
                let item = out.attributes.unwrap_or_default();
                Some(Counted::Yes {
                    requests: num(&item, "r"),
                    tokens: num(&item, "t"),
                })
            }
            Err(e) => match refused_item(&e) {
                Some(item) => Some(Counted::No {
                    requests: num(&item, "r"),
                    tokens: num(&item, "t"),
                }),
                None => {
                    self.failed("count_minute", &e);
                    None
                }
            },
        }
    }

    /// Moves `caller`'s reserved tokens in `minute` by `delta` (a
    /// reservation settled to the real usage). Off the request path.
    pub async fn adjust_tokens(&self, caller: &str, minute: u64, delta: i64) {
        if !self.usable() {
            return;
        }
        let r = self
            .update(format!("LIMIT#{caller}"), &format!("RATE#{minute}"))
            .update_expression("ADD t :d")
            .condition_expression("attribute_exists(t)")
            .expression_attribute_values(":d", n(delta))
            .send()
            .await;
        if let Err(e) = r {
            if refused_item(&e).is_none() {
                self.failed("adjust_tokens", &e);
            }
        }
    }

    /// Takes one of `max` stream slots of `caller` for `id` until
    /// `expires_at` (epoch seconds). Slots past their expiry (an
    /// environment that died mid-stream) are removed when they stand in
    /// the way, and the take is tried once more. `None`: no answer.
    pub async fn take_slot(
        &self,
        caller: &str,
        id: &str,
        max: u32,
        now: u64,
        expires_at: u64,
    ) -> Option<Result<(), u32>> {
        if !self.usable() {
            return None;
        }
        let entry = format!("{id} {expires_at}");
        for attempt in 0..2 {
            let r = self
                .update(format!("LIMIT#{caller}"), "STREAMS")
                .update_expression("ADD slots :me SET expires_at = :exp")
                .condition_expression("attribute_not_exists(slots) OR size(slots) < :max")
                .expression_attribute_values(":me", AttributeValue::Ss(vec![entry.clone()]))
                .expression_attribute_values(":exp", n(expires_at))
                .expression_attribute_values(":max", n(max))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
                .await;
            let old = match r {
                Ok(_) => return Some(Ok(())),
                Err(e) => match refused_item(&e) {
                    Some(item) => item,
                    None => {
                        self.failed("take_slot", &e);
                        return None;
                    }
                },
            };
            let slots: Vec<String> = old
                .get("slots")
                .and_then(|v| v.as_ss().ok())
                .cloned()
                .unwrap_or_default();
            let stale: Vec<String> = slots
                .iter()
                .filter(|e| slot_expiry(e).is_none_or(|t| t <= now))
                .cloned()
                .collect();
            let open = (slots.len() - stale.len()) as u32;
            if stale.is_empty() || attempt == 1 {
                return Some(Err(open));
            }
            let r = self
                .update(format!("LIMIT#{caller}"), "STREAMS")
                .update_expression("DELETE slots :stale")
                .expression_attribute_values(":stale", AttributeValue::Ss(stale))
                .send()
                .await;
            if let Err(e) = r {
                self.failed("take_slot", &e);
                return None;
            }
        }
        None
    }

    /// Gives back the slot taken for `entry` (`id expiry`).
    pub async fn give_slot(&self, caller: &str, id: &str, expires_at: u64) {
        let r = self
            .update(format!("LIMIT#{caller}"), "STREAMS")
            .update_expression("DELETE slots :me")
            .expression_attribute_values(
                ":me",
                AttributeValue::Ss(vec![format!("{id} {expires_at}")]),
            )
            .send()
            .await;
        if let Err(e) = r {
            // The slot expires in any case.
            tracing::warn!(error = ?e, "could not give back a stream slot");
        }
    }
}

/// The expiry (epoch seconds) of a slot entry `id expiry`.
fn slot_expiry(entry: &str) -> Option<u64> {
    entry.rsplit_once(' ')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_entry_carries_its_expiry() {
        assert_eq!(slot_expiry("abc 1700000000"), Some(1_700_000_000));
        assert_eq!(slot_expiry("garbage"), None);
    }
}
