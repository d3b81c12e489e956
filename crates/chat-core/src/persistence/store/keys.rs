//! Key shapes of every item, and the opaque page cursor.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{Item, StoreError, s};

pub fn conv_pk(id: &str) -> String {
    format!("CONV#{id}")
}
pub const META_SK: &str = "META";
pub fn turn_sk(started_at_ms: u64, turn_id: &str) -> String {
    format!("TURN#{started_at_ms:013}#{turn_id}")
}
pub fn part_sk(started_at_ms: u64, turn_id: &str, k: u32) -> String {
    format!("PART#{started_at_ms:013}#{turn_id}#{k:04}")
}
pub fn user_pk(id: &str) -> String {
    format!("USER#{id}")
}
pub fn usage_sk(day: &str) -> String {
    format!("USAGE#{day}")
}
pub fn cache_pk(key: &str) -> String {
    format!("CACHE#{key}")
}
pub const CACHE_SK: &str = "CACHE";

pub fn api_key_pk(hash_hex: &str) -> String {
    format!("APIKEY#{hash_hex}")
}
pub const GSI1: &str = "GSI1";
/// A user's index entry of one of their API keys (by hash).
pub fn user_key_sk(hash_hex: &str) -> String {
    format!("APIKEY#{hash_hex}")
}

/// A page position, opaque to clients: the LastEvaluatedKey as base64url
/// JSON. Decoding checks it belongs to the partition being read, so a
/// crafted cursor cannot step into someone else's data.
pub fn encode_cursor(key: &Item) -> String {
    let map: serde_json::Map<String, serde_json::Value> = key
        .iter()
        .filter_map(|(k, v)| v.as_s().ok().map(|s| (k.clone(), s.clone().into())))
        .collect();
    URL_SAFE_NO_PAD.encode(serde_json::Value::Object(map).to_string())
}

/// `partition` is the (attribute, value) the cursor must carry; `sort`
/// names the other key attributes it may carry.
pub fn decode_cursor(
    cursor: &str,
    partition: (&str, &str),
    others: &[&str],
) -> Result<Item, StoreError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor.trim())
        .map_err(|_| StoreError::BadCursor)?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes).map_err(|_| StoreError::BadCursor)?;
    let mut out = Item::new();
    for (k, v) in map {
        let ok = k == partition.0 || others.contains(&k.as_str());
        let serde_json::Value::String(v) = v else {
            return Err(StoreError::BadCursor);
        };
        if !ok {
            return Err(StoreError::BadCursor);
        }
        out.insert(k, s(v));
    }
    if out
        .get(partition.0)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
        != Some(partition.1)
        || out.len() != others.len() + 1
    {
        return Err(StoreError::BadCursor);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_stay_in_their_partition() {
        let mut key = Item::new();
        key.insert("PK".into(), s("CONV#a"));
        key.insert("SK".into(), s("TURN#1"));
        let c = encode_cursor(&key);
        assert_eq!(decode_cursor(&c, ("PK", "CONV#a"), &["SK"]).ok(), Some(key));
        assert!(decode_cursor(&c, ("PK", "CONV#b"), &["SK"]).is_err());
        assert!(decode_cursor("not base64!", ("PK", "CONV#a"), &["SK"]).is_err());
        let mut extra = Item::new();
        extra.insert("PK".into(), s("CONV#a"));
        extra.insert("SK".into(), s("x"));
        extra.insert("GSI1PK".into(), s("USER#b"));
        assert!(decode_cursor(&encode_cursor(&extra), ("PK", "CONV#a"), &["SK"]).is_err());
    }

    #[test]
    fn turn_keys_sort_in_time_order() {
        assert!(turn_sk(999, "z") < turn_sk(1000, "a"));
        assert!(part_sk(5, "t", 9) < part_sk(5, "t", 10));
    }
}
