#!/usr/bin/env bash
# Node.js and npm from Debian's packages (Node 20 on bookworm), for the
# JavaScript client tests (tests/clients): nothing downloads its own runtime.
set -euo pipefail
if command -v node >/dev/null && command -v npm >/dev/null; then
  exit 0
fi
echo "installing nodejs and npm (Debian packages)" >&2
sudo_=""
[ "$(id -u)" = 0 ] || sudo_=sudo
export DEBIAN_FRONTEND=noninteractive
$sudo_ apt-get install -y -qq nodejs npm >&2 \
  || { $sudo_ apt-get update -qq >&2 && $sudo_ apt-get install -y -qq nodejs npm >&2; }
