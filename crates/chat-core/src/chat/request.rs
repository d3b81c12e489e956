//! `POST /chat` request parsing and limits. Pure: bytes in, a typed request
//! or an [`ApiError`] naming the field out.

use axum::http::StatusCode;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::provider::Message;

/// Request limits enforced before any upstream work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_message_chars: usize,
    pub max_system_chars: usize,
    pub max_tokens: u32,
    pub default_max_tokens: u32,
}

/// One turn's input: a validated `POST /chat` body, or what the
/// OpenAI-compatible route made of its request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub conversation_id: Option<String>,
    /// The new user message.
    pub message: String,
    pub model: Option<String>,
    pub system: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    /// A stateless request's earlier messages, given by the client (the
    /// OpenAI route without `x-conversation-id`): used instead of a stored
    /// history. `None` for `/chat`.
    pub context: Option<Vec<Message>>,
    /// Whether the turn is stored (always for `/chat`; for a stateless
    /// request only with `x-persist: true`).
    pub persist: bool,
    /// Stop sequences (OpenAI `stop`).
    pub stop: Vec<String>,
}

pub const FIELDS: [&str; 6] = [
    "conversation_id",
    "message",
    "model",
    "system",
    "max_tokens",
    "temperature",
];
const MAX_ID_CHARS: usize = 64;
const MAX_MODEL_CHARS: usize = 128;

/// 1-64 of `A-Z a-z 0-9 - _`: the form of every conversation id.
pub fn valid_conversation_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::bad_request("invalid_field", message).with_field(field)
}

fn too_large(code: &'static str, field: &str, message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, code, message).with_field(field)
}

/// `null` counts as absent for optional fields.
fn opt<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

fn opt_str<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match opt(obj, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(field, format!("{field} must be a string"))),
    }
}

/// A request body as a JSON object, within the body limit.
pub fn json_object(body: &[u8], limits: &Limits) -> Result<Map<String, Value>, ApiError> {
    if body.len() > limits.max_body_bytes {
        return Err(body_too_large(limits.max_body_bytes));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(ApiError::bad_request(
            "invalid_json",
            "request body must be a JSON object",
        )),
    }
}

pub fn parse_chat_request(body: &[u8], limits: &Limits) -> Result<ChatRequest, ApiError> {
    let obj = json_object(body, limits)?;
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad_request(
            "unknown_field",
            format!(
                "unknown field {unknown:?}; known fields are {}",
                FIELDS.join(", ")
            ),
        )
        .with_field(unknown.as_str()));
    }

    let message = match obj.get("message") {
        None | Some(Value::Null) => {
            return Err(
                ApiError::bad_request("missing_field", "message is required").with_field("message"),
            );
        }
        Some(Value::String(s)) => s,
        Some(_) => return Err(invalid("message", "message must be a string".into())),
    };
    if message.trim().is_empty() {
        return Err(invalid("message", "message must not be empty".into()));
    }
    let chars = message.chars().count();
    if chars > limits.max_message_chars {
        return Err(too_large(
            "message_too_long",
            "message",
            format!(
                "message has {chars} characters; the limit is {}",
                limits.max_message_chars
            ),
        ));
    }

    let conversation_id = opt_str(&obj, "conversation_id")?;
    if let Some(id) = conversation_id {
        if !valid_conversation_id(id) {
            return Err(invalid(
                "conversation_id",
                format!(
                    "conversation_id must be 1-{MAX_ID_CHARS} characters of A-Z, a-z, 0-9, - and _"
                ),
            ));
        }
    }

    let model = opt_str(&obj, "model")?;
    if let Some(m) = model {
        let ok =
            !m.is_empty() && m.len() <= MAX_MODEL_CHARS && m.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(invalid(
                "model",
                format!(
                    "model must be 1-{MAX_MODEL_CHARS} printable ASCII characters without spaces"
                ),
            ));
        }
    }

    let system = opt_str(&obj, "system")?;
    if let Some(s) = system {
        let chars = s.chars().count();
        if chars > limits.max_system_chars {
            return Err(too_large(
                "system_too_long",
                "system",
                format!(
                    "system has {chars} characters; the limit is {}",
                    limits.max_system_chars
                ),
            ));
        }
    }

    let max_tokens = match opt(&obj, "max_tokens") {
        None => None,
        Some(v) => {
            let n = v
                .as_u64()
                .filter(|n| *n >= 1 && *n <= u64::from(limits.max_tokens));
            match n.and_then(|n| u32::try_from(n).ok()) {
                Some(n) => Some(n),
                None => {
                    return Err(invalid(
                        "max_tokens",
                        format!(
                            "max_tokens must be a whole number from 1 to {}",
                            limits.max_tokens
                        ),
                    ));
                }
            }
        }
    };

    let temperature = match opt(&obj, "temperature") {
        None => None,
        Some(v) => match v.as_f64().filter(|t| (0.0..=1.0).contains(t)) {
            Some(t) => Some(t as f32),
            None => {
                return Err(invalid(
                    "temperature",
                    "temperature must be a number from 0 to 1".into(),
                ));
            }
        },
    };

    Ok(ChatRequest {
        conversation_id: conversation_id.map(str::to_owned),
        message: message.clone(),
        model: model.map(str::to_owned),
        system: system.map(str::to_owned),
        max_tokens,
        temperature,
        context: None,
        persist: true,
        stop: Vec::new(),
    })
}

