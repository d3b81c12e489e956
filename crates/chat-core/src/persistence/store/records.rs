//! Small records: API keys, usage counters, cache entries.

use super::*;

impl Store {
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
}
