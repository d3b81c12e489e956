//! The record of an answer being streamed (`STREAM#{turn_id}`), so a stop
//! request that reaches another Lambda environment can be checked against
//! its owner and seen by the producer. Written once when the answer
//! starts (off the path to the first token), read by the producer every
//! `STOP_POLL_TABLE_MS` while it streams, expired by TTL after it.

use super::*;

const STREAM_SK: &str = "STREAM";

fn stream_pk(turn_id: &str) -> String {
    format!("STREAM#{turn_id}")
}

impl Store {
    /// Records that `owner` is being answered in `turn_id`, until
    /// `expires_at` (epoch seconds).
    pub async fn stream_started(
        &self,
        turn_id: &str,
        owner: &str,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        self.count();
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(stream_pk(turn_id)))
            .item("SK", s(STREAM_SK))
            .item("owner", s(owner))
            .item("expires_at", n(expires_at))
            .send()
            .await
            .map_err(|e| dynamo_err("PutItem", e))?;
        Ok(())
    }

    /// Asks the answer `turn_id` to stop, if `owner` owns it: `false` for
    /// an unknown answer and for someone else's alike.
    pub async fn request_stop(&self, turn_id: &str, owner: &str) -> Result<bool, StoreError> {
        self.count();
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(stream_pk(turn_id)))
            .key("SK", s(STREAM_SK))
            .update_expression("SET stop_requested = :t")
            .condition_expression("#o = :owner")
            .expression_attribute_names("#o", "owner")
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .expression_attribute_values(":owner", s(owner))
            .send()
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) => match e.as_service_error() {
                Some(
                    aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(_),
                ) => Ok(false),
                _ => Err(dynamo_err("UpdateItem", e)),
            },
        }
    }

    /// Whether a stop was asked for `turn_id` (an eventually consistent
    /// read: half a read unit).
    pub async fn stop_requested(&self, turn_id: &str) -> Result<bool, StoreError> {
        let item = self.get_item(stream_pk(turn_id), STREAM_SK).await?;
        Ok(item
            .and_then(|i| i.get("stop_requested").cloned())
            .is_some_and(|v| v.as_bool().is_ok_and(|b| *b)))
    }
}
