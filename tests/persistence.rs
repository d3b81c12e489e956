//! Persistence end to end: chat-stream -> SQS -> db-writer's handler ->
//! DynamoDB, history, the read API and auth, against moto (DynamoDB, SQS),
//! Redis and model-sim. Each test makes its own table and queues from
//! template.yaml (scripts/local_aws.py) and uses its own user ids.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use chat_core::persistence::history::{HistoryLimits, RecentBuffer};
use chat_core::persistence::producer::{PersistPath, Persister, Queue};
use chat_core::persistence::store::Store;
use chat_core::persistence::turn::{TURN_SCHEMA_VERSION, TurnRecord, TurnStatus};
use chat_core::persistence::writer::{handle_batch, poll_once};
use chat_core::redis::RedisLink;
use chat_core::util::now_ms;
use e2e::{ChatServer, Event, LocalAws, answer_text, kinds, read_sse, require_redis_url, sim};
use model_sim::Sim;
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

async fn server(sim: &Sim, aws: &LocalAws, extra: &[(&str, &str)]) -> ChatServer {
    let url = sim.url();
    let redis = require_redis_url();
    let aws_env = aws.env();
    let mut env: Vec<(&str, &str)> = vec![("ANTHROPIC_BASE_URL", url.as_str())];
    env.extend(aws_env.iter().map(|(k, v)| (*k, v.as_str())));
    env.push(("REDIS_URL", redis.as_str()));
    // moto on a loaded test machine can take seconds; the production
    // default (2 s) would send turns down the direct path and make the
    // queue assertions depend on machine load.
    env.push(("TURN_QUEUE_TIMEOUT_MS", "15000"));
    env.extend_from_slice(extra);
    ChatServer::start(&env).await
}

fn user() -> String {
    format!("u-{}", uuid::Uuid::new_v4().simple())
}

async fn chat(server: &ChatServer, user: &str, body: Value) -> (u16, Vec<Event>, Value) {
    let resp = reqwest::Client::new()
        .post(server.url("/chat"))
        .header("x-dev-user", user)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status != 200 {
        let v: Value = resp.json().await.unwrap();
        return (status, Vec::new(), v);
    }
    let (events, err) = read_sse(resp, LIMIT).await;
    assert_eq!(err, None);
    let meta = events[0].data.clone();
    (status, events, meta)
}

