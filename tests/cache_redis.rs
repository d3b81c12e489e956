//! The response-cache backends on their own: against a real Redis and
//! DynamoDB in moto, entries round trip and expire with their TTL; a dead
//! Redis is an error at once, not a hang; a DynamoDB item too large to
//! cache is skipped, not an error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_core::cache::{CacheError, CachedAnswer, DynamoCache, RedisCache, ResponseCache};
use chat_core::fleet::RedisLink;
use e2e::{LocalAws, RedisServer};

fn answer(text: &str) -> CachedAnswer {
    CachedAnswer {
        text: text.into(),
        model: "claude-sim".into(),
        stop_reason: Some("end_turn".into()),
        input_tokens: 3,
        output_tokens: 5,
        stored_at_ms: chat_core::turn::now_ms(),
    }
}

#[tokio::test]
async fn entries_round_trip_and_expire() {
    let redis = RedisServer::start().await;
    let link = Arc::new(RedisLink::new(&redis.url(), Duration::from_millis(500)).unwrap());
    let cache = RedisCache::new(link, Duration::from_millis(500));
    let key = chat_core::auth::hash_key("some request");

    assert_eq!(cache.get(&key).await, Ok(None));
    let a = answer("Grüße 😀 the whole answer");
    cache.put(&key, &a, Duration::from_secs(1)).await.unwrap();
    assert_eq!(cache.get(&key).await, Ok(Some(a.clone())));
    assert_eq!(cache.get("other-key").await, Ok(None));

    // Redis expires it with the TTL.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(cache.get(&key).await, Ok(None));
}

#[tokio::test]
async fn a_dead_redis_is_an_error_at_once() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    redis.stop();
    let link = Arc::new(RedisLink::new(&url, Duration::from_millis(50)).unwrap());
    let cache = RedisCache::new(link, Duration::from_millis(50));
    let t = Instant::now();
    assert_eq!(cache.get("k").await, Err(CacheError::Unavailable));
    assert_eq!(
        cache.put("k", &answer("x"), Duration::from_secs(5)).await,
        Err(CacheError::Unavailable)
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test]
async fn dynamodb_entries_round_trip_and_expire() {
    let aws = LocalAws::create(&[]).await;
    let store = Arc::new(aws.store().await);
    let cache = DynamoCache::new(store.clone(), Duration::from_secs(5));
    let key = chat_core::auth::hash_key("some request");

    assert_eq!(cache.get(&key).await, Ok(None));
    let a = answer("Grüße 😀 the whole answer");
    cache.put(&key, &a, Duration::from_secs(1)).await.unwrap();
    assert_eq!(cache.get(&key).await, Ok(Some(a.clone())));
    assert_eq!(cache.get("other-key").await, Ok(None));
    // DynamoDB's TTL deletes items late (moto: not at all); the backend
    // checks `expires_at` itself.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(cache.get(&key).await, Ok(None));

    // Over DynamoDB's item limit: not cached, and not an error.
    let big = answer(&"x".repeat(400_000));
    cache
        .put("big", &big, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get("big").await, Ok(None));
}
