//! Conversations and their turns: GetItem and Query only.

use super::*;

impl Store {
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
}
