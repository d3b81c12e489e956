//! CloudWatch metrics as Embedded Metric Format lines in the log: no
//! `PutMetricData` call on any path, CloudWatch Logs extracts them. One
//! line per request (or batch, or refresh) with all its metrics; few
//! dimensions: `function`, and `function` with `model` and `outcome` where
//! they apply.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use super::log::LogOut;

static ENABLED: AtomicBool = AtomicBool::new(true);
static SETUP: OnceLock<(String, String, LogOut)> = OnceLock::new();

/// Sets the namespace, the `function` dimension and the output (once; at
/// start). Until then lines go to stdout as `ChatRelay` / `local`.
pub fn configure(namespace: &str, function: &str, out: LogOut) {
    let _ = SETUP.set((namespace.to_owned(), function.to_owned(), out));
}

/// `METRICS_ENABLED`.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// CloudWatch units we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Milliseconds,
    Count,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Milliseconds => "Milliseconds",
            Unit::Count => "Count",
        }
    }
}

/// One EMF line in the making.
#[derive(Debug, Default)]
pub struct Metrics {
    dims: Vec<(&'static str, String)>,
    values: Vec<(&'static str, f64, Unit)>,
    props: Vec<(&'static str, Value)>,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// A dimension besides `function` (`model`, `outcome`).
    pub fn dim(mut self, name: &'static str, value: impl Into<String>) -> Metrics {
        self.dims.push((name, value.into()));
        self
    }

    pub fn ms(mut self, name: &'static str, value: f64) -> Metrics {
        self.values.push((name, value, Unit::Milliseconds));
        self
    }

    pub fn count(mut self, name: &'static str, value: f64) -> Metrics {
        self.values.push((name, value, Unit::Count));
        self
    }

    /// The current span's request id, trace id and user as properties.
    pub fn ids(mut self) -> Metrics {
        if !enabled() {
            return self;
        }
        let ids = super::current_ids();
        for (k, v) in [
            ("request_id", ids.request_id),
            ("trace_id", ids.trace_id),
            ("user", ids.user),
        ] {
            if let Some(v) = v {
                self.props.push((k, v.into()));
            }
        }
        self
    }

    /// A property that is not a metric (a request id, a trace id): found
    /// by Logs Insights, not a dimension.
    pub fn prop(mut self, name: &'static str, value: impl Into<Value>) -> Metrics {
        self.props.push((name, value.into()));
        self
    }

    /// The line, at `timestamp_ms`, for `namespace` and `function`.
    /// Written straight into one string (no JSON values built: this runs
    /// for every request). A name given twice keeps its last value; a
    /// property never hides a dimension or a metric.
    pub fn line(&self, namespace: &str, function: &str, timestamp_ms: u64) -> String {
        use std::fmt::Write as _;
        // Writing into a String cannot fail, nor can serialising a str or
        // a JSON value.
        fn text(out: &mut String, s: &str) {
            if let Ok(q) = serde_json::to_string(s) {
                out.push_str(&q);
            }
        }
        let last = |i: usize, name: &str, names: &mut dyn Iterator<Item = &'static str>| {
            !names.skip(i + 1).any(|n| n == name)
        };
        let dims: Vec<&(&'static str, String)> = self
            .dims
            .iter()
            .enumerate()
            .filter(|(i, (n, _))| {
                n != &"function" && last(*i, n, &mut self.dims.iter().map(|d| d.0))
            })
            .map(|(_, d)| d)
            .collect();
        let values: Vec<&(&'static str, f64, Unit)> = self
            .values
            .iter()
            .enumerate()
            .filter(|(i, (n, ..))| last(*i, n, &mut self.values.iter().map(|v| v.0)))
            .map(|(_, v)| v)
            .collect();
        let mut out = String::with_capacity(512);
        let _ = write!(
            out,
            "{{\"_aws\":{{\"Timestamp\":{timestamp_ms},\"CloudWatchMetrics\":[{{\"Namespace\":"
        );
        text(&mut out, namespace);
        out.push_str(",\"Dimensions\":[[\"function\"]");
        if !dims.is_empty() {
            out.push_str(",[\"function\"");
            for (k, _) in &dims {
                out.push(',');
                text(&mut out, k);
            }
            out.push(']');
        }
        out.push_str("],\"Metrics\":[");
        for (i, (n, _, u)) in values.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"Name\":");
            text(&mut out, n);
            let _ = write!(out, ",\"Unit\":\"{}\"}}", u.as_str());
        }
        out.push_str("]}]},\"function\":");
        text(&mut out, function);
        for (k, v) in &dims {
            out.push(',');
            text(&mut out, k);
            out.push(':');
            text(&mut out, v);
        }
        for (k, v, _) in &values {
            out.push(',');
            text(&mut out, k);
            out.push(':');
            // JSON has no NaN or infinity: those become null (as a JSON
            // value would have made them).
            if v.is_finite() {
                let _ = write!(
                    out,
                    "{}",
                    serde_json::Number::from_f64(*v).map_or_else(String::new, |n| n.to_string())
                );
            } else {
                out.push_str("null");
            }
        }
        let taken = |k: &str| {
            k == "_aws"
                || k == "function"
                || dims.iter().any(|d| d.0 == k)
                || values.iter().any(|v| v.0 == k)
        };
        let mut seen: Vec<&str> = Vec::new();
        for (k, v) in &self.props {
            if taken(k) || seen.contains(k) {
                continue;
            }
            seen.push(k);
            out.push(',');
            text(&mut out, k);
            out.push(':');
            if let Ok(j) = serde_json::to_string(v) {
                out.push_str(&j);
            }
        }
        out.push('}');
        out
    }

    /// Writes the line (nothing when metrics are off or empty).
    pub fn emit(self) {
        if !enabled() || self.values.is_empty() {
            return;
        }
        let (ns, function, out) = match SETUP.get() {
            Some((n, f, o)) => (n.as_str(), f.as_str(), o),
            None => ("ChatRelay", "local", &LogOut::Stdout),
        };
        out.write_line(self.line(ns, function, crate::util::now_ms()).as_bytes());
    }
}

/// Checks one line against the EMF specification: `_aws.Timestamp` a
/// number, `CloudWatchMetrics` a non-empty array of directives each with a
/// `Namespace`, `Dimensions` (arrays of at most 30 names, each a string
/// member of the line) and `Metrics` (at most 100, each `Name` a number
/// member of the line, `Unit` a CloudWatch unit). `Ok` with the metric
/// names.
pub fn validate(line: &str) -> Result<Vec<String>, String> {
    const UNITS: &[&str] = &[
        "Seconds",
        "Microseconds",
        "Milliseconds",
        "Bytes",
        "Kilobytes",
        "Megabytes",
        "Count",
        "Percent",
        "None",
        "Count/Second",
    ];
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let aws = v.get("_aws").ok_or("no _aws")?;
    if !aws.get("Timestamp").is_some_and(Value::is_u64) {
        return Err("_aws.Timestamp is not a whole number of ms".into());
    }
    let directives = aws
        .get("CloudWatchMetrics")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or("_aws.CloudWatchMetrics is not a non-empty array")?;
    let mut names = Vec::new();
    for d in directives {
        if !d
            .get("Namespace")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty() && n.len() <= 255)
        {
            return Err("a directive has no Namespace".into());
        }
        let sets = d
            .get("Dimensions")
            .and_then(Value::as_array)
            .ok_or("a directive has no Dimensions array")?;
        for set in sets {
            let set = set.as_array().ok_or("a dimension set is not an array")?;
            if set.len() > 30 {
                return Err("more than 30 dimensions in a set".into());
            }
            for name in set {
                let name = name.as_str().ok_or("a dimension name is not a string")?;
                if !v.get(name).is_some_and(Value::is_string) {
                    return Err(format!("dimension {name} is not a string member"));
                }
            }
        }
        let metrics = d
            .get("Metrics")
            .and_then(Value::as_array)
            .filter(|m| m.len() <= 100)
            .ok_or("Metrics is not an array of at most 100")?;
        for m in metrics {
            let name = m
                .get("Name")
                .and_then(Value::as_str)
                .ok_or("a metric has no Name")?;
            if !v.get(name).is_some_and(Value::is_number) {
                return Err(format!("metric {name} has no number value"));
            }
            let unit = m.get("Unit").and_then(Value::as_str).unwrap_or("None");
            if !UNITS.contains(&unit) {
                return Err(format!("metric {name} has unit {unit}"));
            }
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_line_is_valid_emf_with_its_dimensions_and_units() {
        let line = Metrics::new()
            .dim("model", "m1")
            .dim("outcome", "ok")
            .ms("TimeToFirstToken", 12.5)
            .count("CacheMiss", 1.0)
            .prop("request_id", "r1")
            .line("ns", "chat-stream", 1_700_000_000_000);
        assert_eq!(
            validate(&line),
            Ok(vec!["TimeToFirstToken".into(), "CacheMiss".into()])
        );
        let v: Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["function"], ["function", "model", "outcome"]])
        );
        assert_eq!(v["request_id"], "r1");
    }

