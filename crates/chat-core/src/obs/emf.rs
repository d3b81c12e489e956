//! CloudWatch metrics as Embedded Metric Format lines in the log: no
//! `PutMetricData` call on any path, CloudWatch Logs extracts them. One
//! line per request (or batch, or refresh) with all its metrics; few
//! dimensions: `function`, and `function` with `model` and `outcome` where
//! they apply.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Map, Value, json};

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
    pub fn line(&self, namespace: &str, function: &str, timestamp_ms: u64) -> String {
        let mut sets = vec![json!(["function"])];
        if !self.dims.is_empty() {
            let mut all = vec!["function"];
            all.extend(self.dims.iter().map(|(k, _)| *k));
            sets.push(json!(all));
        }
        let metrics: Vec<Value> = self
            .values
            .iter()
            .map(|(n, _, u)| json!({ "Name": n, "Unit": u.as_str() }))
            .collect();
        let mut root = Map::new();
        root.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": namespace,
                    "Dimensions": sets,
                    "Metrics": metrics,
                }],
            }),
        );
        root.insert("function".into(), function.into());
        for (k, v) in &self.dims {
            root.insert((*k).into(), v.clone().into());
        }
        for (k, v, _) in &self.values {
            root.insert((*k).into(), (*v).into());
        }
        for (k, v) in &self.props {
            root.entry(*k).or_insert_with(|| v.clone());
        }
        Value::Object(root).to_string()
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
        out.write_line(&self.line(ns, function, crate::util::now_ms()));
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
