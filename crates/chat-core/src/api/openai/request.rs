//! An OpenAI Chat Completions body made into one turn's input. Pure: bytes
//! and two headers in, a [`ChatRequest`] or an [`ApiError`] naming the
//! parameter out.
//!
//! - Accepted: `model`, `messages` (system, developer, user and assistant,
//!   with string content or text parts), `max_tokens` /
//!   `max_completion_tokens`, `temperature`, `stream`, `stream_options`,
//!   `user`, `stop`. `n: 1` and `logprobs: false` are accepted as the
//!   defaults they are.
//! - Refused with 400 naming the parameter: tools and functions, `n` over 1,
//!   `response_format`, logprobs, image, audio and file parts, and any
//!   parameter not listed (so a client never believes a setting took effect
//!   when it did not).
//! - Without `x-conversation-id` the messages are the whole context
//!   (stateless, as with OpenAI); stored only with `x-persist: true`. With
//!   it, the stored history is the context and the messages are exactly one
//!   user message (plus any system messages).

use serde_json::{Map, Value};

use crate::chat::request::{ChatRequest, Limits, json_object, valid_conversation_id};
use crate::error::ApiError;
use crate::provider::{Message, Role};

/// What the route needs besides the turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub turn: ChatRequest,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

const ACCEPTED: [&str; 12] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "stream",
    "stream_options",
    "user",
    "stop",
    "n",
    "logprobs",
    "store",
];
const MAX_STOP: usize = 4;
const MAX_STOP_CHARS: usize = 256;
const MAX_USER_CHARS: usize = 256;

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_parameter", message).with_field(param)
}

fn unsupported(param: &str, why: &str) -> ApiError {
    ApiError::bad_request(
        "unsupported_parameter",
        format!("{param} is not supported here: {why}"),
    )
    .with_field(param)
}

/// `null` counts as absent, as OpenAI treats it.
fn opt<'a>(obj: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    obj.get(k).filter(|v| !v.is_null())
}

/// Reads the body. `conversation` is the `x-conversation-id` header,
/// `persist` the `x-persist` header.
pub fn parse(
    body: &[u8],
    limits: &Limits,
    conversation: Option<&str>,
    persist: Option<&str>,
) -> Result<Completion, ApiError> {
    let obj = json_object(body, limits)?;
    refuse_unsupported(&obj)?;

    let model = match opt(&obj, "model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(_) => return Err(bad("model", "model must be a non-empty string")),
        None => {
            return Err(
                ApiError::bad_request("missing_parameter", "model is required").with_field("model"),
            );
        }
    };
    let stream = match opt(&obj, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream", "stream must be true or false")),
    };
    let include_usage = match opt(&obj, "stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(bad(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ));
        }
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| k.as_str() != "include_usage") {
                return Err(unsupported(
                    &format!("stream_options.{k}"),
                    "unknown option",
                ));
            }
            match opt(o, "include_usage") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(bad(
                        "stream_options.include_usage",
                        "include_usage must be true or false",
                    ));
                }
            }
        }
        Some(_) => return Err(bad("stream_options", "stream_options must be an object")),
    };
    let max_tokens = max_tokens(&obj, limits)?;
    let temperature = match opt(&obj, "temperature") {
        None => None,
        Some(v) => match v.as_f64().filter(|t| (0.0..=1.0).contains(t)) {
            Some(t) => Some(t as f32),
            None => {
                return Err(bad(
                    "temperature",
                    "temperature must be a number from 0 to 1 (the range every provider here accepts)",
                ));
            }
        },
    };
    match opt(&obj, "user") {
        None => {}
        Some(Value::String(u)) if u.chars().count() <= MAX_USER_CHARS => {}
        Some(_) => {
            return Err(bad(
                "user",
                format!("user must be a string of at most {MAX_USER_CHARS} characters"),
            ));
        }
    }
    let stop = stop_sequences(&obj)?;
    let (system, mut turns) = messages(&obj, limits)?;

    let Some((last_role, message)) = turns.pop() else {
        return Err(bad(
            "messages",
            "messages must hold at least one user message",
        ));
    };
    if last_role != Role::User {
        return Err(bad("messages", "the last message must have role user"));
    }
    let (conversation_id, context, persist) = match conversation {
        Some(id) => {
            if !valid_conversation_id(id) {
                return Err(bad(
                    "x-conversation-id",
                    "x-conversation-id must be 1-64 characters of A-Z, a-z, 0-9, - and _",
                ));
            }
            if !turns.is_empty() {
                return Err(bad(
                    "messages",
                    "with x-conversation-id the stored history is the context: send exactly one new user message (and any system messages)",
                ));
            }
            (Some(id.to_owned()), None, true)
        }
        None => {
            let persist = match persist.map(str::trim) {
                None => false,
                Some(v) if v.eq_ignore_ascii_case("true") => true,
                Some(v) if v.eq_ignore_ascii_case("false") => false,
                Some(_) => return Err(bad("x-persist", "x-persist must be true or false")),
            };
            let context = turns
                .into_iter()
                .map(|(role, content)| Message { role, content })
                .collect();
            (None, Some(context), persist)
        }
    };
    Ok(Completion {
        turn: ChatRequest {
            conversation_id,
            message,
            model: Some(model),
            system,
            max_tokens,
            temperature,
            context,
            persist,
            stop,
        },
        stream,
        include_usage,
    })
}