async fn get(server: &ChatServer, user: &str, path: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(server.url(path))
        .header("x-dev-user", user)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Runs the local poller until the queue gives nothing.
async fn drain(aws: &LocalAws, store: &Store) -> usize {
    let sqs = aws.sqs().await;
    let mut n = 0;
    while let Some(report) = poll_once(store, &sqs, &aws.poller()).await.unwrap() {
        n += report.received;
    }
    n
}

fn spool(dir: &std::path::Path) -> chat_core::persistence::spool::Spool {
    chat_core::persistence::spool::Spool::new(chat_core::persistence::spool::SpoolConfig {
        dir: dir.to_owned(),
        max_bytes: 1024 * 1024,
        log_record: false,
    })
}

fn record(user: &str, conv: &str, at: u64, answer: &str) -> TurnRecord {
    TurnRecord {
        v: TURN_SCHEMA_VERSION,
        turn_id: uuid::Uuid::new_v4().simple().to_string(),
        conversation_id: conv.into(),
        user_id: user.into(),
        started_at_ms: at,
        completed_at_ms: at + 10,
        status: TurnStatus::Completed,
        status_raw: None,
        model: "claude-sim".into(),
        user_message: format!("question at {at}"),
        answer_bytes: answer.len() as u64,
        answer: Some(answer.into()),
        answer_parts: None,
        stop_reason: Some("end_turn".into()),
        input_tokens: 7,
        output_tokens: 11,
        error_code: None,
    }
}

fn sqs_event(bodies: &[(&str, String)]) -> SqsEvent {
    let mut e = SqsEvent::default();
    for (id, body) in bodies {
        let mut m = SqsMessage::default();
        m.message_id = Some((*id).into());
        m.body = Some(body.clone());
        e.records.push(m);
    }
    e
}

#[tokio::test]
async fn a_chat_turn_reaches_dynamodb_through_the_queue_and_the_worker() {
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let sim = sim(5, 2000.0, 15).await;
    let server = server(&sim, &aws, &[]).await;
    let alice = user();

    let (status, events, meta) = chat(&server, &alice, json!({"message": "hello there"})).await;
    assert_eq!(status, 200);
    assert_eq!(kinds(&events).last(), Some(&"done"));
    let conv = meta["conversation_id"].as_str().unwrap().to_owned();
    let turn = meta["turn_id"].as_str().unwrap().to_owned();
    assert!(conv.len() >= 32, "unguessable id: {conv}");
    let text = answer_text(&events);

    // The body ended only after the turn was on the queue: it is there now,
    // and not yet in the table.
    let sqs = aws.sqs().await;
    assert_eq!(aws.depth(&sqs, &aws.queue_url).await, 1);
    assert!(store.recent_turns(&conv, 10).await.unwrap().is_empty());

    assert_eq!(drain(&aws, &store).await, 1);
    let turns = store.recent_turns(&conv, 10).await.unwrap();
    assert_eq!(turns.len(), 1);
    assert_eq!(turns[0].turn_id, turn);
    assert_eq!(turns[0].answer, text);
    assert_eq!(turns[0].user_message, "hello there");
    assert_eq!(turns[0].status, TurnStatus::Completed);
    let done = &events.last().unwrap().data;
    assert_eq!(
        u64::from(turns[0].output_tokens),
        done["usage"]["output_tokens"].as_u64().unwrap()
    );
    let meta = store.get_conversation(&conv).await.unwrap().unwrap();
    assert_eq!(meta.owner, alice);
    assert_eq!(meta.message_count, 2);
    assert_eq!(meta.title, "hello there");
    let day = chat_core::util::utc_day(turns[0].completed_at_ms);
    let (requests, _, output) = store.usage(&alice, &day).await.unwrap();
    assert_eq!(requests, 1);
    assert_eq!(output, u64::from(turns[0].output_tokens));
    assert_eq!(aws.depth(&sqs, &aws.queue_url).await, 0);

    // The read API shows it.
    let (status, body) = get(&server, &alice, &format!("/conversations/{conv}")).await;
    assert_eq!(status, 200, "{body}");
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[1]["content"], text.as_str());
    let (status, list) = get(&server, &alice, "/conversations").await;
    assert_eq!(status, 200);
    assert_eq!(list["conversations"][0]["id"], conv.as_str());
}

