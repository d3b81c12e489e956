//! Amazon Bedrock `ConverseStream`, through aws-sdk-bedrockruntime: IAM
//! auth from the function's role (SigV4), no API key.
//!
//! The SDK decodes the binary event stream into [`ConverseStreamOutput`]
//! events (`messageStart`, `contentBlockStart`, `contentBlockDelta`,
//! `contentBlockStop`, `messageStop`, `metadata`); [`event_to_chunk`] maps
//! them to ours, a pure function. The answer is complete when the stream
//! ends after `messageStop` (usage arrives in `metadata`, after it).

use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ContentBlockDelta, ConversationRole, ConverseStreamOutput,
    InferenceConfiguration, Message, StopReason, SystemContentBlock,
};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;

use super::{Chunk, ChunkStream, ModelProvider, ModelRequest, Role};
use crate::error::{TimeoutKind, UpstreamError};

pub struct BedrockProvider {
    client: Client,
}

impl BedrockProvider {
    /// `client` is built once at init from the SDK config (region,
    /// credentials, optional endpoint override).
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

/// Our stop reasons are Anthropic's words.
pub fn stop_reason(r: &StopReason) -> String {
    match r {
        StopReason::EndTurn => "end_turn".to_owned(),
        StopReason::MaxTokens => "max_tokens".to_owned(),
        StopReason::StopSequence => "stop_sequence".to_owned(),
        StopReason::ToolUse => "tool_use".to_owned(),
        other => other.as_str().to_owned(),
    }
}

/// Converts one ConverseStream event into at most one chunk. Pure.
/// `MessageStart` names no model: the caller knows which it asked for.
pub fn event_to_chunk(ev: &ConverseStreamOutput) -> Option<Chunk> {
    match ev {
        ConverseStreamOutput::MessageStart(_) => Some(Chunk::Start {
            model: String::new(),
            input_tokens: None,
        }),
        ConverseStreamOutput::ContentBlockDelta(d) => match d.delta() {
            Some(ContentBlockDelta::Text(t)) if !t.is_empty() => Some(Chunk::Delta(t.clone())),
            _ => None,
        },
        ConverseStreamOutput::MessageStop(s) => Some(Chunk::Stop {
            stop_reason: Some(stop_reason(s.stop_reason())),
            input_tokens: None,
            output_tokens: None,
        }),
        ConverseStreamOutput::Metadata(m) => m.usage().map(|u| Chunk::Stop {
            stop_reason: None,
            input_tokens: u32::try_from(u.input_tokens()).ok(),
            output_tokens: u32::try_from(u.output_tokens()).ok(),
        }),
        _ => None,
    }
}

/// HTTP status for a Bedrock error code, when the response had none.
fn status_for(code: &str) -> u16 {
    match code {
        "ThrottlingException" | "ModelNotReadyException" => 429,
        "ServiceUnavailableException" => 503,
        "ValidationException" => 400,
        "AccessDeniedException" => 403,
        "ResourceNotFoundException" => 404,
        "ModelTimeoutException" => 408,
        _ => 500,
    }
}

/// Maps a failed `ConverseStream` call to the typed error.
fn call_error<E: ProvideErrorMetadata + std::fmt::Debug, R>(e: SdkError<E, R>) -> UpstreamError
where
    R: std::fmt::Debug,
{
    match &e {
        SdkError::TimeoutError(_) => UpstreamError::Timeout(TimeoutKind::Connect),
        SdkError::DispatchFailure(d) => {
            if d.is_timeout() {
                UpstreamError::Timeout(TimeoutKind::Connect)
            } else {
                UpstreamError::Unreachable(format!("{d:?}"))
            }
        }
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or("UnknownError").to_owned();
            let message = ctx.err().message().unwrap_or("").to_owned();
            UpstreamError::Status {
                status: status_for(&code),
                kind: code,
                message,
                retry_after: None,
            }
        }
        _ => UpstreamError::Protocol(format!("bedrock: {e:?}")),
    }
}

/// Maps an exception inside the stream to the Anthropic-style kinds the
/// rest of the code understands. Pure on the SDK's typed error.
fn stream_error<R: std::fmt::Debug>(e: SdkError<ConverseStreamOutputError, R>) -> UpstreamError {
    tracing::warn!(error = ?e, "bedrock stream error");
    match &e {
        SdkError::ServiceError(ctx) => {
            let err = ctx.err();
            let kind = match err {
                ConverseStreamOutputError::ThrottlingException(_) => "rate_limit_error",
                ConverseStreamOutputError::ServiceUnavailableException(_) => "overloaded_error",
                ConverseStreamOutputError::ValidationException(_) => "invalid_request_error",
                _ => "api_error",
            };
            UpstreamError::StreamEvent {
                kind: kind.to_owned(),
                message: err.message().unwrap_or("bedrock stream error").to_owned(),
            }
        }
        // The connection broke mid-answer.
        SdkError::ResponseError(_) | SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            UpstreamError::Truncated
        }
        _ => UpstreamError::Protocol(format!("bedrock stream: {e:?}")),
    }
}

