//! Knobs: how fast the sim answers, how much, and what goes wrong.
//!
//! Defaults come from flags/env ([`SimConfig`]); each request may override
//! them through `x-sim-*` headers or a `+key=value,...` suffix on the model
//! name (`claude-sim+ttft=50,tps=200,tokens=30,fault=drop-mid@5`), so a
//! test can steer the sim even through a service that only forwards the
//! model name.
//!
//! Faults (`fault=`):
//! - `status:CODE[:RETRY_AFTER_SECS]`: answer with that HTTP error.
//! - `stall-headers:MS`: wait before sending anything (not even headers).
//! - `stall-first:MS`: send headers and `message_start`, then stall before
//!   the first token.
//! - `stall-mid:MS[@N]`: stall after N tokens (default: half the answer).
//! - `drop-mid[@N]`: drop the connection after N tokens.
//! - `error-mid[:TYPE][@N]`: send an `error` event (default
//!   `overloaded_error`) after N tokens and end the stream.
//!
//! `echo=1` answers with the last user message's words instead.
//!
//! `times=N` limits the fault to the first N identical requests (same
//! model and messages); later ones are answered normally.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    Status { code: u16, retry_after: Option<u64> },
    StallHeaders(Duration),
    StallFirst(Duration),
    StallMid { after: Option<u32>, pause: Duration },
    DropMid { after: Option<u32> },
    ErrorMid { after: Option<u32>, kind: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Knobs {
    /// Time from headers to the first token.
    pub ttft: Duration,
    /// Tokens per second after the first; 0 means as fast as possible.
    pub tokens_per_sec: f64,
    /// Tokens in a full answer (capped by the request's `max_tokens`).
    pub output_tokens: u32,
    pub fault: Option<Fault>,
    /// Apply the fault only to the first N identical requests (same model
    /// and messages), then answer normally: "fails twice, then works".
    pub fault_times: Option<u32>,
    /// `echo=1`: the answer is the last user message's words (at the same
    /// pace), so a test can make the model say exactly what it needs
    /// (text that looks like HTML, say).
    pub echo: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            ttft: Duration::from_millis(300),
            tokens_per_sec: 60.0,
            output_tokens: 80,
            fault: None,
            fault_times: None,
            echo: false,
        }
    }
}

fn parse_ms(v: &str, what: &str) -> Result<Duration, String> {
    v.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{what}: {v:?} is not a whole number of milliseconds"))
}

fn split_at_sign(v: &str) -> Result<(&str, Option<u32>), String> {
    match v.split_once('@') {
        None => Ok((v, None)),
        Some((a, n)) => n
            .parse()
            .map(|n| (a, Some(n)))
            .map_err(|_| format!("fault: {n:?} after @ is not a token count")),
    }
}

pub fn parse_fault(v: &str) -> Result<Option<Fault>, String> {
    let v = v.trim();
    if v.is_empty() || v == "none" {
        return Ok(None);
    }
    let (head, after) = split_at_sign(v)?;
    let mut parts = head.split(':');
    let name = parts.next().unwrap_or("");
    let a1 = parts.next();
    let a2 = parts.next();
    let fault = match name {
        "status" => {
            let code = a1
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (400..=599).contains(c))
                .ok_or_else(|| format!("fault status needs a 4xx/5xx code, got {v:?}"))?;
            let retry_after = match a2 {
                None => None,
                Some(s) => Some(
                    s.parse()
                        .map_err(|_| format!("fault status: bad retry-after {s:?}"))?,
                ),
            };
            Fault::Status { code, retry_after }
        }
        "stall-headers" => Fault::StallHeaders(parse_ms(a1.unwrap_or(""), "stall-headers")?),
        "stall-first" => Fault::StallFirst(parse_ms(a1.unwrap_or(""), "stall-first")?),
        "stall-mid" => Fault::StallMid {
            after,
            pause: parse_ms(a1.unwrap_or(""), "stall-mid")?,
        },
        "drop-mid" => Fault::DropMid { after },
        "error-mid" => Fault::ErrorMid {
            after,
            kind: a1.unwrap_or("overloaded_error").to_owned(),
        },
        other => return Err(format!("unknown fault {other:?}")),
    };
    Ok(Some(fault))
}

