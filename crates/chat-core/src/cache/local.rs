//! The instance's own copy of the answers it served or cached last: a
//! repeated question is answered from memory, with no round trip to the
//! shared cache (Redis or the table).
//!
//! An entry is what the shared cache holds under the same key (keys are
//! the hash of everything that determines the answer, scope included), with
//! the answer's `delta` frames already encoded. It is served until the
//! earlier of `CACHE_LOCAL_TTL_SECS` after this instance read or stored it
//! and the shared entry's own expiry (`stored_at` + `CACHE_TTL_SECS`), and
//! only while a request's `max-age` accepts its age. The copies are bounded
//! by `CACHE_LOCAL_MB` (weighed by their text and frames); the least
//! recently useful go first (S3-FIFO, `quick_cache`).
//!
//! What it means for the fleet: an entry erased from the shared cache
//! (`chat-stream users erase`) may still be served by an instance that
//! holds it, for at most `CACHE_LOCAL_TTL_SECS`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quick_cache::sync::Cache;

use super::CachedAnswer;

/// `CACHE_LOCAL_MB`, `CACHE_LOCAL_TTL_SECS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalConfig {
    /// The most the copies may weigh, in bytes (0: none are kept).
    pub max_bytes: u64,
    /// How long a copy is served before the shared cache is asked again.
    pub ttl: Duration,
}

/// A cached answer ready to send: the answer, and its text as the `delta`
/// events a hit sends (numbered from 2: the hit's `meta` is 1).
#[derive(Debug)]
pub struct Ready {
    pub answer: CachedAnswer,
    /// The `delta` frames, in order.
    pub frames: Bytes,
    /// The id of the event after the last frame (the hit's `done`).
    pub next_id: u64,
}

#[derive(Clone)]
struct Held {
    ready: Arc<Ready>,
    /// Served until then (ms since the epoch).
    until_ms: u64,
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<String, Held> for ByBytes {
    fn weight(&self, key: &String, held: &Held) -> u64 {
        let r = &held.ready;
        (key.len() + r.answer.text.len() + r.answer.model.len() + r.frames.len() + 160) as u64
    }
}

/// The copies (see the module's documentation).
pub struct LocalAnswers {
    held: Cache<String, Held, ByBytes>,
    config: LocalConfig,
    /// The shared cache's entry lifetime (`CACHE_TTL_SECS`).
    shared_ttl: Duration,
}

/// A typical answer's weight, for sizing the table of entries.
const TYPICAL_ENTRY_BYTES: u64 = 4096;

impl LocalAnswers {
    /// `None` when no copies are to be kept (`max_bytes` 0).
    pub fn new(config: LocalConfig, shared_ttl: Duration) -> Option<Self> {
        if config.max_bytes == 0 || config.ttl.is_zero() {
            return None;
        }
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity((config.max_bytes / TYPICAL_ENTRY_BYTES).max(32) as usize)
            .weight_capacity(config.max_bytes)
            .build()
            .ok()?;
        Some(Self {
            held: Cache::with_options(options, ByBytes, Default::default(), Default::default()),
            config,
            shared_ttl,
        })
    }

    /// The copy of `key`'s answer, when one is held, still served
    /// (`now_ms`) and young enough for `max_age`.
    pub fn get(&self, key: &str, max_age: Option<Duration>, now_ms: u64) -> Option<Arc<Ready>> {
        let held = self.held.get(key)?;
        if now_ms >= held.until_ms {
            self.held.remove(key);
            return None;
        }
        held.ready
            .answer
            .fresh_for(max_age, now_ms)
            .then_some(held.ready)
    }

    /// Keeps `ready` as `key`'s answer, read or stored at `now_ms`.
    pub fn keep(&self, key: &str, ready: Arc<Ready>, now_ms: u64) {
        let expires = ready
            .answer
            .stored_at_ms
            .saturating_add(self.shared_ttl.as_millis() as u64);
        let until_ms = now_ms
            .saturating_add(self.config.ttl.as_millis() as u64)
            .min(expires);
        if until_ms <= now_ms {
            return;
        }
        self.held.insert(key.to_owned(), Held { ready, until_ms });
    }

    /// Copies held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(text: &str, stored_at_ms: u64) -> Arc<Ready> {
        Arc::new(Ready {
            answer: CachedAnswer {
                text: text.into(),
                model: "m".into(),
                stop_reason: None,
                input_tokens: 1,
                output_tokens: 1,
                stored_at_ms,
            },
            frames: Bytes::from(format!("data: {text}\n\n")),
            next_id: 3,
        })
    }

    fn local(max_bytes: u64, ttl_secs: u64) -> LocalAnswers {
        let config = LocalConfig {
            max_bytes,
            ttl: Duration::from_secs(ttl_secs),
        };
        let Some(l) = LocalAnswers::new(config, Duration::from_secs(3600)) else {
            panic!("a local tier with room was not made");
        };
        l
    }

    #[test]
    fn none_without_room_or_time() {
        let off = |max_bytes, ttl| {
            LocalAnswers::new(LocalConfig { max_bytes, ttl }, Duration::from_secs(60))
        };
        assert!(off(0, Duration::from_secs(60)).is_none());
        assert!(off(1 << 20, Duration::ZERO).is_none());
    }

    #[test]
    fn a_copy_is_served_until_its_local_ttl() {
        let l = local(1 << 20, 60);
        l.keep("k", ready("hello", 1_000), 1_000);
        assert_eq!(
            l.get("k", None, 1_000)
                .map(|r| r.answer.text.clone())
                .as_deref(),
            Some("hello")
        );
        assert!(l.get("k", None, 60_999).is_some());
        assert!(l.get("k", None, 61_000).is_none());
        // An expired copy is dropped, not kept.
        assert!(l.is_empty());
        assert!(l.get("other", None, 1_000).is_none());
    }

    #[test]
    fn never_past_the_shared_entrys_expiry() {
        let l = local(1 << 20, 60);
        // Stored 3,590 s before it was read: the shared entry expires 10 s later.
        l.keep("k", ready("x", 0), 3_590_000);
        assert!(l.get("k", None, 3_599_999).is_some());
        assert!(l.get("k", None, 3_600_000).is_none());
        // Already expired when read: not kept.
        l.keep("old", ready("x", 0), 3_600_000);
        assert!(l.get("old", None, 3_600_000).is_none());
    }

    #[test]
    fn max_age_is_the_entrys_age_not_the_copys() {
        let l = local(1 << 20, 60);
        l.keep("k", ready("x", 10_000), 20_000);
        assert!(l.get("k", Some(Duration::from_secs(10)), 20_000).is_some());
        assert!(l.get("k", Some(Duration::from_secs(9)), 20_000).is_none());
        // Refused for that request only: the copy stays for others.
        assert!(l.get("k", None, 20_000).is_some());
    }

    #[test]
    fn the_copies_stay_within_their_bytes() {
        let l = local(64 * 1024, 60);
        let text = "y".repeat(1000);
        for i in 0..500 {
            l.keep(&format!("k{i}"), ready(&text, 0), 0);
        }
        // Each weighs about 2.2 KB: far fewer than 500 fit in 64 KiB.
        assert!(l.len() > 5, "{} held", l.len());
        assert!(l.len() < 40, "{} held", l.len());
    }
}
