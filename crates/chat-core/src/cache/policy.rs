//! What the cache does for one request: the deployment's policy and the
//! request's `Cache-Control`. Pure.

use std::time::Duration;

/// A request's `Cache-Control` directives that the cache honours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub no_cache: bool,
    pub no_store: bool,
    pub max_age: Option<Duration>,
}

impl CacheControl {
    /// Parses a header value; unknown directives and malformed `max-age`
    /// values are ignored (as HTTP caches do).
    pub fn parse(value: &str) -> Self {
        let mut cc = CacheControl::default();
        for d in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let (name, arg) = match d.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (d, None),
            };
            match name.to_ascii_lowercase().as_str() {
                "no-cache" => cc.no_cache = true,
                "no-store" => cc.no_store = true,
                "max-age" => {
                    if let Some(secs) = arg.and_then(|a| a.parse::<u64>().ok()) {
                        cc.max_age = Some(Duration::from_secs(secs));
                    }
                }
                _ => {}
            }
        }
        cc
    }
}

/// Deployment-wide cache settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachePolicy {
    pub ttl: Duration,
    /// Also cache requests that sample (temperature > 0 or absent).
    pub cache_sampled: bool,
}

/// What to do for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub lookup: bool,
    pub store: bool,
    /// Accept only entries younger than this.
    pub max_age: Option<Duration>,
}

impl Plan {
    /// Neither look up nor store (the cache is off).
    pub const NONE: Plan = Plan {
        lookup: false,
        store: false,
        max_age: None,
    };
}

impl CachePolicy {
    pub fn plan(&self, temperature: Option<f32>, cc: CacheControl) -> Plan {
        let deterministic = temperature == Some(0.0);
        if (!deterministic && !self.cache_sampled) || cc.no_store {
            return Plan {
                lookup: false,
                store: false,
                max_age: None,
            };
        }
        Plan {
            lookup: !cc.no_cache,
            store: true,
            max_age: cc.max_age,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_directives() {
        assert_eq!(CacheControl::parse(""), CacheControl::default());
        let cc = CacheControl::parse("No-Cache, max-age=30, foo=bar");
        assert!(cc.no_cache && !cc.no_store);
        assert_eq!(cc.max_age, Some(Duration::from_secs(30)));
        assert!(CacheControl::parse("no-store").no_store);
        assert_eq!(CacheControl::parse("max-age=x").max_age, None);
        assert_eq!(
            CacheControl::parse("max-age=\"5\"").max_age,
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn the_plan_follows_temperature_and_cache_control() {
        let p = CachePolicy {
            ttl: Duration::from_secs(60),
            cache_sampled: false,
        };
        let none = CacheControl::default();
        let all = Plan {
            lookup: true,
            store: true,
            max_age: None,
        };
        let nothing = Plan {
            lookup: false,
            store: false,
            max_age: None,
        };
        assert_eq!(p.plan(Some(0.0), none), all);
        assert_eq!(p.plan(Some(0.7), none), nothing);
        assert_eq!(
            p.plan(None, none),
            nothing,
            "absent = provider default, which samples"
        );
        let sampled = CachePolicy {
            cache_sampled: true,
            ..p
        };
        assert_eq!(sampled.plan(Some(0.7), none), all);
        let no_cache = CacheControl::parse("no-cache");
        assert_eq!(
            p.plan(Some(0.0), no_cache),
            Plan {
                lookup: false,
                store: true,
                max_age: None
            }
        );
        assert_eq!(p.plan(Some(0.0), CacheControl::parse("no-store")), nothing);
        assert_eq!(
            p.plan(Some(0.0), CacheControl::parse("max-age=10")).max_age,
            Some(Duration::from_secs(10))
        );
    }
}
