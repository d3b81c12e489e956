//! Erasing data: a conversation (every item of its partition: the
//! summary, the turns, the parts of claim-checked answers), or a whole
//! user (their conversations, their usage counters, their API keys and
//! the index of them). Query (keys only) and BatchWriteItem deletes; a
//! conversation's summary goes last, so a delete that stops half-way
//! leaves a conversation its owner can see and delete again, never turns
//! nobody can reach.

use aws_sdk_dynamodb::types::{DeleteRequest, WriteRequest};

use super::*;

impl Store {
    /// Deletes conversation `id` whole; how many items went.
    pub async fn delete_conversation(&self, id: &str) -> Result<u64, StoreError> {
        let pk = conv_pk(id);
        let mut deleted = 0u64;
        let mut start: Option<Item> = None;
        let mut meta: Option<Item> = None;
        loop {
            let (keys, next) = self.partition_keys(&pk, start.take()).await?;
            let mut requests = Vec::new();
            for key in &keys {
                if key
                    .get("SK")
                    .and_then(|v| v.as_s().ok())
                    .map(String::as_str)
                    == Some(META_SK)
                {
                    meta = Some(key.clone());
                    continue;
                }
                requests.push(delete_request(key.clone())?);
            }
            deleted += requests.len() as u64;
            self.batch_write(requests).await?;
            match next {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        if let Some(key) = meta {
            self.batch_write(vec![delete_request(key)?]).await?;
            deleted += 1;
        }
        Ok(deleted)
    }
}

/// What erasing a user removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Erased {
    pub conversations: u64,
    pub items: u64,
    pub api_keys: u64,
    /// The conversations' ids (their recent-turns buffers go too).
    pub conversation_ids: Vec<String>,
}

impl Store {
    /// Erases everything stored for `user`: conversations (found through
    /// the user's index), usage counters, API keys.
    pub async fn erase_user(&self, user: &str) -> Result<Erased, StoreError> {
        let mut erased = Erased::default();
        // All the ids first (the index is read page by page), then delete.
        let mut cursor: Option<String> = None;
        loop {
            let (convs, next) = self
                .list_conversations(user, 100, cursor.as_deref())
                .await?;
            erased
                .conversation_ids
                .extend(convs.into_iter().map(|c| c.id));
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        for id in &erased.conversation_ids {
            erased.items += self.delete_conversation(id).await?;
            erased.conversations += 1;
        }
        // The user's own partition: usage per day and the index of keys;
        // each indexed key's own item goes too.
        let pk = user_pk(user);
        let mut start: Option<Item> = None;
        loop {
            let (keys, next) = self.partition_keys(&pk, start.take()).await?;
            let mut requests = Vec::new();
            for key in &keys {
                let sk = key.get("SK").and_then(|v| v.as_s().ok()).cloned();
                if let Some(hash) = sk.as_deref().and_then(|k| k.strip_prefix("APIKEY#")) {
                    let mut k = Item::new();
                    k.insert("PK".into(), s(api_key_pk(hash)));
                    k.insert("SK".into(), s("APIKEY"));
                    requests.push(delete_request(k)?);
                    erased.api_keys += 1;
                }
                requests.push(delete_request(key.clone())?);
            }
            erased.items += requests.len() as u64;
            self.batch_write(requests).await?;
            match next {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        Ok(erased)
    }

    /// One page of the keys (PK, SK) of partition `pk`, and where the
    /// next page starts.
    async fn partition_keys(
        &self,
        pk: &str,
        start: Option<Item>,
    ) -> Result<(Vec<Item>, Option<Item>), StoreError> {
        self.count();
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .expression_attribute_values(":pk", s(pk))
            .projection_expression("PK, SK")
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| dynamo_err("Query", e))?;
        let next = out.last_evaluated_key().cloned();
        Ok((out.items.unwrap_or_default(), next))
    }

    /// Deletes a cached answer stored in the table (`CACHE#{key}`).
    pub async fn cache_delete(&self, key: &str) -> Result<(), StoreError> {
        let mut k = Item::new();
        k.insert("PK".into(), s(cache_pk(key)));
        k.insert("SK".into(), s(CACHE_SK));
        self.batch_write(vec![delete_request(k)?]).await
    }
}

fn delete_request(key: Item) -> Result<WriteRequest, StoreError> {
    let del = DeleteRequest::builder()
        .set_key(Some(key))
        .build()
        .map_err(|e| dynamo_err("BatchWriteItem", e))?;
    Ok(WriteRequest::builder().delete_request(del).build())
}