impl Knobs {
    /// Applies one `key=value` override.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "ttft" | "ttft-ms" | "ttft_ms" => self.ttft = parse_ms(value, "ttft")?,
            "tps" | "tokens-per-sec" => {
                self.tokens_per_sec = value
                    .parse::<f64>()
                    .ok()
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .ok_or_else(|| format!("tps: {value:?} is not a rate"))?
            }
            "tokens" | "output-tokens" => {
                self.output_tokens = value
                    .parse()
                    .map_err(|_| format!("tokens: {value:?} is not a count"))?
            }
            "fault" => self.fault = parse_fault(value)?,
            "echo" => self.echo = matches!(value, "1" | "true" | "yes"),
            "times" => {
                self.fault_times = Some(
                    value
                        .parse()
                        .map_err(|_| format!("times: {value:?} is not a count"))?,
                )
            }
            other => return Err(format!("unknown sim knob {other:?}")),
        }
        Ok(())
    }

    /// Applies the `+k=v,k=v` suffix of a model name; returns the base name.
    pub fn apply_model_suffix<'a>(&mut self, model: &'a str) -> Result<&'a str, String> {
        let Some((base, spec)) = model.split_once('+') else {
            return Ok(model);
        };
        for kv in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("model knob {kv:?} is not key=value"))?;
            self.set(k, v)?;
        }
        Ok(base)
    }

    /// Token index after which a mid-stream fault fires.
    pub fn fault_point(after: Option<u32>, total: u32) -> u32 {
        after.unwrap_or(total / 2).min(total)
    }

    /// When token `i` (0-based) is due, relative to the first token.
    pub fn token_offset(&self, i: u32) -> Duration {
        if self.tokens_per_sec <= 0.0 || i == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(f64::from(i) / self.tokens_per_sec)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_suffix_sets_knobs() {
        let mut k = Knobs::default();
        let base = k
            .apply_model_suffix("claude-sim+ttft=5,tps=100,tokens=7,fault=drop-mid@3,times=2")
            .unwrap();
        assert_eq!(k.fault_times, Some(2));
        assert_eq!(base, "claude-sim");
        assert_eq!(k.ttft, Duration::from_millis(5));
        assert_eq!(k.tokens_per_sec, 100.0);
        assert_eq!(k.output_tokens, 7);
        assert_eq!(k.fault, Some(Fault::DropMid { after: Some(3) }));
    }

    #[test]
    fn faults_parse() {
        assert_eq!(
            parse_fault("status:429:3").unwrap(),
            Some(Fault::Status {
                code: 429,
                retry_after: Some(3)
            })
        );
        assert_eq!(
            parse_fault("error-mid:api_error@2").unwrap(),
            Some(Fault::ErrorMid {
                after: Some(2),
                kind: "api_error".into()
            })
        );
        assert_eq!(
            parse_fault("stall-mid:500").unwrap(),
            Some(Fault::StallMid {
                after: None,
                pause: Duration::from_millis(500)
            })
        );
        assert_eq!(parse_fault("none").unwrap(), None);
        for bad in [
            "status",
            "status:200",
            "stall-first",
            "drop-mid@x",
            "explode",
        ] {
            assert!(parse_fault(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_knob_is_an_error() {
        let mut k = Knobs::default();
        assert!(k.apply_model_suffix("m+speed=9").is_err());
        assert!(k.apply_model_suffix("m+ttft").is_err());
    }

    #[test]
    fn token_schedule_follows_the_rate() {
        let k = Knobs {
            tokens_per_sec: 10.0,
            ..Knobs::default()
        };
        assert_eq!(k.token_offset(0), Duration::ZERO);
        assert_eq!(k.token_offset(5), Duration::from_millis(500));
        assert_eq!(Knobs::fault_point(None, 10), 5);
        assert_eq!(Knobs::fault_point(Some(50), 10), 10);
    }
}
