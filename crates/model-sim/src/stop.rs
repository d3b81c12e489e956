//! Stop sequences: the answer ends before the first one its text contains,
//! as the real APIs do.

use serde_json::Value;

use crate::Wire;

/// The request's stop sequences: Anthropic `stop_sequences`, OpenAI
/// `stop` (a string or a list), Bedrock Converse
/// `inferenceConfig.stopSequences`.
pub(crate) fn sequences(wire: Wire, body: &Value) -> Result<Vec<String>, String> {
    let v = match wire {
        Wire::Anthropic => &body["stop_sequences"],
        Wire::OpenAi => &body["stop"],
        Wire::Bedrock => &body["inferenceConfig"]["stopSequences"],
    };
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) if wire == Wire::OpenAi => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| "stop sequences must be non-empty strings".to_owned())
            })
            .collect(),
        _ => Err("stop sequences must be a list of strings".into()),
    }
}

/// Cuts `tokens` before the first stop sequence their text contains;
/// whether one was found.
pub(crate) fn apply(tokens: &mut Vec<String>, stop: &[String]) -> bool {
    if stop.is_empty() {
        return false;
    }
    let text: String = tokens.concat();
    let Some(at) = stop.iter().filter_map(|s| text.find(s.as_str())).min() else {
        return false;
    };
    let mut kept = Vec::new();
    let mut len = 0;
    for t in tokens.drain(..) {
        if len + t.len() <= at {
            len += t.len();
            kept.push(t);
        } else {
            let cut = &t[..at - len];
            if !cut.is_empty() {
                kept.push(cut.to_owned());
            }
            break;
        }
    }
    *tokens = kept;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn toks(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_answer_ends_before_the_first_stop_sequence() {
        let mut t = toks(&["Hello", " wor", "ld", " again"]);
        assert!(apply(&mut t, &["orl".into(), "again".into()]));
        assert_eq!(t.concat(), "Hello w");
        let mut t = toks(&["ab", "cd"]);
        assert!(!apply(&mut t, &["x".into()]));
        assert_eq!(t.concat(), "abcd");
        let mut t = toks(&["ab", "cd"]);
        assert!(apply(&mut t, &["ab".into()]));
        assert!(t.is_empty());
    }

    #[test]
    fn each_wire_names_its_stop_field() {
        assert_eq!(
            sequences(Wire::OpenAi, &json!({"stop": "x"})).unwrap(),
            vec!["x"]
        );
        assert_eq!(
            sequences(Wire::Anthropic, &json!({"stop_sequences": ["a", "b"]})).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(
            sequences(
                Wire::Bedrock,
                &json!({"inferenceConfig": {"stopSequences": ["z"]}})
            )
            .unwrap(),
            vec!["z"]
        );
        assert!(sequences(Wire::Anthropic, &json!({"stop_sequences": "a"})).is_err());
        assert!(sequences(Wire::OpenAi, &json!({"stop": [""]})).is_err());
    }
}
