//! Deterministic answer text: the same request always gets the same words,
//! different requests (almost always) different ones, so tests can compare
//! answers and caches can be checked for mix-ups.

const WORDS: &[&str] = &[
    "stream", "token", "lambda", "answer", "cache", "model", "latency", "request", "quick",
    "brown", "river", "mountain", "signal", "garden", "window", "silver", "engine", "paper",
    "orbit", "harbor", "lantern", "meadow", "copper", "violet", "thunder", "pebble", "canyon",
    "willow", "ember", "falcon", "glacier", "horizon", "island", "jasmine", "kettle", "ladder",
    "marble", "nectar", "oasis", "prairie", "quartz", "ribbon", "saddle", "timber", "umbrella",
    "valley", "walnut", "yonder", "zephyr", "anchor", "beacon", "cobalt", "dune", "echo", "fern",
    "granite", "hollow", "ivory", "juniper", "kelp", "lagoon", "mosaic", "north", "olive",
];

/// FNV-1a, 64 bit: stable across runs and platforms (unlike `DefaultHasher`).
pub fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// xorshift64*: tiny and good enough to pick words.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `n` tokens (one word each, with its leading space) seeded by `seed`.
pub fn tokens(seed: u64, n: u32) -> Vec<String> {
    let mut rng = Rng(seed | 1);
    let mut out = Vec::with_capacity(n as usize);
    let mut sentence_left = 0u64;
    for i in 0..n {
        let word = WORDS[(rng.next() % WORDS.len() as u64) as usize];
        let start = sentence_left == 0;
        if start {
            sentence_left = 6 + rng.next() % 8;
        }
        sentence_left -= 1;
        let mut t = String::with_capacity(word.len() + 2);
        if i > 0 {
            t.push(' ');
        }
        if start {
            let mut c = word.chars();
            if let Some(f) = c.next() {
                t.extend(f.to_uppercase());
                t.push_str(c.as_str());
            }
        } else {
            t.push_str(word);
        }
        if sentence_left == 0 || i + 1 == n {
            t.push('.');
        }
        out.push(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = tokens(fnv1a(&["m", "hello"]), 30).concat();
        let b = tokens(fnv1a(&["m", "hello"]), 30).concat();
        let c = tokens(fnv1a(&["m", "hello!"]), 30).concat();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.ends_with('.'));
        assert!(a.chars().next().is_some_and(char::is_uppercase));
    }

    #[test]
    fn count_is_exact() {
        assert_eq!(tokens(1, 0).len(), 0);
        assert_eq!(tokens(1, 17).len(), 17);
    }
}
