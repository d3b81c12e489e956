//! A conversation's summary (its `META` item) when turns arrive out of
//! order: `updated_at` only forward, `created_at` and title only back.

use super::*;
use crate::persistence::turn::TurnRecord;

impl Store {
    /// After a transaction wrote `turns` of one conversation: moves its
    /// `updated_at` (and list position, and expiry) only forward, and its
    /// `created_at` and title only back to an earlier turn, whatever order
    /// the turns arrive in. Two conditional updates, run at once; a failed
    /// condition means the item already says something newer (or older).
    /// A failure here is logged: the turns are written, and the next turn
    /// of the conversation moves the summary again.
    pub(super) async fn settle_meta(&self, recs: &[TurnRecord], turns: &[usize]) {
        let group = || turns.iter().map(|&i| &recs[i]);
        let (Some(first), Some(updated)) = (
            group().min_by_key(|r| r.started_at_ms),
            group().map(|r| r.completed_at_ms).max(),
        ) else {
            return;
        };
        let pk = conv_pk(&first.conversation_id);
        let forward = {
            let mut set = "#updated = :updated, #g1sk = :g1sk".to_owned();
            let mut b = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("PK", s(pk.clone()))
                .key("SK", s(META_SK))
                .condition_expression("#updated < :updated")
                .expression_attribute_names("#updated", "updated_at")
                .expression_attribute_names("#g1sk", "GSI1SK")
                .expression_attribute_values(":updated", n(updated))
                .expression_attribute_values(
                    ":g1sk",
                    s(format!("{updated:013}#{}", first.conversation_id)),
                );
            if let Some(e) = self.expires_at(updated) {
                set.push_str(", #exp = :exp");
                b = b
                    .expression_attribute_names("#exp", "expires_at")
                    .expression_attribute_values(":exp", n(e));
            }
            b.update_expression(format!("SET {set}")).send()
        };
        let title: String = first.user_message.chars().take(80).collect();
        let back = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(pk))
            .key("SK", s(META_SK))
            .condition_expression("#created > :created")
            .update_expression("SET #created = :created, #title = :title")
            .expression_attribute_names("#created", "created_at")
            .expression_attribute_names("#title", "title")
            .expression_attribute_values(":created", n(first.started_at_ms))
            .expression_attribute_values(":title", s(title));
        self.count();
        self.count();
        let (a, b) = tokio::join!(forward, back.send());
        for r in [a.map(|_| ()), b.map(|_| ())] {
            if let Err(e) = r {
                let condition = e
                    .as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception());
                if !condition {
                    tracing::warn!(error = %dynamo_err("UpdateItem", e), "conversation summary not moved");
                }
            }
        }
    }
}
