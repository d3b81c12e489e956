//! The response-cache backends on their own: against a real Redis and
//! DynamoDB in moto, entries round trip and expire with their TTL; a dead
//! Redis is an error at once, not a hang; a DynamoDB item too large to
//! cache is skipped, not an error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_core::cache::{CacheError, CachedAnswer, DynamoCache, RedisCache, ResponseCache};
use chat_core::redis::RedisLink;
use e2e::{LocalAws, RedisServer};

fn answer(text: &str) -> CachedAnswer {
    CachedAnswer {
        text: text.into(),
        model: "claude-sim".into(),
        stop_reason: Some("end_turn".into()),
        input_tokens: 3,
        output_tokens: 5,
        stored_at_ms: chat_core::util::now_ms(),
    }
}

/// What every backend must do: a miss, a round trip that keeps every
/// byte, other keys unaffected, and the entry gone after its 1 s TTL.
async fn round_trip_and_expire(cache: &dyn ResponseCache) {
    let key = chat_core::auth::hash_key("some request");
    assert_eq!(cache.get(&key).await, Ok(None));
    let a = answer("Grüße 😀 the whole answer");
    cache.put(&key, &a, Duration::from_secs(1)).await.unwrap();
    assert_eq!(cache.get(&key).await, Ok(Some(a.clone())));
    assert_eq!(cache.get("other-key").await, Ok(None));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        cache.get(&key).await,
        Ok(None),
        "{} kept it past its TTL",
        cache.name()
    );
}

#[tokio::test]
async fn entries_round_trip_and_expire() {
    let redis = RedisServer::start().await;
    let link = Arc::new(RedisLink::new(&redis.url(), Duration::from_millis(500), false).unwrap());
    // Redis expires the entry itself (SET EX).
    round_trip_and_expire(&RedisCache::new(link, Duration::from_millis(500))).await;
}

/// Asks queued on the hot path reach Redis together, repeated asks of one
/// question combined, and rank as if each had been sent alone.
#[tokio::test]
async fn queued_asks_are_sent_together_and_count_as_many() {
    use chat_core::cache::popular::{FLUSH_EVERY, Popularity, PopularityConfig};
    let redis = RedisServer::start().await;
    let link = Arc::new(RedisLink::new(&redis.url(), Duration::from_millis(500), false).unwrap());
    let config = PopularityConfig {
        max_entries: 100,
        half_life: Duration::from_secs(3600),
    };
    let p = Arc::new(Popularity::new(link, Duration::from_millis(500), config));
    for _ in 0..3 {
        p.ask("k-three", "doc three");
    }
    p.ask("k-one", "doc one");
    // Nothing is sent until the flush is due.
    assert_eq!(p.top(10).await.unwrap(), vec![]);
    tokio::time::sleep(FLUSH_EVERY * 4).await;
    let top = p.top(10).await.unwrap();
    assert_eq!(top.len(), 2, "{top:?}");
    assert_eq!(
        (top[0].key.as_str(), top[0].doc.as_str()),
        ("k-three", "doc three")
    );
    assert!((top[0].weight - 3.0).abs() < 0.01, "{top:?}");
    assert!((top[1].weight - 1.0).abs() < 0.01, "{top:?}");
    // The same as asks sent one at a time.
    p.record("k-one", "doc one").await;
    p.record("k-one", "doc one").await;
    let top = p.top(10).await.unwrap();
    assert!(top.iter().all(|e| (e.weight - 3.0).abs() < 0.01), "{top:?}");
}

/// The cache lookup takes the coalescing lease in the same script on a
/// miss, takes none on a hit, and a stored answer gives the lease up only
/// if it is still ours.
#[tokio::test]
async fn the_lookup_leads_on_a_miss_and_the_store_releases() {
    use chat_core::live::{Lead, Live, LiveConfig, Looked, lock_key};
    let redis = RedisServer::start().await;
    let link = Arc::new(RedisLink::new(&redis.url(), Duration::from_millis(500), false).unwrap());
    let cache = RedisCache::new(link.clone(), Duration::from_millis(500));
    let live = Live::new(
        link,
        Duration::from_millis(500),
        LiveConfig {
            retention: Duration::from_secs(60),
            lease: Duration::from_secs(30),
            coalesce: true,
            finish_on_disconnect: true,
        },
    );
    let entry = cache.redis_key("q").unwrap();
    assert_eq!(
        live.lookup_or_lead(&entry, "q", "t1").await,
        Some(Looked::Missed(Lead::Leader))
    );
    assert_eq!(
        live.lookup_or_lead(&entry, "q", "t2").await,
        Some(Looked::Missed(Lead::Follow("t1".into())))
    );
    assert_eq!(live.holder("q").await, Ok(Some("t1".into())));
    // Someone else's turn cannot give the lease up; the leader's store does.
    let stored = answer("forty-two");
    let json = serde_json::to_string(&stored).unwrap();
    assert!(
        live.store_and_release(&entry, &json, Duration::from_secs(60), "q", "t2")
            .await
    );
    assert_eq!(live.holder("q").await, Ok(Some("t1".into())));
    assert!(
        live.store_and_release(&entry, &json, Duration::from_secs(60), "q", "t1")
            .await
    );
    assert_eq!(live.holder("q").await, Ok(None));
    assert_eq!(cache.get("q").await, Ok(Some(stored)));
    // A hit: the entry, and no lease taken.
    assert_eq!(
        live.lookup_or_lead(&entry, "q", "t3").await,
        Some(Looked::Cached(json))
    );
    assert_eq!(live.holder("q").await, Ok(None));
    assert!(lock_key("q").contains("{q}"));
}

