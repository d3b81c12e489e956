//! The X-Ray trace header (`Root=1-...;Parent=...;Sampled=1`): what Lambda
//! gives each invocation (`Lambda-Runtime-Trace-Id`, `_X_AMZN_TRACE_ID`)
//! and what rides an SQS message as its `AWSTraceHeader` attribute.

/// A parsed trace header. Unknown parts (`Lineage=...`) are dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeader {
    /// `1-{8 hex: epoch seconds}-{24 hex}`.
    pub root: String,
    /// The segment or subsegment the next one hangs under (16 hex).
    pub parent: Option<String>,
    /// `Sampled=1`: X-Ray keeps this trace; we send subsegments only then.
    pub sampled: bool,
}

impl TraceHeader {
    /// Parses a header; `None` when it has no well-formed `Root`.
    pub fn parse(s: &str) -> Option<TraceHeader> {
        let mut root = None;
        let mut parent = None;
        let mut sampled = false;
        for part in s.split(';') {
            let Some((k, v)) = part.trim().split_once('=') else {
                continue;
            };
            match k {
                "Root" if valid_root(v) => root = Some(v.to_owned()),
                "Parent" if valid_id(v) => parent = Some(v.to_owned()),
                "Sampled" => sampled = v == "1",
                _ => {}
            }
        }
        Some(TraceHeader {
            root: root?,
            parent,
            sampled,
        })
    }

    /// A new sampled trace with no parent (a local run's own trace).
    pub fn new_root() -> TraceHeader {
        let secs = crate::util::now_ms() / 1000;
        TraceHeader {
            root: format!(
                "1-{:08x}-{:08x}{:016x}",
                secs as u32,
                fastrand::u32(..),
                fastrand::u64(..)
            ),
            parent: None,
            sampled: true,
        }
    }

    /// The header for a call made under the (sub)segment `parent`.
    pub fn child(&self, parent: &str) -> String {
        format!(
            "Root={};Parent={parent};Sampled={}",
            self.root,
            u8::from(self.sampled)
        )
    }
}

impl std::fmt::Display for TraceHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Root={}", self.root)?;
        if let Some(p) = &self.parent {
            write!(f, ";Parent={p}")?;
        }
        write!(f, ";Sampled={}", u8::from(self.sampled))
    }
}

/// A new (sub)segment id: 16 lowercase hex digits.
pub fn new_segment_id() -> String {
    format!("{:016x}", fastrand::u64(1..))
}

fn hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_root(v: &str) -> bool {
    let mut parts = v.split('-');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("1"), Some(t), Some(r), None) if t.len() == 8 && r.len() == 24 && hex(t) && hex(r)
    )
}

fn valid_id(v: &str) -> bool {
    v.len() == 16 && hex(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_headers_parse_and_round_trip() {
        let h = TraceHeader::parse(
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1;Lineage=a87bd80c:0",
        )
        .unwrap_or_else(|| unreachable!());
        assert_eq!(h.root, "1-5759e988-bd862e3fe1be46a994272793");
        assert_eq!(h.parent.as_deref(), Some("53995c3f42cd8ad8"));
        assert!(h.sampled);
        assert_eq!(
            h.to_string(),
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
        );
        assert_eq!(
            h.child("0123456789abcdef"),
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=0123456789abcdef;Sampled=1"
        );
    }

    #[test]
    fn malformed_headers_are_refused_and_unsampled_is_the_default() {
        assert_eq!(TraceHeader::parse(""), None);
        assert_eq!(TraceHeader::parse("Root=abc;Sampled=1"), None);
        assert_eq!(TraceHeader::parse("Root=1-5759e988-XYZ;Sampled=1"), None);
        let h = TraceHeader::parse("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=nothex")
            .unwrap_or_else(|| unreachable!());
        assert_eq!((h.parent, h.sampled), (None, false));
        let fresh = TraceHeader::new_root();
        assert_eq!(TraceHeader::parse(&fresh.to_string()), Some(fresh));
        assert!(valid_id(&new_segment_id()));
    }
}
