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
            let disabled = item.get("disabled").is_some_and(truthy);
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
        // The user's index of their keys (for `keys list`): the hash, label
        // and state, never the key.
        self.count();
        self.client
            .put_item()
            .table_name(&self.table)
            .item("PK", s(user_pk(user)))
            .item("SK", s(user_key_sk(hash_hex)))
            .item("type", s("api_key_ref"))
            .item("label", s(label))
            .item("created_at", n(now_ms))
            .send()
            .await
            .map_err(|e| dynamo_err("PutItem", e))?;
        Ok(())
    }

    /// Disables (or enables again) the key with this hash, if `user` owns
    /// it. `Ok(false)`: no such key of that user.
    pub async fn set_api_key_disabled(
        &self,
        hash_hex: &str,
        user: &str,
        disabled: bool,
    ) -> Result<bool, StoreError> {
        self.count();
        let r = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(api_key_pk(hash_hex)))
            .key("SK", s("APIKEY"))
            .update_expression("SET disabled = :d")
            .condition_expression("user_id = :u")
            .expression_attribute_values(":d", AttributeValue::Bool(disabled))
            .expression_attribute_values(":u", s(user))
            .send()
            .await;
        match r {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(dynamo_err("UpdateItem", e)),
        }
        self.count();
        self.client
            .update_item()
            .table_name(&self.table)
            .key("PK", s(user_pk(user)))
            .key("SK", s(user_key_sk(hash_hex)))
            .update_expression("SET disabled = :d")
            .expression_attribute_values(":d", AttributeValue::Bool(disabled))
            .send()
            .await
            .map_err(|e| dynamo_err("UpdateItem", e))?;
        Ok(true)
    }

    /// A user's keys, from their index (one Query): (hash, label,
    /// created_at ms, disabled).
    pub async fn list_api_keys(
        &self,
        user: &str,
    ) -> Result<Vec<(String, String, u64, bool)>, StoreError> {
        self.count();
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk AND begins_with(SK, :p)")
            .expression_attribute_values(":pk", s(user_pk(user)))
            .expression_attribute_values(":p", s(user_key_sk("")))
            .send()
            .await
            .map_err(|e| dynamo_err("Query", e))?;
        Ok(out
            .items()
            .iter()
            .filter_map(|i| {
                let hash = get_s(i, "SK")?.strip_prefix(&user_key_sk(""))?.to_owned();
                Some((
                    hash,
                    get_s(i, "label").unwrap_or_default().to_owned(),
                    get_n(i, "created_at").unwrap_or(0),
                    i.get("disabled").is_some_and(truthy),
                ))
            })
            .collect())
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

/// Whether a flag attribute set by hand means "yes": a BOOL true, a
/// number other than 0, or any string but an empty one, `false`, `0`,
/// `no` or `off` (any case). Other types present count as set.
pub fn truthy(v: &AttributeValue) -> bool {
    match v {
        AttributeValue::Bool(b) => *b,
        AttributeValue::Null(_) => false,
        // An unreadable number counts as set.
        AttributeValue::N(n) => n.trim().parse::<f64>().ok().is_none_or(|x| x != 0.0),
        AttributeValue::S(t) => !matches!(
            t.trim().to_ascii_lowercase().as_str(),
            "" | "false" | "0" | "no" | "off"
        ),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_truthy_disabled_value_disables() {
        for v in [
            AttributeValue::Bool(true),
            AttributeValue::S("true".into()),
            AttributeValue::S("TRUE".into()),
            AttributeValue::S("yes".into()),
            AttributeValue::S("1".into()),
            AttributeValue::N("1".into()),
            AttributeValue::N("2.5".into()),
        ] {
            assert!(truthy(&v), "{v:?}");
        }
        for v in [
            AttributeValue::Bool(false),
            AttributeValue::S("false".into()),
            AttributeValue::S("".into()),
            AttributeValue::S("No".into()),
            AttributeValue::N("0".into()),
            AttributeValue::Null(true),
        ] {
            assert!(!truthy(&v), "{v:?}");
        }
    }
}