impl ModelProvider for BedrockProvider {
    fn name(&self) -> &'static str {
        "bedrock"
    }

    fn can_probe(&self) -> bool {
        // bedrock-runtime has no call that costs no tokens.
        false
    }

    fn stream(&self, req: &ModelRequest) -> BoxFuture<'_, Result<ChunkStream, UpstreamError>> {
        let req = req.clone();
        Box::pin(async move {
            let mut call = self.client.converse_stream().model_id(&req.model);
            if let Some(s) = &req.system {
                call = call.system(SystemContentBlock::Text(s.clone()));
            }
            for m in &req.messages {
                let role = match m.role {
                    Role::User => ConversationRole::User,
                    Role::Assistant => ConversationRole::Assistant,
                };
                let msg = Message::builder()
                    .role(role)
                    .content(ContentBlock::Text(m.content.clone()))
                    .build()
                    .map_err(|e| UpstreamError::Protocol(format!("bedrock message: {e}")))?;
                call = call.messages(msg);
            }
            let mut inference = InferenceConfiguration::builder()
                .max_tokens(i32::try_from(req.max_tokens).unwrap_or(i32::MAX));
            if let Some(t) = req.temperature {
                inference = inference.temperature(t);
            }
            if !req.stop.is_empty() {
                inference = inference.set_stop_sequences(Some(req.stop.clone()));
            }
            let out = call
                .inference_config(inference.build())
                .send()
                .await
                .map_err(call_error)?;
            let events = out.stream;
            // State: the receiver, whether messageStop was seen, whether done.
            let s = futures_util::stream::unfold(
                (events, false, false),
                |(mut rx, stopped, done)| async move {
                    if done {
                        return None;
                    }
                    loop {
                        match rx.recv().await {
                            Ok(Some(ev)) => {
                                let stopped =
                                    stopped || matches!(ev, ConverseStreamOutput::MessageStop(_));
                                if let Some(chunk) = event_to_chunk(&ev) {
                                    return Some((Ok(chunk), (rx, stopped, false)));
                                }
                            }
                            Ok(None) if stopped => {
                                return Some((Ok(Chunk::End), (rx, stopped, true)));
                            }
                            Ok(None) => {
                                return Some((Err(UpstreamError::Truncated), (rx, stopped, true)));
                            }
                            Err(e) => return Some((Err(stream_error(e)), (rx, stopped, true))),
                        }
                    }
                },
            );
            Ok(s.boxed())
        })
    }

    fn prewarm(&self) -> BoxFuture<'_, Result<(), UpstreamError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_bedrockruntime::types::{
        ContentBlockDeltaEvent, ConverseStreamMetadataEvent, MessageStartEvent, MessageStopEvent,
        TokenUsage,
    };

    #[test]
    fn events_map_to_chunks() {
        let start = ConverseStreamOutput::MessageStart(
            MessageStartEvent::builder()
                .role(ConversationRole::Assistant)
                .build()
                .unwrap(),
        );
        assert!(matches!(event_to_chunk(&start), Some(Chunk::Start { .. })));

        let delta = ConverseStreamOutput::ContentBlockDelta(
            ContentBlockDeltaEvent::builder()
                .content_block_index(0)
                .delta(ContentBlockDelta::Text("Hel".into()))
                .build()
                .unwrap(),
        );
        assert_eq!(event_to_chunk(&delta), Some(Chunk::Delta("Hel".into())));

        let empty = ConverseStreamOutput::ContentBlockDelta(
            ContentBlockDeltaEvent::builder()
                .content_block_index(0)
                .delta(ContentBlockDelta::Text(String::new()))
                .build()
                .unwrap(),
        );
        assert_eq!(event_to_chunk(&empty), None);

        let stop = ConverseStreamOutput::MessageStop(
            MessageStopEvent::builder()
                .stop_reason(StopReason::MaxTokens)
                .build()
                .unwrap(),
        );
        assert_eq!(
            event_to_chunk(&stop),
            Some(Chunk::Stop {
                stop_reason: Some("max_tokens".into()),
                input_tokens: None,
                output_tokens: None
            })
        );

        let meta = ConverseStreamOutput::Metadata(
            ConverseStreamMetadataEvent::builder()
                .usage(
                    TokenUsage::builder()
                        .input_tokens(12)
                        .output_tokens(34)
                        .total_tokens(46)
                        .build()
                        .unwrap(),
                )
                .build(),
        );
        assert_eq!(
            event_to_chunk(&meta),
            Some(Chunk::Stop {
                stop_reason: None,
                input_tokens: Some(12),
                output_tokens: Some(34)
            })
        );
    }

    #[test]
    fn error_codes_map_to_statuses() {
        assert_eq!(status_for("ThrottlingException"), 429);
        assert_eq!(status_for("ValidationException"), 400);
        assert_eq!(status_for("AccessDeniedException"), 403);
        assert_eq!(status_for("ServiceUnavailableException"), 503);
        assert_eq!(status_for("SomethingNew"), 500);
    }
}
