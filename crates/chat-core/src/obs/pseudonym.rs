//! The user id in logs, spans and metrics: a keyed HMAC-SHA256 of it, so
//! lines of one user can be grouped (Logs Insights "tokens per user per
//! day") and no line names the user. A plain hash would not do: anyone
//! could hash candidate ids until one matches.
//!
//! The key comes from `LOG_USER_KEY` or the secret `LOG_USER_KEY_SECRET_ARN`
//! names (the template creates one), read once at start. Without either,
//! each process draws a random key: pseudonyms then differ between
//! instances (fine for a local run, said in a warning at start).

use std::sync::OnceLock;

use hmac::{Hmac, Mac};
use sha2::Sha256;

static KEY: OnceLock<Vec<u8>> = OnceLock::new();

/// Sets the key (the first call wins). Returns false when a key was set.
pub fn set_key(key: &[u8]) -> bool {
    KEY.set(key.to_vec()).is_ok()
}

fn key() -> &'static [u8] {
    KEY.get_or_init(|| {
        // The OS generator (uuid v4 draws from it), never a seeded PRNG.
        let mut k = uuid::Uuid::new_v4().as_bytes().to_vec();
        k.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        k
    })
}

/// `u_` and the first 16 bytes of HMAC-SHA256(key, user) in hex.
pub fn of(user: &str) -> String {
    with_key(key(), user)
}

fn with_key(key: &[u8], user: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return "u_unknown".to_owned();
    };
    mac.update(user.as_bytes());
    let out = mac.finalize().into_bytes();
    let mut s = String::with_capacity(34);
    s.push_str("u_");
    for b in &out[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pseudonym_is_keyed_stable_and_not_the_plain_hash() {
        let a = with_key(b"k1", "alice");
        assert_eq!(a, with_key(b"k1", "alice"));
        assert_ne!(a, with_key(b"k2", "alice"));
        assert_ne!(a, with_key(b"k1", "bob"));
        assert!(!a.contains("alice"));
        // RFC 4231 test case 2 (key "Jefe"), the first 16 bytes.
        assert_eq!(
            with_key(b"Jefe", "what do ya want for nothing?"),
            "u_5bdcc146bf60754e6a042426089575c7"
        );
        use sha2::Digest;
        let plain = sha2::Sha256::digest(b"alice");
        assert!(!a.contains(&format!("{:02x}{:02x}", plain[0], plain[1])));
    }
}