/// The parameters we cannot honour, each with its reason; then anything
/// not on the accepted list.
fn refuse_unsupported(obj: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, why) in [
        ("tools", "tool calls are not offered by this service"),
        ("tool_choice", "tool calls are not offered by this service"),
        (
            "parallel_tool_calls",
            "tool calls are not offered by this service",
        ),
        (
            "functions",
            "function calls are not offered by this service",
        ),
        (
            "function_call",
            "function calls are not offered by this service",
        ),
        (
            "response_format",
            "structured output is not offered by this service",
        ),
        (
            "top_logprobs",
            "log probabilities are not offered by this service",
        ),
    ] {
        if opt(obj, k).is_some() {
            return Err(unsupported(k, why));
        }
    }
    match opt(obj, "n") {
        None => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(_) => return Err(unsupported("n", "one choice per request (n: 1)")),
    }
    match opt(obj, "logprobs") {
        None | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(unsupported(
                "logprobs",
                "log probabilities are not offered by this service",
            ));
        }
    }
    match opt(obj, "store") {
        None | Some(Value::Bool(false)) => {}
        Some(_) => {
            return Err(unsupported(
                "store",
                "use x-persist: true to store a conversation",
            ));
        }
    }
    if let Some(k) = obj.keys().find(|k| !ACCEPTED.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "unknown_parameter",
            format!(
                "unrecognized request argument supplied: {k}; accepted are {}",
                ACCEPTED.join(", ")
            ),
        )
        .with_field(k.as_str()));
    }
    Ok(())
}

fn max_tokens(obj: &Map<String, Value>, limits: &Limits) -> Result<Option<u32>, ApiError> {
    // The newer name wins, as with OpenAI.
    let (param, v) = match (opt(obj, "max_completion_tokens"), opt(obj, "max_tokens")) {
        (Some(v), _) => ("max_completion_tokens", v),
        (None, Some(v)) => ("max_tokens", v),
        (None, None) => return Ok(None),
    };
    v.as_u64()
        .filter(|n| *n >= 1 && *n <= u64::from(limits.max_tokens))
        .and_then(|n| u32::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            bad(
                param,
                format!(
                    "{param} must be a whole number from 1 to {}",
                    limits.max_tokens
                ),
            )
        })
}

