#!/usr/bin/env python3
"""`make smoke URL=... [KEY=...] [ORIGIN=...]`: the check to run right
after a deploy (and what `make test` runs against the local server).
Standard library only.

1. The answer streams: it arrives in several reads; prints the time to the
   first delta.
2. A repeat at temperature 0 is a cache hit (where a cache is configured).
3. History continues: a second turn in the same conversation is answered,
   and the conversation lists both.
4. No credentials: 401 with a JSON body.
5. CORS: a preflight from ORIGIN (an allowed one) passes, from another
   origin fails.
Exits non-zero on a failed check; prints one line per check and a final
'N passed, N failed'."""

import http.client
import json
import sys
import time
import uuid
from urllib.parse import urlsplit


def conn(url):
    u = urlsplit(url)
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    return cls(u.hostname, u.port, timeout=60), (u.path.rstrip("/") or "")


def request(url, method, path, body=None, headers=None):
    c, base = conn(url)
    h = {"content-type": "application/json"}
    h.update(headers or {})
    c.request(method, base + path, body=json.dumps(body) if body is not None else None, headers=h)
    return c, c.getresponse()


def stream(url, key, body):
    """POSTs /chat; gives (status, headers, events, reads, first delta s)."""
    t0 = time.perf_counter()
    c, r = request(url, "POST", "/chat", body, {"authorization": f"Bearer {key}"} if key else {})
    if r.status != 200:
        return r.status, dict(r.getheaders()), [], 0, None, r.read()
    buf, events, reads, first = "", [], 0, None
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        reads += 1
        buf += chunk.decode()
        while "\n\n" in buf:
            raw, buf = buf.split("\n\n", 1)
            ev = {"event": "message", "data": ""}
            for line in raw.split("\n"):
                if line.startswith("event: "):
                    ev["event"] = line[7:]
                elif line.startswith("data: "):
                    ev["data"] += line[6:]
            if ev["event"] == "delta" and first is None:
                first = time.perf_counter() - t0
            events.append(ev)
    c.close()
    return 200, {k.lower(): v for k, v in r.getheaders()}, events, reads, first, b""


def main():
    args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    url, key, origin = args.get("URL", ""), args.get("KEY", ""), args.get("ORIGIN", "")
    if not url:
        raise SystemExit("usage: smoke.py URL=https://....lambda-url....on.aws/ [KEY=api-key] [ORIGIN=https://app.example]")
    results = []

    def check(name, ok, detail):
        results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")

    question = f"smoke test {uuid.uuid4().hex[:8]}: say hello"
    body = {"message": question, "temperature": 0, "max_tokens": 64}
    status, headers, events, reads, first, err = stream(url, key, body)
    kinds = [e["event"] for e in events]
    check("stream", status == 200 and kinds[:1] == ["meta"] and kinds[-1:] == ["done"] and reads > 1,
          f"HTTP {status}, {len(events)} events in {reads} reads, first delta after "
          f"{(first or 0) * 1000:.0f} ms {err.decode()[:200] if err else ''}")
    meta = json.loads(events[0]["data"]) if events else {}

    status2, headers2, events2, _, _, _ = stream(url, key, body)
    x_cache = headers2.get("x-cache", "")
    if headers.get("x-cache") == "bypass" or (x_cache == "miss" and headers.get("x-cache") == "miss"):
        print(f"skip cache: the deployment answered x-cache={x_cache} twice (no cache configured?)")
    else:
        check("cache", status2 == 200 and x_cache == "hit", f"repeat answered x-cache={x_cache}")

    conv = meta.get("conversation_id")
    status3, _, events3, _, _, _ = stream(url, key, {"message": "and again, briefly", "conversation_id": conv, "max_tokens": 32})
    c, r = request(url, "GET", f"/conversations/{conv}", headers={"authorization": f"Bearer {key}"} if key else {})
    listed = json.loads(r.read() or b"{}")
    n = len(listed.get("messages", []))
    check("history", status3 == 200 and [e["event"] for e in events3][-1:] == ["done"] and n >= 2,
          f"second turn HTTP {status3}; the conversation lists {n} messages")

    c, r = request(url, "POST", "/chat", {"message": "hi"})
    body401 = r.read()
    try:
        code = json.loads(body401).get("code")
    except ValueError:
        code = None
    check("no credentials", r.status == 401 and code is not None, f"HTTP {r.status} code {code}")

    if origin:
        pre = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}
        c, r = request(url, "OPTIONS", "/chat", headers={**pre, "origin": origin})
        r.read()
        allowed = r.getheader("access-control-allow-origin")
        check("CORS allowed origin", allowed in (origin, "*"), f"{origin}: allow-origin {allowed!r}")
        other = "https://not-allowed.example"
        c, r = request(url, "OPTIONS", "/chat", headers={**pre, "origin": other})
        r.read()
        denied = r.getheader("access-control-allow-origin")
        check("CORS other origin", denied not in (other, "*"), f"{other}: allow-origin {denied!r}")
    else:
        print("skip CORS: give ORIGIN=<an allowed origin>")

    passed = sum(results)
    print(f"smoke: {passed} passed, {len(results) - passed} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
