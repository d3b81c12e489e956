#!/usr/bin/env bash
# Installs what runs the arm64 bootstraps on an x86 machine, from Debian's
# packages: qemu-user (the emulator) and libc6-arm64-cross (the arm64
# glibc the bootstrap is linked against, used as qemu's sysroot).
set -euo pipefail
if command -v qemu-aarch64 >/dev/null && [ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ]; then
  exit 0
fi
echo "installing qemu-user and libc6-arm64-cross (Debian packages)" >&2
sudo_=""
[ "$(id -u)" = 0 ] || sudo_=sudo
export DEBIAN_FRONTEND=noninteractive
$sudo_ apt-get install -y -qq qemu-user libc6-arm64-cross >&2 \
  || { $sudo_ apt-get update -qq >&2 && $sudo_ apt-get install -y -qq qemu-user libc6-arm64-cross >&2; }
