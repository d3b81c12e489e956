//! Following another request's answer, and taking over when its leader
//! dies (see the [module docs](super)).

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;

use super::{Entry, Lead, Live, LiveError, Reader};
use crate::error::UpstreamError;
use crate::provider::{Chunk, ChunkStream};

/// Calls the model for a follower whose leader is gone.
pub type Takeover =
    Arc<dyn Fn() -> BoxFuture<'static, Result<ChunkStream, UpstreamError>> + Send + Sync>;

/// How following a leader began.
pub enum FollowOpen {
    /// The leader's answer has started: its model and first text.
    Following {
        follower: Box<Follower>,
        model: String,
        first: Chunk,
    },
    /// The leader failed before its answer started: the same error, as
    /// HTTP status and JSON body.
    Aborted { status: u16, body: String },
    /// The leader went away before its answer started, and this request
    /// now holds the lease: call the model as the leader.
    Lead,
    /// Redis stopped answering: call the model alone.
    Alone,
}

/// A follower of another request's answer: yields that answer as
/// [`Chunk`]s, so the relay treats it like a model stream. When the leader
/// dies it takes over (see the module docs), skipping the text already
/// yielded.
pub struct Follower {
    live: Arc<Live>,
    cache_key: String,
    own_turn: String,
    leader: String,
    reader: Option<Reader>,
    own: Option<ChunkStream>,
    takeover: Takeover,
    /// Bytes of text yielded so far.
    sent: usize,
    /// Bytes of the current source's text still to drop (already sent).
    skip: usize,
    queued: VecDeque<Chunk>,
    takeovers: u32,
    /// Set when this follower calls the model itself before its client has
    /// any text: the answer is then wholly its own, and worth caching. A
    /// takeover mid-answer splices the rest onto the leader's text: that
    /// answer is not cached (two samples joined are not one answer).
    own_answer: Arc<std::sync::atomic::AtomicBool>,
}

impl Follower {
    /// Follows `leader` until its first text (or its end).
    pub async fn open(
        live: Arc<Live>,
        cache_key: String,
        own_turn: String,
        leader: String,
        takeover: Takeover,
    ) -> FollowOpen {
        let Ok(reader) = live.reader(&leader).await else {
            return FollowOpen::Alone;
        };
        let mut f = Follower {
            live,
            cache_key,
            own_turn,
            leader,
            reader: Some(reader),
            own: None,
            takeover,
            sent: 0,
            skip: 0,
            queued: VecDeque::new(),
            takeovers: 0,
            own_answer: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        };
        let mut model = String::new();
        loop {
            let Some(reader) = f.reader.as_mut() else {
                return FollowOpen::Alone;
            };
            let check = match reader.next().await {
                Ok(Some(e)) => match e.event.as_str() {
                    "meta" => {
                        let v: serde_json::Value =
                            serde_json::from_str(&e.data).unwrap_or_default();
                        model = v["model"].as_str().unwrap_or_default().to_owned();
                        continue;
                    }
                    "abort" => {
                        let v: serde_json::Value =
                            serde_json::from_str(&e.data).unwrap_or_default();
                        return FollowOpen::Aborted {
                            status: v["status"].as_u64().unwrap_or(502) as u16,
                            body: v["body"].as_str().unwrap_or("{}").to_owned(),
                        };
                    }
                    "error" => {
                        return FollowOpen::Aborted {
                            status: 502,
                            body: e.data,
                        };
                    }
                    "gone" => f.check_leader(true).await,
                    _ => {
                        if let Some(first) = f.chunk_of(e) {
                            return FollowOpen::Following {
                                follower: Box::new(f),
                                model,
                                first,
                            };
                        }
                        // No text yet (an empty delta): keep reading.
                        continue;
                    }
                },
                // Nothing new for a period: is the leader alive?
                Ok(None) => f.check_leader(false).await,
                Err(_) => Check::Alone,
            };
            match check {
                Check::Alive => {}
                Check::Follow(h) => f.switch_to(h).await,
                Check::Lead => return FollowOpen::Lead,
                Check::Alone => return FollowOpen::Alone,
            }
        }
    }

