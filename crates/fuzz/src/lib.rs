#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)] // a harness asserts: a failed assertion is its finding

//! Fuzz harnesses for every decoder of untrusted input, on stable Rust
//! (cargo-fuzz needs a nightly toolchain, which cannot be installed here).
//!
//! Each target is a plain `fn(&[u8])` that must not panic on any input and
//! asserts what must hold of what it accepts (a property, not only "no
//! crash"). The same functions run:
//!
//! - under `cargo test` (`tests/targets.rs`): every file of the target's
//!   corpus (`corpus/<target>/`, crashes found earlier included), then
//!   inputs mutated from it for a short budget (`FUZZ_BUDGET_MS`, default
//!   1500 per target; `FUZZ_SEED` replays a run);
//! - under AFL++ (`make fuzz`): `fuzz-afl <target>` reads one input from
//!   stdin, built with coverage instrumentation (see `scripts/fuzz.sh`).
//!
//! A crash found either way is saved as a corpus file and so becomes a
//! regression test of every later `cargo test`.
//!
//! Targets: the `/chat` and OpenAI-route request parsers and validators,
//! the Anthropic and OpenAI SSE decoders, Bedrock's events into chunks (the
//! part we own: the SDK decodes the binary event stream), the SQS turn
//! decoder, the page cursor decoder, and JWT verification (header, key
//! choice, signature, claims).

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chat_core::chat::request::Limits;
use chat_core::provider::{Chunk, Decoder};

pub type Target = fn(&[u8]);

/// Every target, by name (the corpus folder and `fuzz-afl`'s argument).
pub const TARGETS: &[(&str, Target)] = &[
    ("chat_request", chat_request),
    ("openai_request", openai_request),
    ("anthropic_sse", anthropic_sse),
    ("openai_sse", openai_sse),
    ("bedrock_events", bedrock_events),
    ("sqs_turn", sqs_turn),
    ("cursor", cursor),
    ("jwt", jwt),
];

pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

const LIMITS: Limits = Limits {
    max_body_bytes: 256 * 1024,
    max_message_chars: 100_000,
    max_system_chars: 50_000,
    max_tokens: 8192,
    default_max_tokens: 1024,
};

fn check_turn(t: &chat_core::chat::request::ChatRequest) {
    assert!(t.message.chars().count() <= LIMITS.max_message_chars);
    assert!(
        t.system
            .as_ref()
            .is_none_or(|s| s.chars().count() <= LIMITS.max_system_chars)
    );
    assert!(
        t.max_tokens
            .is_none_or(|m| (1..=LIMITS.max_tokens).contains(&m))
    );
    assert!(
        t.temperature
            .is_none_or(|v| v.is_finite() && (0.0..=1.0).contains(&v))
    );
    assert!(
        t.conversation_id
            .as_deref()
            .is_none_or(chat_core::chat::request::valid_conversation_id)
    );
}

/// `POST /chat`'s body: accepted requests are within every limit; a
/// refusal is a 4xx naming a code.
pub fn chat_request(data: &[u8]) {
    match chat_core::chat::request::parse_chat_request(data, &LIMITS) {
        Ok(req) => check_turn(&req),
        Err(e) => {
            assert!(e.status.is_client_error(), "{e:?}");
            assert!(!e.code.is_empty());
        }
    }
}

/// `POST /v1/chat/completions`' body; the first byte picks the headers.
pub fn openai_request(data: &[u8]) {
    let (flags, body) = data.split_first().map_or((0, data), |(f, b)| (*f, b));
    let conversation = (flags & 1 == 1).then_some("abc-123");
    let persist = (flags & 2 == 2).then_some("true");
    match chat_core::api::openai::request::parse(body, &LIMITS, conversation, persist) {
        Ok(c) => {
            check_turn(&c.turn);
            assert!(c.turn.stop.len() <= 4);
        }
        Err(e) => assert!(e.status.is_client_error(), "{e:?}"),
    }
}

/// What a decoder makes of `parts`, fed in that order.
fn decode(mut d: impl Decoder, parts: &[&[u8]]) -> Vec<String> {
    let mut out = VecDeque::new();
    for p in parts {
        d.feed(p, &mut out);
    }
    out.iter().map(|r| format!("{r:?}")).collect()
}

/// The same bytes fed whole and in pieces (cut where the input's own
/// bytes say) must decode to the same chunks: a network read can end
/// anywhere.
fn split_invariant<D: Decoder>(data: &[u8], make: impl Fn() -> D) {
    let whole = decode(make(), &[data]);
    let mut parts = Vec::new();
    let mut rest = data;
    let mut rng = fastrand::Rng::with_seed(data.iter().map(|b| u64::from(*b)).sum());
    while !rest.is_empty() {
        let n = rng.usize(1..=rest.len().min(17));
        let (a, b) = rest.split_at(n);
        parts.push(a);
        rest = b;
    }
    let pieces = decode(make(), &parts);
    assert_eq!(whole, pieces, "a split read decoded differently");
    for r in whole.iter().filter(|r| r.starts_with("Ok(Delta(")) {
        assert!(r.len() > "Ok(Delta(\"\"))".len(), "an empty delta: {r}");
    }
}

