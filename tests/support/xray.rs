//! Reading X-Ray documents in tests.

use serde_json::Value;

/// The (sub)segment named `name` in `doc` or under it.
pub fn find_segment<'a>(doc: &'a Value, name: &str) -> Option<&'a Value> {
    if doc["name"] == name {
        return Some(doc);
    }
    doc["subsegments"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|c| find_segment(c, name))
}
