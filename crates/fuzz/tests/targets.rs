//! Every fuzz target over its corpus (the seeds and every crash found so
//! far), then over inputs mutated from it for a short random budget
//! (`FUZZ_BUDGET_MS` per target, default 1500; `FUZZ_SEED` replays a run).
//! A failing input is written to `target/fuzz-crashes/<target>/`: copy it
//! into `crates/fuzz/corpus/<target>/` and it is a regression test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn corpus(name: &str) -> Vec<(String, Arc<[u8]>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let mut out: Vec<(String, Arc<[u8]>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                Arc::from(bytes),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "{} has no seeds", dir.display());
    out
}

fn save_crash(name: &str, input: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/fuzz-crashes")
        .join(name);
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(fuzz_targets::corpus_name(input));
    let _ = std::fs::write(&p, input);
    p
}

fn run(name: &str) {
    let target = fuzz_targets::target(name).unwrap();
    let seeds = corpus(name);
    for (file, input) in &seeds {
        if std::panic::catch_unwind(|| target(input)).is_err() {
            panic!("corpus/{name}/{file} fails");
        }
    }
    let budget = std::env::var("FUZZ_BUDGET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let inputs: Vec<Arc<[u8]>> = seeds.iter().map(|(_, b)| b.clone()).collect();
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < Duration::from_millis(budget) {
        let base = &inputs[rng.usize(..inputs.len())];
        let input = fuzz_targets::mutate(&mut rng, base, &inputs);
        if std::panic::catch_unwind(|| target(&input)).is_err() {
            let p = save_crash(name, &input);
            panic!(
                "{name}: an input fails (FUZZ_SEED={seed}, after {runs} runs); saved to {}",
                p.display()
            );
        }
        runs += 1;
    }
    eprintln!(
        "{name}: {} seeds, {runs} mutated inputs in {budget} ms (FUZZ_SEED={seed})",
        seeds.len()
    );
    assert!(runs > 0);
}

#[test]
fn chat_request() {
    run("chat_request");
}

#[test]
fn openai_request() {
    run("openai_request");
}

#[test]
fn anthropic_sse() {
    run("anthropic_sse");
}

#[test]
fn openai_sse() {
    run("openai_sse");
}

#[test]
fn bedrock_events() {
    run("bedrock_events");
}

#[test]
fn sqs_turn() {
    run("sqs_turn");
}

#[test]
fn cursor() {
    run("cursor");
}

#[test]
fn jwt() {
    run("jwt");
}

#[test]
fn every_target_has_a_test_here() {
    let here = include_str!("targets.rs");
    for (name, _) in fuzz_targets::TARGETS {
        assert!(here.contains(&format!("fn {name}()")), "{name} has no test");
    }
}