/// Anthropic Messages API SSE bytes into chunks.
pub fn anthropic_sse(data: &[u8]) {
    split_invariant(data, chat_core::provider::anthropic::decoder);
}

/// OpenAI-compatible SSE bytes into chunks.
pub fn openai_sse(data: &[u8]) {
    split_invariant(data, chat_core::provider::openai::decoder);
}

/// Bedrock ConverseStream events (as the SDK hands them over) into chunks:
/// each input byte pair picks an event and its values.
pub fn bedrock_events(data: &[u8]) {
    use aws_sdk_bedrockruntime::types::{
        ContentBlockDelta, ContentBlockDeltaEvent, ContentBlockStopEvent, ConversationRole,
        ConverseStreamMetadataEvent, ConverseStreamOutput as Ev, MessageStartEvent,
        MessageStopEvent, StopReason, TokenUsage,
    };
    let mut rng = fastrand::Rng::with_seed(data.iter().map(|b| u64::from(*b)).sum());
    let text = String::from_utf8_lossy(data).into_owned();
    for pick in data.iter().take(64) {
        let ev = match pick % 5 {
            0 => Ev::ContentBlockDelta(
                ContentBlockDeltaEvent::builder()
                    .delta(ContentBlockDelta::Text(
                        text.chars().take(rng.usize(0..8)).collect(),
                    ))
                    .content_block_index(0)
                    .build()
                    .unwrap_or_else(|_| unreachable_build()),
            ),
            1 => Ev::MessageStop(
                MessageStopEvent::builder()
                    .stop_reason(StopReason::from(text.as_str()))
                    .build()
                    .unwrap_or_else(|_| unreachable_build()),
            ),
            2 => Ev::Metadata(
                ConverseStreamMetadataEvent::builder()
                    .usage(
                        TokenUsage::builder()
                            .input_tokens(rng.i32(..))
                            .output_tokens(rng.i32(..))
                            .total_tokens(rng.i32(..))
                            .build()
                            .unwrap_or_else(|_| unreachable_build()),
                    )
                    .build(),
            ),
            3 => Ev::MessageStart(
                MessageStartEvent::builder()
                    .role(ConversationRole::Assistant)
                    .build()
                    .unwrap_or_else(|_| unreachable_build()),
            ),
            _ => Ev::ContentBlockStop(
                ContentBlockStopEvent::builder()
                    .content_block_index(rng.i32(..))
                    .build()
                    .unwrap_or_else(|_| unreachable_build()),
            ),
        };
        match chat_core::provider::bedrock::event_to_chunk(&ev) {
            Some(Chunk::Delta(t)) => assert!(!t.is_empty(), "an empty delta"),
            Some(Chunk::Stop {
                input_tokens,
                output_tokens,
                ..
            }) => {
                // Negative counts from the wire are dropped, never wrapped.
                assert!(input_tokens.is_none_or(|n| n <= i32::MAX as u32));
                assert!(output_tokens.is_none_or(|n| n <= i32::MAX as u32));
            }
            _ => {}
        }
    }
}

/// The SDK builders above only fail on a missing required field, which
/// every call sets; a failure is a harness bug, reported as one.
fn unreachable_build<T>() -> T {
    panic!("a Bedrock event builder refused the fields the harness sets")
}

/// An SQS message body into a turn: what decodes, encodes and decodes to
/// the same turn.
pub fn sqs_turn(data: &[u8]) {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    use chat_core::persistence::turn::TurnRecord;
    if let Ok(t) = TurnRecord::decode(body) {
        let again = TurnRecord::decode(&t.encode()).expect("an encoded turn decodes");
        assert_eq!(format!("{t:?}"), format!("{again:?}"));
    }
}

/// A page cursor: only the caller's partition, only the named keys; what
/// decodes encodes and decodes to the same key.
pub fn cursor(data: &[u8]) {
    use chat_core::persistence::store::{decode_cursor, encode_cursor};
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = decode_cursor(s, ("GSI1PK", "USER#fuzz"), &["GSI1SK", "PK", "SK"]) {
        assert_eq!(
            key.get("GSI1PK")
                .and_then(|v| v.as_s().ok())
                .map(String::as_str),
            Some("USER#fuzz")
        );
        assert!(key.len() == 4);
        let again = decode_cursor(
            &encode_cursor(&key),
            ("GSI1PK", "USER#fuzz"),
            &["GSI1SK", "PK", "SK"],
        )
        .expect("an encoded cursor decodes");
        assert_eq!(key, again);
    }
}

const ISSUER: &str = "https://issuer.fuzz.example";

struct Jwt {
    rt: tokio::runtime::Runtime,
    auth: chat_core::auth::jwt::JwtAuth,
    key: oidc_sim::keys::SigningKey,
}

