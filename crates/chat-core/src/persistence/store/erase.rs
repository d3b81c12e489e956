//! Erasing a conversation: every item of its partition (the summary, the
//! turns, the parts of claim-checked answers). Query (keys only) and
//! BatchWriteItem deletes; the summary goes last, so a delete that stops
//! half-way leaves a conversation its owner can see and delete again,
//! never turns nobody can reach.

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
            self.count();
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("PK = :pk")
                .expression_attribute_values(":pk", s(pk.clone()))
                .projection_expression("PK, SK")
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| dynamo_err("Query", e))?;
            let mut requests = Vec::new();
            for key in out.items() {
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
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
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

fn delete_request(key: Item) -> Result<WriteRequest, StoreError> {
    let del = DeleteRequest::builder()
        .set_key(Some(key))
        .build()
        .map_err(|e| dynamo_err("BatchWriteItem", e))?;
    Ok(WriteRequest::builder().delete_request(del).build())
}
