//! The Redis response-cache backend against a real Redis: entries round
//! trip, expire with their TTL, and a dead Redis is an error at once, not a
//! hang. (The relay does not use the cache yet; see issue 4.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_core::cache::{CacheError, CachedAnswer, RedisCache, ResponseCache};
use chat_core::fleet::RedisLink;
use e2e::RedisServer;

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