    #[test]
    fn the_line_is_exactly_this_json() {
        // Escaped strings, a name given twice (the last value counts), a
        // property that would hide a metric (it does not), a property
        // given twice (the first counts), a value that is not finite.
        let line = Metrics::new()
            .dim("model", "m\"1\n")
            .ms("Total", 1.0)
            .count("Errors", 1.0)
            .ms("Total", 2.5)
            .count("Odd", f64::NAN)
            .prop("Total", "hidden")
            .prop("request_id", "r1")
            .prop("request_id", "r2")
            .prop("n", 3)
            .line("n\"s", "f", 7);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({
                "_aws": {"Timestamp": 7, "CloudWatchMetrics": [{
                    "Namespace": "n\"s",
                    "Dimensions": [["function"], ["function", "model"]],
                    "Metrics": [
                        {"Name": "Errors", "Unit": "Count"},
                        {"Name": "Total", "Unit": "Milliseconds"},
                        {"Name": "Odd", "Unit": "Count"},
                    ],
                }]},
                "function": "f",
                "model": "m\"1\n",
                "Errors": 1.0,
                "Total": 2.5,
                "Odd": null,
                "request_id": "r1",
                "n": 3,
            })
        );
    }

    #[test]
    fn the_validator_refuses_what_cloudwatch_would() {
        for bad in [
            r#"{"x":1}"#,
            r#"{"_aws":{"Timestamp":"now","CloudWatchMetrics":[]}}"#,
            r#"{"_aws":{"Timestamp":1,"CloudWatchMetrics":[{"Namespace":"n","Dimensions":[["f"]],"Metrics":[]}]}}"#,
            r#"{"_aws":{"Timestamp":1,"CloudWatchMetrics":[{"Namespace":"n","Dimensions":[],"Metrics":[{"Name":"A"}]}]}}"#,
            r#"{"_aws":{"Timestamp":1,"CloudWatchMetrics":[{"Namespace":"n","Dimensions":[],"Metrics":[{"Name":"A","Unit":"ms"}]}]},"A":1}"#,
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }
}