#[tokio::test]
async fn a_dead_redis_is_an_error_at_once() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    redis.stop();
    let link = Arc::new(RedisLink::new(&url, Duration::from_millis(50), false).unwrap());
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
    // DynamoDB's TTL deletes items late (moto: not at all); the backend
    // checks `expires_at` itself.
    round_trip_and_expire(&cache).await;

    // Over DynamoDB's item limit: not cached, and not an error.
    let big = answer(&"x".repeat(400_000));
    cache
        .put("big", &big, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get("big").await, Ok(None));
}

/// ElastiCache Serverless only speaks TLS: `rediss://` must work. A local
/// redis-server with TLS on and a throwaway self-signed certificate, which
/// the client is told to trust (a real endpoint's certificate chains to a
/// public root, which the built-in roots cover).
#[tokio::test]
async fn rediss_urls_speak_tls() {
    let dir = std::env::temp_dir().join(format!("redis-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A throwaway CA, and a server certificate for 127.0.0.1 signed by it.
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let (ca, ca_key, cert, key, csr, ext) = (
        p("ca.pem"),
        p("ca.key"),
        p("cert.pem"),
        p("key.pem"),
        p("cert.csr"),
        p("ext.cnf"),
    );
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl (to make test certificates)")
            .success();
        assert!(ok, "openssl {args:?}");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &cert,
    ]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut server = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--tls-cert-file", &cert, "--tls-key-file", &key])
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = redis::Client::build_with_tls(
        format!("rediss://127.0.0.1:{port}/").as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&ca).unwrap()),
        },
    )
    .unwrap();
    let link = Arc::new(RedisLink::with_client(client, Duration::from_secs(2)).unwrap());
    let cache = RedisCache::new(link, Duration::from_secs(2));
    let a = answer("over TLS");
    let put = cache.put("tls-key", &a, Duration::from_secs(30)).await;
    let got = cache.get("tls-key").await;
    // The same server through a plain redis:// URL: no answer.
    let plain = Arc::new(
        RedisLink::new(
            &format!("redis://127.0.0.1:{port}/"),
            Duration::from_millis(500),
            false,
        )
        .unwrap(),
    );
    let plain_get = RedisCache::new(plain, Duration::from_millis(500))
        .get("tls-key")
        .await;
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(put, Ok(()));
    assert_eq!(got, Ok(Some(a)));
    assert_eq!(plain_get, Err(CacheError::Unavailable));
}

#[tokio::test]
async fn a_dead_dynamodb_costs_one_timeout_then_is_skipped() {
    // Nothing listens on port 9: every call fails (or times out).
    let sdk =
        chat_core::aws_sdk_config(Duration::from_millis(250), Duration::from_millis(250)).await;
    let conf = aws_sdk_dynamodb::config::Builder::from(&sdk)
        .endpoint_url("http://127.0.0.1:9")
        .build();
    let store = chat_core::persistence::store::Store::new(
        aws_sdk_dynamodb::Client::from_conf(conf),
        "no-such-table",
        None,
    );
    let cache = DynamoCache::new(Arc::new(store), Duration::from_millis(250));
    let t = Instant::now();
    assert_eq!(cache.get("k").await, Err(CacheError::Unavailable));
    let first = t.elapsed();
    assert!(first < Duration::from_secs(2), "{first:?}");
    // Skipped now: no network at all.
    let t = Instant::now();
    assert_eq!(cache.get("k").await, Err(CacheError::Unavailable));
    assert_eq!(
        cache.put("k", &answer("x"), Duration::from_secs(5)).await,
        Err(CacheError::Unavailable)
    );
    assert!(t.elapsed() < Duration::from_millis(20), "{:?}", t.elapsed());
}