    /// The chunk an entry of the leader's stream stands for (`None` for
    /// meta and empty text; `gone` is handled by the caller).
    fn chunk_of(&mut self, e: Entry) -> Option<Chunk> {
        let v: serde_json::Value = serde_json::from_str(&e.data).unwrap_or_default();
        match e.event.as_str() {
            "delta" => {
                let text = v["text"].as_str().unwrap_or_default();
                self.fresh_text(text).map(Chunk::Delta)
            }
            "done" => {
                self.queued.push_back(Chunk::End);
                Some(Chunk::Stop {
                    stop_reason: v["stop_reason"].as_str().map(str::to_owned),
                    // The leader paid for the answer; a follower uses none.
                    input_tokens: Some(0),
                    output_tokens: Some(0),
                })
            }
            _ => None,
        }
    }

    /// The part of `text` this follower's client does not have yet.
    fn fresh_text(&mut self, text: &str) -> Option<String> {
        let mut cut = self.skip.min(text.len());
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        self.skip -= cut.min(self.skip);
        let rest = &text[cut..];
        if rest.is_empty() {
            return None;
        }
        self.sent += rest.len();
        Some(rest.to_owned())
    }

    async fn check_leader(&mut self, gone: bool) -> Check {
        if !gone {
            match self.live.holder(&self.cache_key).await {
                Ok(Some(h)) if h == self.leader => return Check::Alive,
                Ok(Some(h)) if h != self.own_turn => return Check::Follow(h),
                Ok(_) => {}
                Err(_) => return Check::Alone,
            }
        }
        // The leader is gone: lead, or follow whoever leads now.
        self.takeovers += 1;
        if self.takeovers > 3 {
            return Check::Alone;
        }
        tracing::info!(leader = %self.leader, turn_id = %self.own_turn, "leader lost; taking over");
        match self.live.lead(&self.cache_key, &self.own_turn).await {
            Lead::Leader => Check::Lead,
            Lead::Follow(h) => Check::Follow(h),
            Lead::Alone => Check::Alone,
        }
    }

    async fn switch_to(&mut self, leader: String) {
        self.reader = self.live.reader(&leader).await.ok();
        self.leader = leader;
        self.skip = self.sent;
    }

    /// Calls the model ourselves, from where our client is.
    async fn call_model(&mut self) -> Result<(), UpstreamError> {
        self.reader = None;
        let stream = (self.takeover)().await?;
        self.own = Some(stream);
        if self.sent == 0 {
            self.own_answer
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.skip = self.sent;
        Ok(())
    }

    async fn next_chunk(&mut self) -> Option<Result<Chunk, UpstreamError>> {
        loop {
            if let Some(c) = self.queued.pop_front() {
                return Some(Ok(c));
            }
            if let Some(own) = self.own.as_mut() {
                return match own.next().await {
                    Some(Ok(Chunk::Delta(t))) => match self.fresh_text(&t) {
                        Some(t) => Some(Ok(Chunk::Delta(t))),
                        None => continue,
                    },
                    other => other,
                };
            }
            let Some(reader) = self.reader.as_mut() else {
                if let Err(e) = self.call_model().await {
                    return Some(Err(e));
                }
                continue;
            };
            let step = match reader.next().await {
                Ok(Some(e)) if e.event == "gone" || e.event == "abort" => {
                    self.check_leader(true).await
                }
                Ok(Some(e)) if e.event == "error" => {
                    let v: serde_json::Value = serde_json::from_str(&e.data).unwrap_or_default();
                    return Some(Err(UpstreamError::StreamEvent {
                        kind: v["code"].as_str().unwrap_or("upstream_error").to_owned(),
                        message: v["message"].as_str().unwrap_or_default().to_owned(),
                    }));
                }
                Ok(Some(e)) => {
                    if let Some(c) = self.chunk_of(e) {
                        return Some(Ok(c));
                    }
                    continue;
                }
                Ok(None) => self.check_leader(false).await,
                // Our client has text up to the hole; nothing may be
                // spliced on: the answer ends here, not completed.
                Err(LiveError::Gap) => return Some(Err(UpstreamError::StreamLost)),
                Err(_) => Check::Alone,
            };
            match step {
                Check::Alive => {}
                Check::Follow(h) => self.switch_to(h).await,
                Check::Lead | Check::Alone => {
                    if let Err(e) = self.call_model().await {
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// Becomes true if this follower's answer turns out to be wholly its
    /// own (see the field).
    pub fn own_answer(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.own_answer.clone()
    }

    /// The follower as a model stream.
    pub fn into_stream(self: Box<Self>) -> ChunkStream {
        futures_util::stream::unfold(*self, |mut f| async move {
            f.next_chunk().await.map(|c| (c, f))
        })
        .boxed()
    }
}

enum Check {
    Alive,
    Follow(String),
    Lead,
    Alone,
}
