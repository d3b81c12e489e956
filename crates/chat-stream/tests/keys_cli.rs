//! `chat-stream keys create|list|disable|enable` against the table in moto,
//! run as the real binary, and a `disabled` flag set by hand in any truthy
//! form.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aws_sdk_dynamodb::types::AttributeValue;
use e2e::LocalAws;

async fn keys(aws: &LocalAws, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-stream"))
        .arg("keys")
        .args(args)
        .env("TABLE_NAME", &aws.table)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn keys_are_created_listed_disabled_and_enabled_without_editing_items() {
    e2e::require_aws_endpoint();
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let (ok, key) = keys(&aws, &["create", "--user", "kim", "--label", "laptop"]).await;
    assert!(ok);
    let hash = chat_core::auth::hash_key(key.trim());
    assert_eq!(
        store.lookup_api_key(&hash).await.unwrap().as_deref(),
        Some("kim")
    );

    let (ok, list) = keys(&aws, &["list", "--user", "kim"]).await;
    assert!(ok);
    assert!(
        list.contains(&hash) && list.contains("enabled") && list.contains("laptop"),
        "{list}"
    );
    assert!(!list.contains(key.trim()), "the key itself is never listed");

    assert!(
        keys(&aws, &["disable", "--user", "kim", "--hash", &hash])
            .await
            .0
    );
    assert_eq!(store.lookup_api_key(&hash).await.unwrap(), None);
    assert!(
        keys(&aws, &["list", "--user", "kim"])
            .await
            .1
            .contains("disabled")
    );
    // Someone else's key cannot be touched.
    assert!(
        !keys(&aws, &["enable", "--user", "eve", "--hash", &hash])
            .await
            .0
    );
    assert!(
        keys(&aws, &["enable", "--user", "kim", "--hash", &hash])
            .await
            .0
    );
    assert_eq!(
        store.lookup_api_key(&hash).await.unwrap().as_deref(),
        Some("kim")
    );
    assert!(
        !keys(&aws, &["disable", "--user", "kim", "--hash", "nothex"])
            .await
            .0
    );
}

#[tokio::test]
async fn a_disabled_flag_set_by_hand_in_any_truthy_form_disables_the_key() {
    e2e::require_aws_endpoint();
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let sdk = chat_core::aws_sdk_config(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(10),
    )
    .await;
    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    for (i, flag) in [
        AttributeValue::S("true".into()),
        AttributeValue::S("yes".into()),
        AttributeValue::N("1".into()),
        AttributeValue::Bool(true),
    ]
    .into_iter()
    .enumerate()
    {
        let hash = chat_core::auth::hash_key(&format!("key-{i}"));
        store.put_api_key(&hash, "lee", "", 0).await.unwrap();
        ddb.update_item()
            .table_name(&aws.table)
            .key("PK", AttributeValue::S(format!("APIKEY#{hash}")))
            .key("SK", AttributeValue::S("APIKEY".into()))
            .update_expression("SET disabled = :d")
            .expression_attribute_values(":d", flag.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(store.lookup_api_key(&hash).await.unwrap(), None, "{flag:?}");
    }
}