fn stop_sequences(obj: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let list = match opt(obj, "stop") {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().map(|v| v.as_str().unwrap_or("")).collect(),
        Some(_) => return Err(bad("stop", "stop must be a string or a list of strings")),
    };
    if list.len() > MAX_STOP
        || list
            .iter()
            .any(|s| s.is_empty() || s.chars().count() > MAX_STOP_CHARS)
    {
        return Err(bad(
            "stop",
            format!(
                "stop takes up to {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters"
            ),
        ));
    }
    Ok(list.into_iter().map(str::to_owned).collect())
}

/// User and assistant messages in order: (role, text).
type Turns = Vec<(Role, String)>;

/// The system text (system and developer messages, joined) and the other
/// messages in order, consecutive ones of the same role joined (every
/// provider here wants user and assistant to alternate).
fn messages(
    obj: &Map<String, Value>,
    limits: &Limits,
) -> Result<(Option<String>, Turns), ApiError> {
    let list = match opt(obj, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(_) => return Err(bad("messages", "messages must be a non-empty list")),
        None => {
            return Err(
                ApiError::bad_request("missing_parameter", "messages is required")
                    .with_field("messages"),
            );
        }
    };
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<(Role, String)> = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(bad(&at, format!("{at} must be an object")));
        };
        if let Some(k) = m
            .keys()
            .find(|k| !matches!(k.as_str(), "role" | "content" | "name"))
        {
            return Err(unsupported(
                &format!("{at}.{k}"),
                "only role, content and name are accepted in a message",
            ));
        }
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let text = content(m.get("content"), &at)?;
        let chars = text.chars().count();
        let limit = match role {
            "system" | "developer" => limits.max_system_chars,
            _ => limits.max_message_chars,
        };
        if chars > limit {
            return Err(ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_long",
                format!("{at} has {chars} characters; the limit is {limit}"),
            )
            .with_field(format!("{at}.content")));
        }
        let role = match role {
            "system" | "developer" => {
                system.push(text);
                continue;
            }
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => {
                return Err(unsupported(
                    &format!("{at}.role"),
                    "tool and function results are not offered by this service",
                ));
            }
            other => {
                return Err(bad(
                    &format!("{at}.role"),
                    format!("{at}.role {other:?} is not one of system, developer, user, assistant"),
                ));
            }
        };
        if turns.is_empty() && role != Role::User {
            return Err(bad(
                &format!("{at}.role"),
                "the first message after the system messages must have role user",
            ));
        }
        match turns.last_mut() {
            Some((r, t)) if *r == role => {
                t.push_str("\n\n");
                t.push_str(&text);
            }
            _ => turns.push((role, text)),
        }
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    if let Some(s) = &system {
        let chars = s.chars().count();
        if chars > limits.max_system_chars {
            return Err(ApiError::new(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                "system_too_long",
                format!(
                    "the system messages have {chars} characters; the limit is {}",
                    limits.max_system_chars
                ),
            )
            .with_field("messages"));
        }
    }
    Ok((system, turns))
}

/// A message's text: a string, or a list of text parts.
fn content(v: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match v {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                let here = format!("{at}.content[{j}]");
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => match p.get("text") {
                        Some(Value::String(t)) => text.push_str(t),
                        _ => return Err(bad(&here, format!("{here}.text must be a string"))),
                    },
                    Some(kind @ ("image_url" | "input_audio" | "file" | "refusal")) => {
                        return Err(unsupported(
                            &here,
                            &format!("{kind} parts are not offered by this service; send text"),
                        ));
                    }
                    _ => return Err(bad(&here, format!("{here} must be a text part"))),
                }
            }
            if text.trim().is_empty() {
                return Err(bad(&format!("{at}.content"), "content must not be empty"));
            }
            Ok(text)
        }
        Some(Value::String(_)) => Err(bad(&format!("{at}.content"), "content must not be empty")),
        None | Some(Value::Null) => Err(bad(
            &format!("{at}.content"),
            format!("{at}.content is required"),
        )),
        Some(_) => Err(bad(
            &format!("{at}.content"),
            "content must be a string or a list of text parts",
        )),
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