#[tokio::test]
async fn the_next_turn_sees_the_previous_one_while_the_worker_is_paused() {
    let aws = LocalAws::create(&[]).await;
    let sim = sim(5, 2000.0, 12).await;
    let server = server(&sim, &aws, &[]).await;
    let bob = user();

    let (_, first, meta) = chat(&server, &bob, json!({"message": "my name is Bob"})).await;
    let conv = meta["conversation_id"].as_str().unwrap().to_owned();
    let first_answer = answer_text(&first);
    // No worker has run: the turn is only on the queue and in the buffer.
    let (status, second, meta2) = chat(
        &server,
        &bob,
        json!({"message": "what is my name?", "conversation_id": conv}),
    )
    .await;
    assert_eq!(status, 200, "{meta2}");
    assert_eq!(meta2["conversation_id"], conv.as_str());
    assert_eq!(kinds(&second).last(), Some(&"done"));

    let reqs = sim.requests();
    let last = reqs.last().unwrap();
    let messages = last["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], "my name is Bob");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], first_answer.as_str());
    assert_eq!(messages[2]["content"], "what is my name?");

    // After the worker has run, the history is the same (DynamoDB and the
    // buffer agree; nothing is doubled).
    let store = aws.store().await;
    // At least once: a send that timed out on the client may have landed
    // too, and the worker then sees the copy as a duplicate.
    assert!(drain(&aws, &store).await >= 2);
    assert_eq!(
        store
            .get_conversation(&conv)
            .await
            .unwrap()
            .unwrap()
            .message_count,
        4
    );
    chat(
        &server,
        &bob,
        json!({"message": "and again?", "conversation_id": conv}),
    )
    .await;
    let reqs = sim.requests();
    let messages = reqs.last().unwrap()["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 5, "{messages:?}");
    assert_eq!(messages[3]["content"], answer_text(&second).as_str());
}

#[tokio::test]
async fn a_redelivered_message_writes_nothing_twice() {
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let carol = user();
    let conv = format!("c{}", uuid::Uuid::new_v4().simple());
    let rec = record(&carol, &conv, now_ms(), "the answer");
    let body = rec.encode();

    // The same message twice in one batch, then again in a later batch.
    let (resp, report) = handle_batch(
        &store,
        &sqs_event(&[("m1", body.clone()), ("m2", body.clone())]),
    )
    .await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!((report.written, report.duplicates), (1, 1));
    let (resp, report) = handle_batch(&store, &sqs_event(&[("m1", body)])).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!((report.written, report.duplicates), (0, 1));

    let meta = store.get_conversation(&conv).await.unwrap().unwrap();
    assert_eq!(meta.message_count, 2);
    let day = chat_core::util::utc_day(rec.completed_at_ms);
    assert_eq!(store.usage(&carol, &day).await.unwrap(), (1, 7, 11));
    assert_eq!(store.recent_turns(&conv, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_poison_message_lands_in_the_dlq_while_the_rest_of_its_batch_is_written() {
    // Short visibility timeout and two receives, so redrive happens within
    // the test; the definitions are otherwise the template's.
    let aws = LocalAws::create(&[
        ("TurnQueueVisibilityTimeout", "1"),
        ("TurnMaxReceiveCount", "2"),
    ])
    .await;
    let store = aws.store().await;
    let sqs = aws.sqs().await;
    let dave = user();
    let conv = format!("c{}", uuid::Uuid::new_v4().simple());
    let t0 = now_ms();
    let good: Vec<TurnRecord> = (0..3)
        .map(|i| record(&dave, &conv, t0 + i, &format!("answer {i}")))
        .collect();
    let mut bodies: Vec<String> = good.iter().map(TurnRecord::encode).collect();
    bodies.insert(1, "{not json".into());
    let mut future: Value = serde_json::from_str(&good[0].encode()).unwrap();
    future["v"] = json!(99);
    future["turn_id"] = json!("from-the-future");
    bodies.push(future.to_string());
    for b in &bodies {
        sqs.send_message()
            .queue_url(&aws.queue_url)
            .message_body(b)
            .send()
            .await
            .unwrap();
    }

    let first = poll_once(&store, &sqs, &aws.poller())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.received, 5);
    assert_eq!(first.written, 3, "{first:?}");
    assert_eq!(first.poison, 2);
    assert_eq!(store.recent_turns(&conv, 10).await.unwrap().len(), 3);

    // The two poison messages come back after the visibility timeout, fail
    // again, and SQS moves them to the DLQ.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while aws.depth(&sqs, &aws.dlq_url).await < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "poison did not reach the DLQ"
        );
        let _ = poll_once(&store, &sqs, &aws.poller()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(aws.depth(&sqs, &aws.dlq_url).await, 2);
    assert_eq!(aws.depth(&sqs, &aws.queue_url).await, 0);
    let dlq = sqs
        .receive_message()
        .queue_url(&aws.dlq_url)
        .max_number_of_messages(10)
        .send()
        .await
        .unwrap();
    let mut dead: Vec<&str> = dlq.messages().iter().filter_map(|m| m.body()).collect();
    dead.sort();
    assert!(dead[0].starts_with("{\"") && dead[0].contains("from-the-future"));
    assert_eq!(dead[1], "{not json");
    let meta = store.get_conversation(&conv).await.unwrap().unwrap();
    assert_eq!(meta.message_count, 6);
}

/// About 1 MB of mixed one- to four-byte characters.
fn big_answer() -> String {
    let unit = "Grüße, 世界! 😀 ";
    unit.repeat(1_000_000 / unit.len() + 1)
}

#[tokio::test]
async fn a_one_megabyte_answer_round_trips_through_the_queue() {
    let aws = LocalAws::create(&[]).await;
    let store = std::sync::Arc::new(aws.store().await);
    let persister = Persister::new(
        store.clone(),
        Some(Queue {
            client: aws.sqs().await,
            url: aws.queue_url.clone(),
        }),
        Some(std::sync::Arc::new(RecentBuffer::new(
            std::sync::Arc::new(
                RedisLink::new(&require_redis_url(), Duration::from_millis(500), false).unwrap(),
            ),
            HistoryLimits {
                max_turns: 20,
                max_tokens: 8000,
                buffer_ttl: Duration::from_secs(60),
            },
        ))),
        spool(&std::env::temp_dir().join(format!("spool-{}", uuid::Uuid::new_v4().simple()))),
    );
    let erin = user();
    let conv = format!("c{}", uuid::Uuid::new_v4().simple());
    let answer = big_answer();
    assert!(answer.len() > 1_000_000);
    let rec = record(&erin, &conv, now_ms(), &answer);
    // Over 256 KiB: the parts go to the table, the reference to the queue.
    let path = persister.persist(rec.clone(), true).await;
    assert_eq!(path, PersistPath::Queued);
    assert!(
        store
            .turns_page(&conv, 10, None)
            .await
            .unwrap()
            .0
            .is_empty()
    );
    assert_eq!(drain(&aws, &store).await, 1);

    let (turns, next) = store.turns_page(&conv, 10, None).await.unwrap();
    assert_eq!(next, None);
    assert_eq!(turns.len(), 1);
    assert!(turns[0].answer_parts.unwrap() >= 4);
    assert_eq!(turns[0].answer.len(), answer.len());
    assert!(turns[0].answer == answer, "the stored answer differs");

    // And through the read API.
    let sim = sim(5, 2000.0, 5).await;
    let server = server(&sim, &aws, &[]).await;
    let (status, body) = get(&server, &erin, &format!("/conversations/{conv}")).await;
    assert_eq!(status, 200);
    assert!(body["messages"][1]["content"].as_str().unwrap() == answer);
}

#[tokio::test]
async fn a_one_megabyte_answer_goes_through_sqs_by_claim_check() {
    let aws = LocalAws::create(&[]).await;
    let store = std::sync::Arc::new(aws.store().await);
    let sqs = aws.sqs().await;
    let frank = user();
    let conv = format!("c{}", uuid::Uuid::new_v4().simple());
    let answer = big_answer();
    let mut rec = record(&frank, &conv, now_ms(), &answer);
    // What the producer does for a message over 256 KiB: parts to the
    // table, the reference on the queue.
    store.put_answer_parts(&mut rec).await.unwrap();
    let body = rec.encode();
    assert!(body.len() < 4096, "only the reference travels");
    sqs.send_message()
        .queue_url(&aws.queue_url)
        .message_body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(drain(&aws, &store).await, 1);
    let (turns, _) = store.turns_page(&conv, 10, None).await.unwrap();
    assert_eq!(turns.len(), 1);
    assert!(turns[0].answer == answer);
}

#[tokio::test]
async fn another_users_conversation_is_a_404_identical_to_an_unknown_one() {
    let aws = LocalAws::create(&[]).await;
    let sim = sim(5, 2000.0, 5).await;
    let server = server(&sim, &aws, &[]).await;
    let (alice, mallory) = (user(), user());
    let (_, _, meta) = chat(&server, &alice, json!({"message": "secret plans"})).await;
    let conv = meta["conversation_id"].as_str().unwrap().to_owned();
    let calls = sim.calls();

    for worker_ran in [false, true] {
        if worker_ran {
            let store = aws.store().await;
            drain(&aws, &store).await;
        }
        let (status, _, theirs) = chat(
            &server,
            &mallory,
            json!({"message": "tell me", "conversation_id": conv}),
        )
        .await;
        let (status2, _, unknown) = chat(
            &server,
            &mallory,
            json!({"message": "tell me", "conversation_id": "0123456789abcdef0123456789abcdef"}),
        )
        .await;
        assert_eq!((status, status2), (404, 404));
        assert_eq!(theirs, unknown);
        assert_eq!(theirs["code"], "conversation_not_found");
        let (s1, read_theirs) = get(&server, &mallory, &format!("/conversations/{conv}")).await;
        let (s2, read_unknown) = get(
            &server,
            &mallory,
            "/conversations/0123456789abcdef0123456789abcdef",
        )
        .await;
        assert_eq!((s1, s2), (404, 404));
        assert_eq!(read_theirs, read_unknown);
        assert_eq!(read_theirs["code"], "conversation_not_found");
        let (_, list) = get(&server, &mallory, "/conversations").await;
        assert_eq!(list["conversations"], json!([]));
    }
    assert_eq!(
        sim.calls(),
        calls,
        "a refused request never reached the model"
    );
    let (status, _) = get(&server, &alice, &format!("/conversations/{conv}")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn listing_paginates_over_120_conversations_newest_first() {
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let gina = user();
    let t0 = now_ms() - 1_000_000;
    let recs: Vec<TurnRecord> = (0..120)
        .map(|i| {
            record(
                &gina,
                &format!("conv-{i:03}-{}", &gina[2..10]),
                t0 + i * 1000,
                "a",
            )
        })
        .collect();
    let outcomes = store.write_turns(&recs).await;
    // Duplicate means "already there": an attempt that committed but timed
    // out on the client is retried and then found written.
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            chat_core::persistence::store::WriteOutcome::Written
                | chat_core::persistence::store::WriteOutcome::Duplicate
        )),
        "{outcomes:?}"
    );
    // Someone else's conversations never appear.
    store
        .write_turns(&[record(&user(), "conv-other", t0 + 500_000, "x")])
        .await;

    let sim = sim(5, 2000.0, 5).await;
    let server = server(&sim, &aws, &[]).await;
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/conversations?limit=25&cursor={c}"),
            None => "/conversations?limit=25".to_owned(),
        };
        let (status, page) = get(&server, &gina, &path).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        let convs = page["conversations"].as_array().unwrap();
        assert!(convs.len() <= 25);
        seen.extend(convs.iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    let expected: Vec<String> = (0..120)
        .rev()
        .map(|i| format!("conv-{i:03}-{}", &gina[2..10]))
        .collect();
    assert_eq!(seen, expected, "all 120, each once, newest first");
    assert!((5..=6).contains(&pages), "{pages} pages");

    // A cursor from another user's listing is refused, not followed.
    let (_, first) = get(&server, &gina, "/conversations?limit=1").await;
    let c = first["next_cursor"].as_str().unwrap();
    let (status, err) = get(&server, &user(), &format!("/conversations?cursor={c}")).await;
    assert_eq!(status, 400);
    assert_eq!(err["code"], "invalid_cursor");
    let (status, _) = get(&server, &gina, "/conversations?limit=0").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn with_sqs_down_the_turn_is_in_dynamodb_anyway() {
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let sim = sim(5, 2000.0, 8).await;
    // Nothing listens on this port: every SQS call fails to connect.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let server = server(&sim, &aws, &[("AWS_ENDPOINT_URL_SQS", dead.as_str())]).await;
    let hank = user();
    let (status, events, meta) = chat(&server, &hank, json!({"message": "still there?"})).await;
    assert_eq!(status, 200);
    let conv = meta["conversation_id"].as_str().unwrap();
    // By the time the body ended, the turn was written directly.
    let turns = store.recent_turns(conv, 10).await.unwrap();
    assert_eq!(turns.len(), 1);
    assert_eq!(turns[0].answer, answer_text(&events));
    let sqs = aws.sqs().await;
    assert_eq!(aws.depth(&sqs, &aws.queue_url).await, 0);
    // /health tells: the queue is failing, the table answers.
    let (_, health) = get(&server, &hank, "/health?probe=1").await;
    let deps = &health["dependencies"];
    assert_eq!(deps["sqs"]["state"], "degraded", "{health}");
    assert_eq!(deps["dynamodb"]["state"], "ok", "{health}");
    assert_eq!(health["status"], "degraded");
}

#[tokio::test]
async fn api_keys_authenticate_before_any_other_work() {
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let sim = sim(5, 2000.0, 5).await;
    let server = server(&sim, &aws, &[("AUTH_MODE", "api_key")]).await;
    let ivy = user();
    let key = chat_core::auth::new_api_key();
    store
        .put_api_key(&chat_core::auth::hash_key(&key), &ivy, "test", now_ms())
        .await
        .unwrap();
    let client = reqwest::Client::new();
    let body = json!({"message": "hi"});

    for (auth, code) in [
        (None, "missing_credentials"),
        (Some("Bearer ck_wrong".to_owned()), "invalid_credentials"),
    ] {
        let mut req = client.post(server.url("/chat")).json(&body);
        if let Some(a) = &auth {
            req = req.header("authorization", a);
        }
        // x-dev-user means nothing in api_key mode.
        let resp = req.header("x-dev-user", &ivy).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        assert!(resp.headers().contains_key("www-authenticate"));
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["code"], code);
        let resp = client
            .get(server.url("/conversations"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    assert_eq!(sim.calls(), 0, "no model call without credentials");

    let resp = client
        .post(server.url("/chat"))
        .header("authorization", format!("Bearer {key}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (events, _) = read_sse(resp, LIMIT).await;
    let conv = events[0].data["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    drain(&aws, &store).await;
    assert_eq!(
        store.get_conversation(&conv).await.unwrap().unwrap().owner,
        ivy
    );
    let resp = client
        .get(server.url("/conversations"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["conversations"][0]["id"], conv.as_str());
}

#[tokio::test]
async fn an_interrupted_turn_is_recorded_as_such() {
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    // Slow enough that the client leaves mid-answer.
    let sim = sim(5, 20.0, 200).await;
    // With the default (FINISH_ON_DISCONNECT=true) the answer would be
    // finished for a resume and stored complete: tests/live.rs covers that.
    let server = server(&sim, &aws, &[("FINISH_ON_DISCONNECT", "false")]).await;
    let jack = user();
    let resp = reqwest::Client::new()
        .post(server.url("/chat"))
        .header("x-dev-user", &jack)
        .json(&json!({"message": "a long story please"}))
        .send()
        .await
        .unwrap();
    let mut stream = e2e::body_stream(resp);
    let (events, _) = e2e::read_deltas(&mut stream, 1).await;
    let conv = events[0].data["conversation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(stream);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        drain(&aws, &store).await;
        let turns = store.recent_turns(&conv, 10).await.unwrap();
        if let Some(t) = turns.first() {
            assert_eq!(t.status, TurnStatus::Interrupted);
            assert_eq!(t.error_code.as_deref(), Some("client_disconnected"));
            assert!(!t.answer.is_empty());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no interrupted turn"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn with_redis_down_the_next_turn_still_sees_the_previous_one() {
    let aws = LocalAws::create(&[]).await;
    let sim = sim(5, 2000.0, 6).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("redis://{}", l.local_addr().unwrap())
    };
    // The buffer cannot take the turn, so the producer writes it to the
    // table directly before the first response ends (and queues it too).
    let server = server(&sim, &aws, &[("REDIS_URL", dead.as_str())]).await;
    let kim = user();
    let (_, first, meta) = chat(&server, &kim, json!({"message": "remember 42"})).await;
    let conv = meta["conversation_id"].as_str().unwrap().to_owned();
    let (status, _, _) = chat(
        &server,
        &kim,
        json!({"message": "what number?", "conversation_id": conv}),
    )
    .await;
    assert_eq!(status, 200);
    let reqs = sim.requests();
    let messages = reqs.last().unwrap()["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[1]["content"], answer_text(&first).as_str());
    // The queued copies are duplicates for the worker: nothing doubles.
    let store = aws.store().await;
    drain(&aws, &store).await;
    assert_eq!(
        store
            .get_conversation(&conv)
            .await
            .unwrap()
            .unwrap()
            .message_count,
        4
    );
}

#[tokio::test]
async fn history_merges_the_table_and_a_partial_buffer_in_order() {
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let sim = sim(5, 2000.0, 6).await;
    let server = server(&sim, &aws, &[]).await;
    let lee = user();
    let (_, first, meta) = chat(&server, &lee, json!({"message": "one"})).await;
    let conv = meta["conversation_id"].as_str().unwrap().to_owned();
    let (_, second, _) = chat(
        &server,
        &lee,
        json!({"message": "two", "conversation_id": conv}),
    )
    .await;
    drain(&aws, &store).await;
    // The buffer loses the conversation (eviction, expiry, a Redis
    // restart): the table alone answers, then the buffer holds only the
    // newest turn and the two are merged.
    let link = RedisLink::new(&require_redis_url(), Duration::from_millis(500), false).unwrap();
    let mut del = redis::pipe();
    del.del(format!("hist:{{{conv}}}"));
    assert!(
        link.pipe::<()>(&del, Duration::from_secs(1))
            .await
            .is_some()
    );
    let (_, third, _) = chat(
        &server,
        &lee,
        json!({"message": "three", "conversation_id": conv}),
    )
    .await;
    let (status, _, _) = chat(
        &server,
        &lee,
        json!({"message": "four", "conversation_id": conv}),
    )
    .await;
    assert_eq!(status, 200);
    let reqs = sim.requests();
    let contents: Vec<String> = reqs.last().unwrap()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        contents,
        [
            "one".to_owned(),
            answer_text(&first),
            "two".to_owned(),
            answer_text(&second),
            "three".to_owned(),
            answer_text(&third),
            "four".to_owned(),
        ]
    );
}

#[tokio::test]
async fn turns_written_out_of_order_move_the_summary_only_forward_with_the_first_title() {
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let owner = user();
    let t0 = 1_700_000_000_000u64;
    let first = record(&owner, "conv-order", t0, "a");
    let second = record(&owner, "conv-order", t0 + 60_000, "b");
    let third = record(&owner, "conv-order", t0 + 120_000, "c");
    // The newest arrives first, the oldest last (a standard queue, two
    // writers, a redelivery): one call each.
    for r in [&third, &first, &second] {
        let out = store.write_turns(std::slice::from_ref(r)).await;
        assert!(
            matches!(out[0], chat_core::persistence::store::WriteOutcome::Written),
            "{out:?}"
        );
    }
    let meta = store.get_conversation("conv-order").await.unwrap().unwrap();
    assert_eq!(meta.updated_at_ms, third.completed_at_ms, "never backwards");
    assert_eq!(meta.created_at_ms, first.started_at_ms);
    assert_eq!(
        meta.title, first.user_message,
        "the title of the earliest turn"
    );
    assert_eq!(meta.message_count, 6);
    // The list order follows updated_at too.
    let (list, _) = store.list_conversations(&owner, 10, None).await.unwrap();
    assert_eq!(list[0].updated_at_ms, third.completed_at_ms);
}

#[tokio::test]
async fn a_turn_nobody_takes_is_spooled_and_sent_by_the_next_invocation() {
    let aws = LocalAws::create(&[]).await;
    let dir = std::env::temp_dir().join(format!("spool-{}", uuid::Uuid::new_v4().simple()));
    let owner = user();
    let conv = format!("c{}", uuid::Uuid::new_v4().simple());
    // No queue, and a table that does not exist: nothing takes the turn.
    let broken = Persister::new(
        std::sync::Arc::new(
            chat_core::store_for("no-such-table", None, chat_core::StoreRole::Request).await,
        ),
        None,
        None,
        spool(&dir),
    );
    let lost = record(&owner, &conv, now_ms(), "the lost answer");
    assert_eq!(broken.persist(lost.clone(), true).await, PersistPath::Lost);
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1, "spooled under /tmp");
    // The environment's next process (same /tmp) sends it with its own
    // first turn.
    let store = std::sync::Arc::new(aws.store().await);
    let next = Persister::new(store.clone(), None, None, spool(&dir));
    let later = record(&owner, &conv, now_ms() + 1, "the next answer");
    assert_eq!(next.persist(later, false).await, PersistPath::Direct);
    let (turns, _) = store.turns_page(&conv, 10, None).await.unwrap();
    let answers: Vec<&str> = turns.iter().map(|t| t.answer.as_str()).collect();
    assert!(answers.contains(&"the lost answer"), "{answers:?}");
    assert!(answers.contains(&"the next answer"), "{answers:?}");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "the spool is empty"
    );
    // A full spool keeps nothing (and says so).
    let tiny = Persister::new(
        std::sync::Arc::new(
            chat_core::store_for("no-such-table", None, chat_core::StoreRole::Request).await,
        ),
        None,
        None,
        chat_core::persistence::spool::Spool::new(chat_core::persistence::spool::SpoolConfig {
            dir: dir.clone(),
            max_bytes: 10,
            log_record: false,
        }),
    );
    assert_eq!(tiny.persist(lost, true).await, PersistPath::Lost);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[tokio::test]
async fn a_newer_producers_turn_is_stored_not_sent_to_the_dlq() {
    let aws = LocalAws::create(&[]).await;
    let store = aws.store().await;
    let conv = format!("c{}", uuid::Uuid::new_v4().simple());
    let rec = record(&user(), &conv, now_ms(), "an answer from the future");
    let mut v: Value = serde_json::from_str(&rec.encode()).unwrap();
    v["status"] = "paused".into();
    v["field_added_later"] = json!({"any": ["thing"]});
    let (resp, _) = handle_batch(&store, &sqs_event(&[("m1", v.to_string())])).await;
    assert!(resp.batch_item_failures.is_empty(), "stored, not poison");
    let (turns, _) = store.turns_page(&conv, 10, None).await.unwrap();
    assert_eq!(turns.len(), 1);
    assert_eq!(turns[0].answer, "an answer from the future");
    assert_eq!(
        turns[0].status,
        TurnStatus::Other,
        "an unknown status is not 'completed'"
    );
}

/// `DELETE /conversations/{id}`: only the owner, with the same 404 for
/// others as for an unknown id; afterwards nothing of it is readable: not
/// through the API, not in the recent-turns buffer, not in the table (its
/// summary, its turns and the parts of a claim-checked answer).
#[tokio::test]
async fn a_deleted_conversation_leaves_nothing_readable() {
    let aws = LocalAws::create(&[]).await;
    let sim = sim(5, 2000.0, 5).await;
    let server = server(&sim, &aws, &[]).await;
    let store = aws.store().await;
    let (owner, other) = (user(), user());
    let (_, _, meta) = chat(&server, &owner, json!({"message": "forget me"})).await;
    let conv = meta["conversation_id"].as_str().unwrap().to_owned();
    chat(
        &server,
        &owner,
        json!({"message": "and this", "conversation_id": conv}),
    )
    .await;
    // A long answer in the same conversation: its parts are items too.
    let mut big = record(&owner, &conv, now_ms(), &big_answer());
    store.put_answer_parts(&mut big).await.unwrap();
    store.write_turns(&[big]).await;
    drain(&aws, &store).await;
    let (status, body) = get(&server, &owner, &format!("/conversations/{conv}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"].as_array().unwrap().len(), 6);

    let delete = |who: String, id: String| {
        let url = server.url(&format!("/conversations/{id}"));
        async move {
            let r = reqwest::Client::new()
                .delete(url)
                .header("x-dev-user", who)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let theirs = delete(other.clone(), conv.clone()).await;
    let unknown = delete(other.clone(), "0123456789abcdef0123456789abcdef".into()).await;
    assert_eq!(
        theirs, unknown,
        "someone else's is the same 404 as an unknown one"
    );
    assert_eq!(theirs.0, 404);
    assert_eq!(
        get(&server, &owner, &format!("/conversations/{conv}"))
            .await
            .0,
        200,
        "a refused delete deletes nothing"
    );

    let (status, body) = delete(owner.clone(), conv.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], true);
    assert_eq!(
        get(&server, &owner, &format!("/conversations/{conv}"))
            .await
            .0,
        404
    );
    let (_, list) = get(&server, &owner, "/conversations").await;
    assert_eq!(list["conversations"], json!([]), "{list}");
    let (status, _, _) = chat(
        &server,
        &owner,
        json!({"message": "what did I say?", "conversation_id": conv}),
    )
    .await;
    assert_eq!(status, 404, "no history is left to continue from");
    let (turns, _) = store.turns_page(&conv, 100, None).await.unwrap();
    assert!(turns.is_empty());
    assert!(store.get_conversation(&conv).await.unwrap().is_none());
    assert_eq!(
        store.delete_conversation(&conv).await.unwrap(),
        0,
        "no item of its partition is left (summary, turns, parts)"
    );
}
