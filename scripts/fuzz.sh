#!/usr/bin/env bash
# make fuzz: every fuzz target under AFL++ (Debian's afl++ package), on
# stable Rust. cargo-afl would build AFL++ from source; Debian ships the
# fuzzer and its compiler runtime, so the targets are built here the way
# cargo-afl builds them: LLVM's SanitizerCoverage (trace-pc-guard) with
# AFL++'s runtime linked in, which supplies the fork server.
#
#   FUZZ_SECONDS=60 (per target)  FUZZ_TARGETS="chat_request jwt ..."
#
# Seeds: crates/fuzz/corpus/<target>/. Crashes are copied to
# target/fuzz-crashes/<target>/ and the script fails; copy a crash into the
# corpus folder and `cargo test -p fuzz-targets` replays it for ever.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"chat_request openai_request anthropic_sse openai_sse bedrock_events sqs_turn cursor jwt"}

if ! command -v afl-fuzz >/dev/null; then
  echo "installing afl++ (Debian package)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q afl++ >/dev/null; else sudo apt-get install -y -q afl++ >/dev/null; fi
fi
rt=$(ls /usr/lib/afl/afl-compiler-rt.o 2>/dev/null || true)
[ -n "$rt" ] || { echo "fuzz.sh: AFL++'s compiler runtime (afl-compiler-rt.o) is missing" >&2; exit 1; }

export RUSTFLAGS="-C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=3 \
 -C llvm-args=-sanitizer-coverage-trace-pc-guard -C llvm-args=-sanitizer-coverage-prune-blocks=0 \
 -C llvm-args=-sanitizer-coverage-trace-compares -C link-arg=$rt"
cargo build --profile fuzz -p fuzz-targets --bin fuzz-afl --target-dir target/afl
bin=target/afl/fuzz/fuzz-afl

export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_QUIET=1
mkdir -p target/afl-out
found=0
for t in $targets; do
  out=target/afl-out/$t
  rm -rf "$out"
  echo "== $t: ${secs}s"
  afl-fuzz -i "crates/fuzz/corpus/$t" -o "$out" -V "$secs" -t 2000 -m none -- "$bin" "$t" >"$out.log" 2>&1 || {
    echo "afl-fuzz failed for $t:"; tail -20 "$out.log"; exit 1; }
  stats=$out/default/fuzzer_stats
  printf '   execs %s, paths %s, crashes %s, hangs %s\n' \
    "$(awk -F': ' '/^execs_done/{print $2}' "$stats")" \
    "$(awk -F': ' '/^corpus_count/{print $2}' "$stats")" \
    "$(awk -F': ' '/^saved_crashes/{print $2}' "$stats")" \
    "$(awk -F': ' '/^saved_hangs/{print $2}' "$stats")"
  shopt -s nullglob
  crashes=("$out"/default/crashes/id:*)
  if [ ${#crashes[@]} -gt 0 ]; then
    mkdir -p "target/fuzz-crashes/$t"
    cp "${crashes[@]}" "target/fuzz-crashes/$t/"
    echo "   crashes saved in target/fuzz-crashes/$t/"
    found=1
  fi
done
exit $found
