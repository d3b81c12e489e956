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

/// The canonical JSON document the key is the hash of: `{"format", "input"}`
/// with every object's members in name order and `temperature` as the
/// 64-bit number its 32-bit value widens to (the document as a
/// `serde_json::Value` printed it, written here without building one).
pub fn cache_doc(input: &KeyInput<'_>) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        format: u32,
        input: Input<'a>,
    }
    #[derive(Serialize)]
    struct Input<'a> {
        max_tokens: u32,
        messages: Messages<'a>,
        model: &'a str,
        provider: &'a str,
        scope: &'a str,
        #[serde(skip_serializing_if = "<[String]>::is_empty")]
        stop: &'a [String],
        system: Option<&'a str>,
        temperature: Option<f64>,
    }
    struct Messages<'a>(&'a [Message]);
    impl Serialize for Messages<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            #[derive(Serialize)]
            struct Canonical<'a> {
                content: &'a str,
                role: crate::provider::Role,
            }
            s.collect_seq(self.0.iter().map(|m| Canonical {
                content: &m.content,
                role: m.role,
            }))
        }
    }
    let doc = Doc {
        format: CACHE_FORMAT,
        input: Input {
            max_tokens: input.max_tokens,
            messages: Messages(input.messages),
            model: input.model,
            provider: input.provider,
            scope: input.scope,
            stop: input.stop,
            system: input.system,
            temperature: input.temperature.map(f64::from),
        },
    };
    serde_json::to_string(&doc).unwrap_or_default()
}

/// The key of a canonical document: lowercase hex SHA-256.
pub fn key_of_doc(doc: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(doc.as_bytes());
    let mut key = String::with_capacity(64);
    for b in digest {
        key.push(char::from(HEX[usize::from(b >> 4)]));
        key.push(char::from(HEX[usize::from(b & 15)]));
    }
    key
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

    /// Keys never change without a new `CACHE_FORMAT`: these are the
    /// keys (and one document) as the first release computed them, by
    /// printing a `serde_json::Value` of the inputs.
    #[test]
    fn keys_are_those_of_the_first_format() {
        let m = vec![
            Message {
                role: Role::User,
                content: "h\u{e9}llo \"q\"\n\u{1}".into(),
            },
            Message {
                role: Role::Assistant,
                content: "a".into(),
            },
            Message {
                role: Role::User,
                content: "again".into(),
            },
        ];
        let stop = ["END".to_owned()];
        let doc = |temperature| {
            cache_doc(&KeyInput {
                scope: "user:u1",
                provider: "anthropic",
                model: "claude",
                system: Some("be brief"),
                messages: &m,
                max_tokens: 64,
                temperature,
                stop: &stop,
            })
        };
        assert_eq!(
            doc(Some(0.7)),
            "{\"format\":1,\"input\":{\"max_tokens\":64,\"messages\":[{\"content\":\"h\u{e9}llo \\\"q\\\"\\n\\u0001\",\"role\":\"user\"},{\"content\":\"a\",\"role\":\"assistant\"},{\"content\":\"again\",\"role\":\"user\"}],\"model\":\"claude\",\"provider\":\"anthropic\",\"scope\":\"user:u1\",\"stop\":[\"END\"],\"system\":\"be brief\",\"temperature\":0.699999988079071}}"
        );
        for (t, want) in [
            (
                None,
                "fe403a4cbe289922c94fcf516c6a8996d5bc9aa785c02f9aa52646bfb74655a6",
            ),
            (
                Some(0.0),
                "3409c7b7e0b5da9ce660c39a5986d6487e41b1e833738b75b4461e8779d0e791",
            ),
            (
                Some(0.7),
                "ea7a62d2d2de01c8c978b2597610c8754436963895beffbea1a452c72dbc3976",
            ),
            (
                Some(1.0),
                "8a394bb55e4cb281ec379623a67579272a9933a13bae80a0ae04f826c8347706",
            ),
            (
                Some(0.3),
                "422cc49872d7890b5f6a6b6049f8b4fcb98048e256153dcbb60f1d5c3afcfffc",
            ),
        ] {
            assert_eq!(key_of_doc(&doc(t)), want, "temperature {t:?}");
        }
    }
}
