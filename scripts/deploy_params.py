#!/usr/bin/env python3
"""The parameters `make deploy` passes to `sam deploy`.

`sam deploy --parameter-overrides` replaces the environment's
parameter_overrides from samconfig.toml instead of merging (aws-sam-cli
issue 2380), so a PARAMS=... would silently drop prod's memory and
provisioned concurrency. This merges them (PARAMS wins per key) and adds
CodeSha256: a hash of the bootstraps and the merged parameters, so a
parameter change publishes a new version of the function behind the
`live` alias (SAM hashes the function before parameters are resolved).

Use: deploy_params.py ENV "Key=Value ..." [BOOTSTRAPS_DIR]"""

import hashlib
import shlex
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pairs(s):
    out = {}
    for kv in shlex.split(s or ""):
        if "=" not in kv:
            raise SystemExit(f"PARAMS: {kv!r} is not Key=Value")
        k, v = kv.split("=", 1)
        out[k] = v
    return out


def merged(env, params):
    conf = tomllib.loads((ROOT / "samconfig.toml").read_text())
    base = conf.get(env, {}).get("deploy", {}).get("parameters", {}).get("parameter_overrides", "")
    if env not in conf:
        raise SystemExit(f"ENV={env}: no such environment in samconfig.toml")
    m = pairs(base)
    m.update(pairs(params))
    return " ".join(f"{k}={v}" for k, v in m.items())


def code_sha(bootstraps, merged_params):
    h = hashlib.sha256()
    for f in sorted(Path(bootstraps).glob("*/bootstrap")):
        h.update(f.parent.name.encode())
        h.update(f.read_bytes())
    for kv in sorted(shlex.split(merged_params)):
        if not kv.startswith("CodeSha256="):
            h.update(kv.encode() + b"\0")
    return h.hexdigest()


def main(argv):
    env, params = argv[1], argv[2] if len(argv) > 2 else ""
    boots = argv[3] if len(argv) > 3 else str(ROOT / ".aws-sam" / "build")
    m = merged(env, params)
    print(f"{m} CodeSha256={code_sha(boots, m)}")


if __name__ == "__main__":
    main(sys.argv)
