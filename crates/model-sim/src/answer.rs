//! Producing one answer in its wire format: streamed (Anthropic SSE,
//! OpenAI chunks, Bedrock event-stream frames, paced by the knobs, with
//! faults mid-stream) or whole.

use super::*;

/// One answer being produced, in one wire format.
pub(crate) struct Answer {
    pub(crate) wire: Wire,
    pub(crate) tokens: Vec<String>,
    /// Cut short by `max_tokens`.
    pub(crate) capped: bool,
    /// Ended before a stop sequence.
    pub(crate) stopped: bool,
    pub(crate) msg_id: String,
}

impl Answer {
    fn stop_reason(&self) -> &'static str {
        if self.stopped {
            return match self.wire {
                Wire::Anthropic => "stop_sequence",
                Wire::OpenAi => "stop",
                Wire::Bedrock => "stop_sequence",
            };
        }
        match (self.wire, self.capped) {
            (Wire::Anthropic, false) => "end_turn",
            (Wire::Anthropic, true) => "max_tokens",
            (Wire::OpenAi, false) => "stop",
            (Wire::OpenAi, true) => "length",
            (Wire::Bedrock, false) => "end_turn",
            (Wire::Bedrock, true) => "max_tokens",
        }
    }

    fn openai_chunk(&self, p: &Parsed, delta: Value, finish: Option<&str>) -> Bytes {
        data_line(&json!({
            "id": format!("chatcmpl-sim{}", self.msg_id), "object": "chat.completion.chunk",
            "created": 1_735_689_600, "model": p.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }))
    }

    fn start_frames(&self, p: &Parsed) -> Vec<Bytes> {
        match self.wire {
            Wire::Anthropic => vec![
                event(
                    "message_start",
                    &json!({"type": "message_start", "message": {
                        "id": format!("msg_sim_{}", self.msg_id), "type": "message", "role": "assistant",
                        "content": [], "model": p.model, "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": p.input_tokens, "output_tokens": 1}
                    }}),
                ),
                event(
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ),
                event("ping", &json!({"type": "ping"})),
            ],
            Wire::OpenAi => {
                vec![self.openai_chunk(p, json!({"role": "assistant", "content": ""}), None)]
            }
            // Text answers get no contentBlockStart (Bedrock sends one only
            // for tool use).
            Wire::Bedrock => vec![eventstream::event(
                "messageStart",
                &json!({"role": "assistant"}),
            )],
        }
    }

    fn delta_frame(&self, p: &Parsed, tok: &str) -> Bytes {
        match self.wire {
            Wire::Anthropic => event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": tok}}),
            ),
            Wire::OpenAi => self.openai_chunk(p, json!({"content": tok}), None),
            Wire::Bedrock => eventstream::event(
                "contentBlockDelta",
                &json!({"contentBlockIndex": 0, "delta": {"text": tok}}),
            ),
        }
    }

    fn end_frames(&self, p: &Parsed) -> Vec<Bytes> {
        let n = self.tokens.len();
        match self.wire {
            Wire::Anthropic => vec![
                event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": 0}),
                ),
                event(
                    "message_delta",
                    &json!({"type": "message_delta", "delta": {"stop_reason": self.stop_reason(), "stop_sequence": null},
                            "usage": {"output_tokens": n}}),
                ),
                event("message_stop", &json!({"type": "message_stop"})),
            ],
            Wire::OpenAi => {
                let mut v = vec![self.openai_chunk(p, json!({}), Some(self.stop_reason()))];
                if p.include_usage {
                    v.push(data_line(&json!({
                        "id": format!("chatcmpl-sim{}", self.msg_id), "object": "chat.completion.chunk",
                        "created": 1_735_689_600, "model": p.model, "choices": [],
                        "usage": {"prompt_tokens": p.input_tokens, "completion_tokens": n,
                                  "total_tokens": p.input_tokens as usize + n},
                    })));
                }
                v.push(Bytes::from_static(b"data: [DONE]\n\n"));
                v
            }
            Wire::Bedrock => vec![
                eventstream::event("contentBlockStop", &json!({"contentBlockIndex": 0})),
                eventstream::event("messageStop", &json!({"stopReason": self.stop_reason()})),
                eventstream::event(
                    "metadata",
                    &json!({"usage": {"inputTokens": p.input_tokens, "outputTokens": n,
                                      "totalTokens": p.input_tokens as usize + n},
                            "metrics": {"latencyMs": 1}}),
                ),
            ],
        }
    }

    fn error_frame(&self, kind: &str) -> Bytes {
        let message = format!("simulated {kind}");
        match self.wire {
            Wire::Anthropic => event(
                "error",
                &json!({"type": "error", "error": {"type": kind, "message": message}}),
            ),
            Wire::OpenAi => {
                data_line(&json!({"error": {"message": message, "type": kind, "code": kind}}))
            }
            Wire::Bedrock => {
                let exception = match kind {
                    "rate_limit_error" => "throttlingException",
                    "overloaded_error" => "serviceUnavailableException",
                    _ => "modelStreamErrorException",
                };
                eventstream::exception(exception, &message)
            }
        }
    }
}

fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn data_line(data: &Value) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

type Frame = Result<Bytes, std::io::Error>;

/// Waits until `until`, or returns false early if the client went away.
async fn pause(tx: &mpsc::Sender<Frame>, until: Instant) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(until) => true,
        _ = tx.closed() => false,
    }
}

pub(crate) fn stream_answer(
    st: Arc<SimState>,
    p: Parsed,
    answer: Answer,
    request_id: String,
) -> Response {
    let content_type = match answer.wire {
        Wire::Bedrock => "application/vnd.amazon.eventstream",
        _ => "text/event-stream; charset=utf-8",
    };
    let (tx, rx) = mpsc::channel::<Frame>(32);
    tokio::spawn(async move {
        match produce(&tx, &p, &answer).await {
            Some(true) => {
                st.stats.completed.fetch_add(1, Ordering::SeqCst);
            }
            Some(false) => {}
            None => {
                st.stats.cancelled.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("request-id", v.clone());
        h.insert("x-request-id", v.clone());
        h.insert("x-amzn-requestid", v);
    }
    resp
}

/// Writes one streamed answer. `Some(true)`: complete; `Some(false)`: ended
/// by a fault on purpose; `None`: the client went away.
async fn produce(tx: &mpsc::Sender<Frame>, p: &Parsed, a: &Answer) -> Option<bool> {
    let send = |b: Bytes| async move { tx.send(Ok(b)).await.ok() };
    for f in a.start_frames(p) {
        send(f).await?;
    }
    let mut first_at = Instant::now() + p.knobs.ttft;
    if let Some(Fault::StallFirst(d)) = &p.knobs.fault {
        first_at += *d;
    }
    let total = a.tokens.len() as u32;
    let mid = match &p.knobs.fault {
        Some(
            Fault::StallMid { after, .. }
            | Fault::DropMid { after }
            | Fault::ErrorMid { after, .. },
        ) => Some(Knobs::fault_point(*after, total)),
        _ => None,
    };
    let mut shift = Duration::ZERO;
    for i in 0..=total {
        if mid == Some(i) {
            match &p.knobs.fault {
                Some(Fault::StallMid { pause: d, .. }) => {
                    shift += *d;
                    if !pause(tx, Instant::now() + *d).await {
                        return None;
                    }
                }
                Some(Fault::DropMid { .. }) => {
                    // An error from the body stream makes the server abort
                    // the connection without finishing the chunked body.
                    let _ = tx
                        .send(Err(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "simulated drop",
                        )))
                        .await;
                    return Some(false);
                }
                Some(Fault::ErrorMid { kind, .. }) => {
                    send(a.error_frame(kind)).await?;
                    return Some(false);
                }
                _ => {}
            }
        }
        let Some(tok) = a.tokens.get(i as usize) else {
            break;
        };
        if !pause(tx, first_at + p.knobs.token_offset(i) + shift).await {
            return None;
        }
        send(a.delta_frame(p, tok)).await?;
    }
    for f in a.end_frames(p) {
        send(f).await?;
    }
    Some(true)
}

pub(crate) async fn full_answer(
    st: Arc<SimState>,
    p: Parsed,
    a: Answer,
    request_id: String,
) -> Response {
    let total = a.tokens.len() as u32;
    let mut wait = p.knobs.ttft + p.knobs.token_offset(total.saturating_sub(1));
    match &p.knobs.fault {
        Some(Fault::StallFirst(d)) | Some(Fault::StallMid { pause: d, .. }) => wait += *d,
        // Without a stream there is no "middle": these become a 500.
        Some(Fault::DropMid { .. }) | Some(Fault::ErrorMid { .. }) => {
            return error_response(
                a.wire,
                500,
                "api_error",
                "simulated api_error",
                &request_id,
                None,
            );
        }
        _ => {}
    }
    tokio::time::sleep(wait).await;
    st.stats.completed.fetch_add(1, Ordering::SeqCst);
    let text = a.tokens.concat();
    let body = match a.wire {
        Wire::Anthropic => json!({
            "id": format!("msg_sim_{}", a.msg_id), "type": "message", "role": "assistant", "model": p.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": a.stop_reason(), "stop_sequence": null,
            "usage": {"input_tokens": p.input_tokens, "output_tokens": total},
        }),
        Wire::Bedrock => json!({
            "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": a.stop_reason(),
            "usage": {"inputTokens": p.input_tokens, "outputTokens": total, "totalTokens": p.input_tokens + total},
            "metrics": {"latencyMs": 1},
        }),
        Wire::OpenAi => json!({
            "id": format!("chatcmpl-sim{}", a.msg_id), "object": "chat.completion", "created": 1_735_689_600,
            "model": p.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": a.stop_reason()}],
            "usage": {"prompt_tokens": p.input_tokens, "completion_tokens": total, "total_tokens": p.input_tokens + total},
        }),
    };
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("request-id", v);
    }
    resp
}