fn jwt_env() -> &'static Jwt {
    static ENV: OnceLock<Jwt> = OnceLock::new();
    ENV.get_or_init(|| {
        let key = oidc_sim::keys::es256().unwrap_or_else(|e| panic!("ES256 key: {e}"));
        let jwks = serde_json::json!({ "keys": [key.jwk] }).to_string();
        let config = chat_core::auth::JwtConfig {
            issuer: ISSUER.into(),
            audiences: vec!["chat-stream".into()],
            cognito_client_id: None,
            // Nothing listens there: an unknown kid costs one refused
            // connection per process, then the refresh interval holds.
            jwks_url: "http://127.0.0.1:9/jwks.json".into(),
            user_claim: "sub".into(),
            leeway_secs: 60,
            jwks_ttl: Duration::from_secs(86_400),
            jwks_min_refresh: Duration::from_secs(86_400),
            max_token_bytes: 8192,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let auth = chat_core::auth::jwt::JwtAuth::with_keys(
            config,
            reqwest::Client::new(),
            jwks.as_bytes(),
        );
        Jwt { rt, auth, key }
    })
}

/// JWT verification. First byte 1: the rest is a claims document, signed
/// with the issuer's real key (the claims checks with a valid signature);
/// anything else is a token as sent (header, key choice, signature), which
/// can never be valid: no input can carry a signature of our key.
pub fn jwt(data: &[u8]) {
    let env = jwt_env();
    if let Some((1, claims)) = data.split_first() {
        let Ok(claims) = serde_json::from_slice::<serde_json::Value>(claims) else {
            return;
        };
        let mut header = jsonwebtoken::Header::new(env.key.alg);
        header.kid = Some(env.key.kid.clone());
        let Ok(token) = jsonwebtoken::encode(&header, &claims, &env.key.encoding) else {
            return;
        };
        if let Ok(user) = env.rt.block_on(env.auth.verify(&token)) {
            assert_eq!(claims["iss"], ISSUER, "accepted from another issuer");
            assert_eq!(claims["sub"].as_str(), Some(user.as_ref()));
            let aud_ok = claims["aud"] == "chat-stream"
                || claims["aud"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|v| v == "chat-stream"));
            assert!(aud_ok, "accepted for another audience");
            assert!(claims["exp"].is_number(), "accepted without exp");
        }
        return;
    }
    let token = String::from_utf8_lossy(data);
    let r = env.rt.block_on(env.auth.verify(&token));
    assert!(r.is_err(), "a token nobody signed was accepted");
}

/// A corpus file's name: the input's hash, so the same input is one file.
pub fn corpus_name(data: &[u8]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Tokens that make mutated inputs reach deeper: the formats' own syntax.
const DICTIONARY: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"\n",
    b"\n\n",
    b"\r\n",
    b"data: ",
    b"event: ",
    b"id: ",
    b": ",
    b"[DONE]",
    b"\"message\"",
    b"\"messages\"",
    b"\"role\"",
    b"\"content\"",
    b"\"type\"",
    b"\"delta\"",
    b"\"text\"",
    b"\"choices\"",
    b"\"usage\"",
    b"\\u0000",
    b"\\ud800",
    b"eyJ",
    b".",
    b"\"alg\"",
    b"\"kid\"",
    b"\"none\"",
    b"\"HS256\"",
    b"\"exp\"",
    b"\"iss\"",
    b"\"aud\"",
    b"\"sub\"",
    b"\"nbf\"",
    b"\xff",
    b"\xc3\x28",
    b"0",
];

/// One mutation of `input`, drawing on `corpus` for splices.
pub fn mutate(rng: &mut fastrand::Rng, input: &[u8], corpus: &[Arc<[u8]>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.usize(1..=6) {
        let len = v.len();
        match rng.u8(0..7) {
            0 if len > 0 => {
                let i = rng.usize(..len);
                v[i] ^= 1 << rng.u8(0..8);
            }
            1 => {
                let i = rng.usize(..=len);
                v.insert(i, rng.u8(..));
            }
            2 if len > 0 => {
                let a = rng.usize(..len);
                let b = (a + rng.usize(1..=16)).min(len);
                v.drain(a..b);
            }
            3 => {
                let t = DICTIONARY[rng.usize(..DICTIONARY.len())];
                let i = rng.usize(..=len);
                v.splice(i..i, t.iter().copied());
            }
            4 if len > 0 => {
                let a = rng.usize(..len);
                let b = (a + rng.usize(1..=32)).min(len);
                let copy = v[a..b].to_vec();
                let i = rng.usize(..=v.len());
                v.splice(i..i, copy);
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.usize(..corpus.len())];
                let cut = rng.usize(..=len);
                let from = rng.usize(..=other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => {
                let i = rng.usize(..len);
                const BYTES: &[u8] = b"0123456789\"{}[]:,\n ";
                v[i] = BYTES[rng.usize(..BYTES.len())];
            }
            _ => v.push(rng.u8(..)),
        }
    }
    v.truncate(64 * 1024);
    v
}