pub fn body_too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("request body is larger than {limit} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_body_bytes: 1000,
            max_message_chars: 20,
            max_system_chars: 10,
            max_tokens: 100,
            default_max_tokens: 50,
        }
    }

    fn err(body: &str) -> ApiError {
        parse_chat_request(body.as_bytes(), &limits()).unwrap_err()
    }

    #[test]
    fn accepts_a_full_request() {
        let r = parse_chat_request(
            br#"{"conversation_id":"c-1","message":"hi","model":"claude-x","system":"s","max_tokens":100,"temperature":0.5}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!(r.message, "hi");
        assert_eq!(r.max_tokens, Some(100));
        assert_eq!(r.temperature, Some(0.5));
        assert_eq!(r.conversation_id.as_deref(), Some("c-1"));
    }

    #[test]
    fn nulls_are_absent() {
        let r = parse_chat_request(
            br#"{"message":"hi","model":null,"max_tokens":null}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!(r.model, None);
        assert_eq!(r.max_tokens, None);
    }

    #[test]
    fn each_bad_input_names_its_problem() {
        let cases: &[(&str, u16, &str, Option<&str>)] = &[
            ("{", 400, "invalid_json", None),
            ("[1]", 400, "invalid_json", None),
            ("", 400, "invalid_json", None),
            (r#"{}"#, 400, "missing_field", Some("message")),
            (r#"{"message":""}"#, 400, "invalid_field", Some("message")),
            (
                r#"{"message":"   "}"#,
                400,
                "invalid_field",
                Some("message"),
            ),
            (r#"{"message":5}"#, 400, "invalid_field", Some("message")),
            (
                r#"{"message":"x","extra":1}"#,
                400,
                "unknown_field",
                Some("extra"),
            ),
            (
                r#"{"message":"012345678901234567890"}"#,
                413,
                "message_too_long",
                Some("message"),
            ),
            (
                r#"{"message":"x","system":"01234567890"}"#,
                413,
                "system_too_long",
                Some("system"),
            ),
            (
                r#"{"message":"x","max_tokens":0}"#,
                400,
                "invalid_field",
                Some("max_tokens"),
            ),
            (
                r#"{"message":"x","max_tokens":101}"#,
                400,
                "invalid_field",
                Some("max_tokens"),
            ),
            (
                r#"{"message":"x","max_tokens":1.5}"#,
                400,
                "invalid_field",
                Some("max_tokens"),
            ),
            (
                r#"{"message":"x","max_tokens":"10"}"#,
                400,
                "invalid_field",
                Some("max_tokens"),
            ),
            (
                r#"{"message":"x","temperature":1.1}"#,
                400,
                "invalid_field",
                Some("temperature"),
            ),
            (
                r#"{"message":"x","temperature":-0.1}"#,
                400,
                "invalid_field",
                Some("temperature"),
            ),
            (
                r#"{"message":"x","model":"has space"}"#,
                400,
                "invalid_field",
                Some("model"),
            ),
            (
                r#"{"message":"x","model":""}"#,
                400,
                "invalid_field",
                Some("model"),
            ),
            (
                r#"{"message":"x","conversation_id":"../etc"}"#,
                400,
                "invalid_field",
                Some("conversation_id"),
            ),
            (
                r#"{"message":"x","system":7}"#,
                400,
                "invalid_field",
                Some("system"),
            ),
        ];
        for (body, status, code, field) in cases {
            let e = err(body);
            assert_eq!(e.status.as_u16(), *status, "{body}");
            assert_eq!(e.code, *code, "{body}");
            assert_eq!(e.field.as_deref(), *field, "{body}");
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn oversized_body_is_413_before_parsing() {
        let body = format!("{{\"message\":\"{}\"}}", "x".repeat(2000));
        let e = err(&body);
        assert_eq!(e.status.as_u16(), 413);
        assert_eq!(e.code, "body_too_large");
    }

    #[test]
    fn message_limit_counts_characters_not_bytes() {
        // 20 two-byte characters: 40 bytes, within the 20-character limit.
        let body = format!("{{\"message\":\"{}\"}}", "\u{e9}".repeat(20));
        assert!(parse_chat_request(body.as_bytes(), &limits()).is_ok());
    }
}
