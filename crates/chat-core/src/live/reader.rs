//! Reads a live stream back in order.

use std::collections::VecDeque;
use std::time::Duration;

use super::{Entry, LiveError};

/// Reads a stream's entries in order, blocking up to a period for new ones.
pub struct Reader {
    pub(super) conn: crate::redis::Conn,
    pub(super) key: String,
    pub(super) last: String,
    pub(super) block: Duration,
    pub(super) pending: VecDeque<Entry>,
    /// The id the next numbered entry must have.
    pub(super) expect: u64,
}

/// Checks that numbered entries come in order without a hole (`abort`,
/// which carries id 0, is outside the numbering); a repeated id is
/// passed over.
pub(super) fn in_order(expect: &mut u64, seq: u64) -> Result<bool, LiveError> {
    if seq == 0 {
        return Ok(true);
    }
    if seq > *expect {
        return Err(LiveError::Gap);
    }
    let fresh = seq == *expect;
    *expect = (*expect).max(seq + 1);
    Ok(fresh)
}

impl Reader {
    /// The next entry; `Ok(None)` when none arrived within the block
    /// period.
    /// `Err(Gap)` when entries were lost.
    pub async fn next(&mut self) -> Result<Option<Entry>, LiveError> {
        loop {
            let Some(e) = self.fetch().await? else {
                return Ok(None);
            };
            if in_order(&mut self.expect, e.seq)? {
                return Ok(Some(e));
            }
        }
    }

    async fn fetch(&mut self) -> Result<Option<Entry>, LiveError> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(Some(e));
        }
        let reply: redis::Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(self.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(&self.last)
            .query_async(&mut self.conn)
            .await
            .map_err(|_| LiveError::Unavailable)?;
        for (id, entry) in parse_xread(reply) {
            self.last = id;
            self.pending.push_back(entry);
        }
        Ok(self.pending.pop_front())
    }
}

/// `[[key, [[id, [field, value, ...]], ...]]]` (RESP2) or a map (RESP3)
/// into `(id, entry)` pairs; malformed entries are skipped.
fn parse_xread(reply: redis::Value) -> Vec<(String, Entry)> {
    use redis::Value;
    let streams: Vec<Value> = match reply {
        Value::Array(a) => a
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(m) => m.into_iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            continue;
        };
        for e in entries {
            let Value::Array(parts) = e else { continue };
            let [id, Value::Array(fields)] = parts.as_slice() else {
                continue;
            };
            let Some(id) = text(id) else { continue };
            // The entry's events one after another: `i e d i e d ...`.
            let (mut seq, mut event, mut data) = (None, None, None);
            for pair in fields.chunks(2) {
                let [k, v] = pair else { continue };
                match text(k).as_deref() {
                    Some("i") => seq = text(v).and_then(|s| s.parse::<u64>().ok()),
                    Some("e") => event = text(v),
                    Some("d") => data = text(v),
                    _ => {}
                }
                if let (Some(_), Some(_), Some(_)) = (&seq, &event, &data) {
                    let (seq, event, data) = (seq.take(), event.take(), data.take());
                    out.push((
                        id.clone(),
                        Entry {
                            seq: seq.unwrap_or_default(),
                            event: event.unwrap_or_default(),
                            data: data.unwrap_or_default(),
                        },
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{lock_key, owner_key, stream_key};
    use super::*;
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn a_hole_in_the_event_ids_is_a_gap() {
        let mut expect = 1;
        assert_eq!(in_order(&mut expect, 1), Ok(true));
        assert_eq!(in_order(&mut expect, 2), Ok(true));
        assert_eq!(
            in_order(&mut expect, 2),
            Ok(false),
            "a repeat is passed over"
        );
        assert_eq!(
            in_order(&mut expect, 0),
            Ok(true),
            "abort is outside the numbering"
        );
        assert_eq!(in_order(&mut expect, 4), Err(LiveError::Gap));
    }

    #[test]
    fn xread_replies_become_entries_in_order() {
        let entry = |id: &str, seq: &str, ev: &str, d: &str| {
            Value::Array(vec![
                bulk(id),
                Value::Array(vec![
                    bulk("i"),
                    bulk(seq),
                    bulk("e"),
                    bulk(ev),
                    bulk("d"),
                    bulk(d),
                ]),
            ])
        };
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("live:{t}"),
            Value::Array(vec![
                entry("1-0", "1", "meta", "{}"),
                entry("1-1", "2", "delta", "{\"text\":\"hi\"}"),
                // Missing field: skipped, not a panic.
                Value::Array(vec![bulk("1-2"), Value::Array(vec![bulk("i")])]),
                entry("1-3", "3", "done", "{}"),
                // Several events in one entry, in order.
                Value::Array(vec![
                    bulk("1-4"),
                    Value::Array(
                        [
                            "i", "4", "e", "delta", "d", "a", "i", "5", "e", "delta", "d", "b",
                        ]
                        .into_iter()
                        .map(bulk)
                        .collect(),
                    ),
                ]),
            ]),
        ])]);
        let got = parse_xread(reply);
        let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["1-0", "1-1", "1-3", "1-4", "1-4"]);
        assert_eq!(got[1].1.data, "{\"text\":\"hi\"}");
        assert!(got[2].1.is_terminal() && !got[1].1.is_terminal());
        let seqs: Vec<(u64, &str)> = got[3..]
            .iter()
            .map(|(_, e)| (e.seq, e.data.as_str()))
            .collect();
        assert_eq!(seqs, [(4, "a"), (5, "b")]);
        assert!(
            parse_xread(Value::Nil).is_empty(),
            "a timed-out read is empty"
        );
    }

    #[test]
    fn keys_share_a_slot_with_their_turn_or_cache_key() {
        assert_eq!(stream_key("t1"), "live:{t1}");
        assert_eq!(owner_key("t1"), "live:{t1}:owner");
        assert_eq!(lock_key("k{x}"), "lead:{k_x_}");
    }
}
