//! The cache key: SHA-256 of a canonical JSON document of everything that
//! determines the answer (see the [module docs](super)). Pure.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::provider::Message;

/// Bumped when the key's inputs or the stored format change, so old
/// entries are simply never found again.
pub const CACHE_FORMAT: u32 = 1;

/// Everything that determines an answer.
#[derive(Debug, Serialize)]
pub struct KeyInput<'a> {
    pub scope: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
    pub system: Option<&'a str>,
    pub messages: &'a [Message],
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    /// Left out of the document when empty, so keys made before stop
    /// sequences existed stay the same.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub stop: &'a [String],
}

/// The same inputs, owned: what the cache-warmer reads back from the
/// popularity records to ask the question again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeySpec {
    pub scope: String,
    pub provider: String,
    pub model: String,
    pub system: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct KeyDocOwned {
    format: u32,
    input: KeySpec,
}

impl KeySpec {
    /// Reads a canonical key document ([`cache_doc`]); `None` for another
    /// format or malformed text.
    pub fn from_doc(doc: &str) -> Option<KeySpec> {
        let d: KeyDocOwned = serde_json::from_str(doc).ok()?;
        (d.format == CACHE_FORMAT).then_some(d.input)
    }

    pub fn input(&self) -> KeyInput<'_> {
        KeyInput {
            scope: &self.scope,
            provider: &self.provider,
            model: &self.model,
            system: self.system.as_deref(),
            messages: &self.messages,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            stop: &self.stop,
        }
    }
}

/// The canonical JSON document the key is the hash of.
pub fn cache_doc(input: &KeyInput<'_>) -> String {
    serde_json::json!({ "format": CACHE_FORMAT, "input": input }).to_string()
}

/// The key of a canonical document: lowercase hex SHA-256.
pub fn key_of_doc(doc: &str) -> String {
    let digest = Sha256::digest(doc.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key: lowercase hex SHA-256 of the canonical JSON.
pub fn cache_key(input: &KeyInput<'_>) -> String {
    key_of_doc(&cache_doc(input))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Role;

    fn msgs(texts: &[&str]) -> Vec<Message> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Message {
                role: if i % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                },
                content: (*t).into(),
            })
            .collect()
    }

    fn key(scope: &str, model: &str, m: &[Message], temp: Option<f32>) -> String {
        cache_key(&KeyInput {
            scope,
            provider: "anthropic",
            model,
            system: Some("be brief"),
            messages: m,
            max_tokens: 100,
            temperature: temp,
            stop: &[],
        })
    }

    #[test]
    fn the_key_is_stable_and_covers_every_input() {
        let m = msgs(&["hi"]);
        let base = key("u1", "m", &m, Some(0.0));
        assert_eq!(base, key("u1", "m", &m, Some(0.0)));
        assert_eq!(base.len(), 64);
        assert_ne!(base, key("u2", "m", &m, Some(0.0)));
        assert_ne!(base, key("u1", "m2", &m, Some(0.0)));
        assert_ne!(base, key("u1", "m", &msgs(&["hi", "a", "hi"]), Some(0.0)));
        assert_ne!(base, key("u1", "m", &m, Some(0.5)));
        assert_ne!(base, key("u1", "m", &m, None));
        let stop = ["END".to_owned()];
        let with_stop = cache_key(&KeyInput {
            scope: "u1",
            provider: "anthropic",
            model: "m",
            system: Some("be brief"),
            messages: &m,
            max_tokens: 100,
            temperature: Some(0.0),
            stop: &stop,
        });
        assert_ne!(base, with_stop);
        // No stop sequences: the document is the one made before they existed.
        let doc = cache_doc(&KeyInput {
            scope: "u1",
            provider: "anthropic",
            model: "m",
            system: None,
            messages: &m,
            max_tokens: 1,
            temperature: None,
            stop: &[],
        });
        assert!(!doc.contains("stop"), "{doc}");
    }

    #[test]
    fn a_key_document_reads_back_to_the_same_key() {
        let m = msgs(&["hi", "hello", "again"]);
        let input = KeyInput {
            scope: "user:u1",
            provider: "anthropic",
            model: "m",
            system: None,
            messages: &m,
            max_tokens: 64,
            temperature: Some(0.0),
            stop: &[],
        };
        let doc = cache_doc(&input);
        let spec = KeySpec::from_doc(&doc).unwrap();
        assert_eq!(cache_key(&spec.input()), key_of_doc(&doc));
        assert_eq!(spec.messages, m);
        assert!(KeySpec::from_doc("{\"format\":0,\"input\":{}}").is_none());
        assert!(KeySpec::from_doc("not json").is_none());
    }
}
