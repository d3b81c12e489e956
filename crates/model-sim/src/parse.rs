//! Reading a request in any of the three wire formats into what the sim
//! needs: the model, limits, knobs (headers, model-name suffix, defaults),
//! stop sequences and the seed that makes the answer deterministic.

use super::*;

/// The text of a message's `content`: a string, or an array of blocks.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => Some(
            blocks
                .iter()
                .filter(|b| b["type"] == "text" || (b["type"].is_null() && b["text"].is_string()))
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

/// What the sim needs from a valid request.
pub(crate) struct Parsed {
    pub(crate) model: String,
    pub(crate) max_tokens: u32,
    pub(crate) stream: bool,
    /// OpenAI `stream_options.include_usage`.
    pub(crate) include_usage: bool,
    pub(crate) knobs: Knobs,
    pub(crate) seed: u64,
    pub(crate) input_tokens: u32,
    /// Stop sequences: the answer ends before the first one it contains.
    pub(crate) stop: Vec<String>,
    /// The last user message (what `echo=1` answers with).
    pub(crate) last_user: String,
}

pub(crate) fn parse_request(
    wire: Wire,
    headers: &HeaderMap,
    body: &Value,
    defaults: &Knobs,
) -> Result<Parsed, String> {
    let model = body["model"].as_str().ok_or("model: field required")?;
    let max_tokens = match wire {
        Wire::Anthropic => Some(&body["max_tokens"]),
        Wire::Bedrock => Some(&body["max_tokens"]).filter(|v| !v.is_null()),
        Wire::OpenAi => [&body["max_completion_tokens"], &body["max_tokens"]]
            .into_iter()
            .find(|v| !v.is_null()),
    };
    let max_tokens = match max_tokens {
        Some(v) => v
            .as_u64()
            .filter(|n| *n >= 1)
            .ok_or("max_tokens: must be a positive integer")?,
        None => 4096,
    };
    let messages = body["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or("messages: at least one message is required")?;
    // The same conversation gets the same answer in either wire format:
    // system text and turns are hashed the same way.
    let mut system = match &body["system"] {
        Value::Null => String::new(),
        v if wire != Wire::OpenAi => {
            content_text(v).ok_or("system: must be a string or text blocks")?
        }
        _ => return Err("system: not a Chat Completions field; send a system message".into()),
    };
    let mut texts = Vec::with_capacity(messages.len());
    let mut last_role = "";
    let mut last_user = String::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        let text = content_text(&m["content"])
            .ok_or_else(|| format!("messages.{i}.content: field required"))?;
        match (wire, role) {
            (_, "user" | "assistant") => {
                if role == "user" {
                    last_user.clone_from(&text);
                }
                texts.push(format!("{role}:{text}"));
                last_role = role;
            }
            (Wire::OpenAi, "system" | "developer") => system.push_str(&text),
            _ => return Err(format!("messages.{i}.role: {role:?} is not allowed here")),
        }
    }
    if last_role != "user" {
        return Err("messages: the last message must have role user".into());
    }
    let mut knobs = defaults.clone();
    let base = knobs.apply_model_suffix(model)?;
    for (h, k) in [
        ("x-sim-ttft-ms", "ttft"),
        ("x-sim-tps", "tps"),
        ("x-sim-tokens", "tokens"),
        ("x-sim-fault", "fault"),
        ("x-sim-times", "times"),
    ] {
        if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
            knobs.set(k, v)?;
        }
    }
    let mut parts: Vec<&str> = vec![base, &system];
    parts.extend(texts.iter().map(String::as_str));
    let seed = text::fnv1a(&parts);
    let chars: usize = parts.iter().map(|p| p.len()).sum();
    Ok(Parsed {
        model: base.to_owned(),
        max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
        stream: body["stream"].as_bool().unwrap_or(false),
        include_usage: body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false),
        knobs,
        seed,
        input_tokens: u32::try_from(chars / 4).unwrap_or(u32::MAX).max(1),
        stop: stop::sequences(wire, body)?,
        last_user,
    })
}
