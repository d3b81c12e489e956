//! Which model answers a request. Pure.
//!
//! - A model the caller names must be on the allowlist (400 otherwise), so
//!   a public endpoint cannot be pointed at the most expensive model.
//! - Without one, short, simple prompts go to `ROUTE_SHORT_MODEL` when it
//!   is set (a fast model answers "what's the capital of France?" sooner
//!   and cheaper), everything else to `DEFAULT_MODEL`.
//! - Model references may name their provider: `openai:gpt-4o-mini`,
//!   `anthropic:claude-haiku-4-5`,
//!   `bedrock:anthropic.claude-3-5-haiku-20241022-v1:0`; without a known
//!   prefix the default provider is meant (Bedrock model ids contain `:`
//!   themselves, so only a known provider name counts as a prefix).

use crate::error::ApiError;

pub const PROVIDERS: [&str; 3] = ["anthropic", "openai", "bedrock"];

/// `provider:model`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

impl ModelRef {
    pub fn parse(s: &str, default_provider: &str) -> ModelRef {
        if let Some((p, m)) = s.split_once(':') {
            if PROVIDERS.contains(&p) && !m.is_empty() {
                return ModelRef {
                    provider: p.to_owned(),
                    model: m.to_owned(),
                };
            }
        }
        ModelRef {
            provider: default_provider.to_owned(),
            model: s.to_owned(),
        }
    }

    /// The breaker and log key.
    pub fn key(&self) -> String {
        format!("{}:{}", self.provider, self.model)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowlist {
    /// `MODEL_ALLOWLIST=*`: any model (development, model-sim knobs).
    Any,
    Only(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub default_model: String,
    pub short_model: Option<String>,
    pub short_max_chars: usize,
    pub allowlist: Allowlist,
}

/// Why a model was chosen (logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Requested,
    ShortPrompt,
    Default,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Requested => "requested",
            Reason::ShortPrompt => "short_prompt",
            Reason::Default => "default",
        }
    }
}

/// Short and simple: few characters, few lines, no code.
pub fn is_simple(message: &str, max_chars: usize) -> bool {
    message.chars().count() <= max_chars && message.lines().count() <= 3 && !message.contains("```")
}

impl Routing {
    pub fn allowed(&self, model: &str) -> bool {
        match &self.allowlist {
            Allowlist::Any => true,
            Allowlist::Only(list) => {
                model == self.default_model
                    || self.short_model.as_deref() == Some(model)
                    || list.iter().any(|m| m == model)
            }
        }
    }

    pub fn choose(
        &self,
        model: Option<&str>,
        system: Option<&str>,
        message: &str,
    ) -> Result<(String, Reason), ApiError> {
        if let Some(m) = model {
            if !self.allowed(m) {
                return Err(ApiError::bad_request(
                    "model_not_allowed",
                    format!("model {m:?} is not offered here; leave model out to use the default"),
                )
                .with_field("model"));
            }
            return Ok((m.to_owned(), Reason::Requested));
        }
        if let Some(short) = &self.short_model {
            if system.is_none() && is_simple(message, self.short_max_chars) {
                return Ok((short.clone(), Reason::ShortPrompt));
            }
        }
        Ok((self.default_model.clone(), Reason::Default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request: (model, system, message).
    type Req = (Option<&'static str>, Option<&'static str>, String);

    fn req(message: &str, model: Option<&'static str>) -> Req {
        (model, None, message.to_owned())
    }

    impl Routing {
        fn pick(&self, r: &Req) -> Result<(String, Reason), ApiError> {
            self.choose(r.0, r.1, &r.2)
        }
    }

    fn routing(allow: Allowlist) -> Routing {
        Routing {
            default_model: "big".into(),
            short_model: Some("fast".into()),
            short_max_chars: 40,
            allowlist: allow,
        }
    }

    #[test]
    fn short_simple_prompts_go_to_the_fast_model() {
        let r = routing(Allowlist::Any);
        assert_eq!(
            r.pick(&req("capital of France?", None)).unwrap(),
            ("fast".into(), Reason::ShortPrompt)
        );
        let long = "explain ".repeat(10);
        assert_eq!(
            r.pick(&req(&long, None)).unwrap(),
            ("big".into(), Reason::Default)
        );
        assert_eq!(
            r.pick(&req("fix ```x```", None)).unwrap().1,
            Reason::Default
        );
        assert_eq!(r.pick(&req("a\nb\nc\nd", None)).unwrap().1, Reason::Default);
        let mut with_system = req("hi", None);
        with_system.1 = Some("you are a poet");
        assert_eq!(r.pick(&with_system).unwrap().1, Reason::Default);
    }

    #[test]
    fn explicit_models_must_be_allowed() {
        let r = routing(Allowlist::Only(vec!["medium".into()]));
        assert_eq!(
            r.pick(&req("x", Some("medium"))).unwrap().1,
            Reason::Requested
        );
        assert_eq!(r.pick(&req("x", Some("big"))).unwrap().1, Reason::Requested);
        assert_eq!(
            r.pick(&req("x", Some("fast"))).unwrap().1,
            Reason::Requested
        );
        let e = r.pick(&req("x", Some("opus-everything"))).unwrap_err();
        assert_eq!(e.code, "model_not_allowed");
        assert_eq!(e.field.as_deref(), Some("model"));
        assert!(
            routing(Allowlist::Any)
                .pick(&req("x", Some("anything")))
                .is_ok()
        );
    }

    #[test]
    fn model_refs_split_only_on_known_providers() {
        assert_eq!(
            ModelRef::parse("openai:gpt-4o-mini", "anthropic"),
            ModelRef {
                provider: "openai".into(),
                model: "gpt-4o-mini".into()
            }
        );
        assert_eq!(
            ModelRef::parse("claude-x", "anthropic").provider,
            "anthropic"
        );
        let b = ModelRef::parse(
            "bedrock:anthropic.claude-3-5-haiku-20241022-v1:0",
            "anthropic",
        );
        assert_eq!(b.provider, "bedrock");
        assert_eq!(b.model, "anthropic.claude-3-5-haiku-20241022-v1:0");
        // A Bedrock-style id with a colon stays whole.
        let r = ModelRef::parse("anthropic.claude-3-5-sonnet-20240620-v1:0", "anthropic");
        assert_eq!(r.model, "anthropic.claude-3-5-sonnet-20240620-v1:0");
        assert_eq!(
            r.key(),
            "anthropic:anthropic.claude-3-5-sonnet-20240620-v1:0"
        );
    }
}
