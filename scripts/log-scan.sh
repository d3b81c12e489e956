#!/usr/bin/env bash
# After the tests: no captured log line (target/test-logs/: nextest's
# output of every test, passing ones included, and the logs of the
# binaries the tests ran) may contain a string from tests/planted.txt:
# the model key, API keys and message texts the log-scan test plants.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/test-logs}
shopt -s nullglob
files=("$dir"/*.log)
[ ${#files[@]} -gt 0 ] || { echo "log-scan: no logs in $dir" >&2; exit 1; }
# The planted strings must have been used: the log-scan test leaves its log.
[ -s "$dir/log_scan-chat-stream.log" ] || { echo "log-scan: the log-scan test left no log" >&2; exit 1; }
patterns=$(mktemp)
grep -v '^#' tests/planted.txt | sed '/^[[:space:]]*$/d' > "$patterns"
if grep -n -F -f "$patterns" "${files[@]}" | cut -c1-200 | sed 's/planted-[A-Za-z0-9-]*/<planted>/g' | head -20 | grep .; then
  rm -f "$patterns"
  echo "log-scan: planted secrets or message text appear in the logs above" >&2
  exit 1
fi
lines=$(cat "${files[@]}" | wc -l)
echo "log-scan: $(wc -l < "$patterns") planted strings, ${#files[@]} logs, $lines lines: none found"
rm -f "$patterns"
