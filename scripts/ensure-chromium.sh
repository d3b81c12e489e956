#!/usr/bin/env bash
# Debian's chromium, for the browser test of the chat page (tests/web):
# Playwright drives it through playwright-core, which downloads no browser.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
echo "installing chromium (Debian package)" >&2
sudo_=""
[ "$(id -u)" = 0 ] || sudo_=sudo
export DEBIAN_FRONTEND=noninteractive
$sudo_ apt-get install -y -qq chromium >&2 \
  || { $sudo_ apt-get update -qq >&2 && $sudo_ apt-get install -y -qq chromium >&2; }
