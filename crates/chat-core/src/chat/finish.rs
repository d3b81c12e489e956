//! The end of a turn: the one [`TurnRecord`] builder, and the work that
//! follows an answer (cache it, make it durable, release the coalescing
//! lease, count the ask) on a task of its own, so a client that leaves
//! cannot cancel it. The body ends only when that task is done: Lambda
//! may freeze the environment once the response ends.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use crate::cache::popular::Popularity;
use crate::cache::{CachedAnswer, LocalAnswers, ResponseCache};
use crate::live::Live;
use crate::persistence::producer::Persister;
use crate::persistence::turn::{TURN_SCHEMA_VERSION, TurnRecord, TurnStatus};
use crate::util::now_ms;

/// What the stored turn needs besides the answer.
pub(super) struct TurnDraft {
    pub persister: Arc<Persister>,
    pub conversation_id: String,
    pub turn_id: String,
    pub user_id: String,
    pub started_at_ms: u64,
    pub new_conversation: bool,
    pub user_message: String,
}

/// What became of the answer.
pub(super) struct Answer {
    pub status: TurnStatus,
    pub error_code: Option<&'static str>,
    pub model: String,
    pub text: String,
    pub stop_reason: Option<String>,
    pub input_tokens: u32,
    pub output_tokens: u32,
}

impl TurnDraft {
    /// The turn as it is sent to the queue.
    pub(super) fn record(self, a: Answer) -> (Arc<Persister>, bool, TurnRecord) {
        let rec = TurnRecord {
            v: TURN_SCHEMA_VERSION,
            turn_id: self.turn_id,
            conversation_id: self.conversation_id,
            user_id: self.user_id,
            started_at_ms: self.started_at_ms,
            completed_at_ms: now_ms(),
            status: a.status,
            status_raw: None,
            model: a.model,
            user_message: self.user_message,
            answer_bytes: a.text.len() as u64,
            answer: Some(a.text),
            answer_parts: None,
            stop_reason: a.stop_reason,
            input_tokens: a.input_tokens,
            output_tokens: a.output_tokens,
            error_code: a.error_code.map(str::to_owned),
        };
        (self.persister, self.new_conversation, rec)
    }
}

/// Counts one ask of a cacheable question: (tracker, key, key document).
pub(super) type PopularJob = (Arc<Popularity>, String, String);

/// Where a complete answer is cached: the shared cache under `key` for
/// `ttl`, and the instance's own copy when it keeps them.
pub(super) struct CachePut {
    pub cache: Arc<dyn ResponseCache>,
    pub key: String,
    pub ttl: Duration,
    pub local: Option<Arc<LocalAnswers>>,
}

/// The coalescing lease an answer may hold: (live, cache key, turn id).
pub(super) type Lease = (Arc<Live>, String, String);

/// The work after an answer; each part is optional.
#[derive(Default)]
pub(super) struct Finish {
    pub cache: Option<(CachePut, CachedAnswer)>,
    pub persist: Option<(Arc<Persister>, bool, TurnRecord)>,
    pub popular: Option<PopularJob>,
    pub lease: Option<Lease>,
}

impl Finish {
    /// Runs it on its own task; `None` when there is nothing to do (or no
    /// runtime, when called from a drop at shutdown). The handle is what
    /// the body waits for: the cache entry, the lease and the durable turn.
    /// The ask is queued and counted with others on a task that nothing
    /// waits for (see [`Popularity::ask`]).
    pub(super) fn spawn(self) -> Option<tokio::task::JoinHandle<()>> {
        let Finish {
            cache,
            persist,
            popular,
            lease,
        } = self;
        let handle = tokio::runtime::Handle::try_current().ok()?;
        if let Some((p, key, doc)) = popular {
            p.ask(&key, &doc);
        }
        if cache.is_none() && persist.is_none() && lease.is_none() {
            return None;
        }
        let span = tracing::info_span!("persist");
        Some(
            handle.spawn(
                async move {
                    // The entry and the lease are in one slot: one round
                    // trip where one after the other took two.
                    let cache = async {
                        let Some((put, entry)) = cache else {
                            // Later identical requests find the cache now, not us.
                            if let Some((live, key, turn_id)) = lease {
                                live.release(&key, &turn_id).await;
                            }
                            return;
                        };
                        // The entry and the lease are in one slot: one round
                        // trip where one after the other took two.
                        let one_script = match &lease {
                            Some((_, lease_key, _)) if *lease_key == put.key => {
                                put.cache.redis_key(&put.key)
                            }
                            _ => None,
                        };
                        let stored = match (lease, one_script) {
                            (Some((live, _, turn_id)), Some(entry_key)) => {
                                let json = serde_json::to_string(&entry).unwrap_or_default();
                                live.store_and_release(
                                    &entry_key, &json, put.ttl, &put.key, &turn_id,
                                )
                                .await
                            }
                            (lease, _) => {
                                let stored = put.cache.put(&put.key, &entry, put.ttl).await.is_ok();
                                if let Some((live, key, turn_id)) = lease {
                                    live.release(&key, &turn_id).await;
                                }
                                stored
                            }
                        };
                        if !stored {
                            tracing::debug!("cache unavailable; answer not stored");
                        }
                        // This instance answers the next ask itself.
                        if let Some(local) = put.local {
                            local.keep(&put.key, Arc::new(super::hit::ready(entry)), now_ms());
                        }
                    };
                    let persist = async {
                        if let Some((persister, new_conversation, rec)) = persist {
                            persister.persist(rec, new_conversation).await;
                        }
                    };
                    tokio::join!(
                        cache.instrument(tracing::info_span!("cache_store")),
                        persist
                    );
                }
                .instrument(span),
            ),
        )
    }
}
