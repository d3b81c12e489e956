"""Shared by the benchmark scripts that run a function binary as Lambda
does: the request handler of a minimal Lambda Runtime API (the
`2018-06-01` endpoints a runtime polls)."""

import json
import time
from http.server import BaseHTTPRequestHandler


class RuntimeHandler(BaseHTTPRequestHandler):
    """Subclasses answer `do_GET` (`/next`) with `send_event` and read a
    `do_POST` (`/response`, `/error`) with `read_body`."""

    protocol_version = "HTTP/1.1"
    # As Go's net package (Lambda's Runtime API) has it: Nagle's algorithm
    # off on this side, so an event's body is not held behind its headers
    # waiting for the function's delayed ACK.
    disable_nagle_algorithm = True

    def log_message(self, *a):
        pass

    def send_event(self, request_id, event, function="f"):
        """Answers `/next` with `event` as invocation `request_id`."""
        body = json.dumps(event).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("lambda-runtime-aws-request-id", request_id)
        self.send_header("lambda-runtime-deadline-ms", str(int(time.time() * 1000) + 60000))
        self.send_header("lambda-runtime-invoked-function-arn",
                         f"arn:aws:lambda:us-east-1:123456789012:function:{function}")
        self.send_header("lambda-runtime-trace-id", "Root=1-00000000-000000000000000000000000;Sampled=0")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def read_body(self):
        """The request's body (streamed with chunked encoding, or whole),
        as (arrival time, bytes) per chunk."""
        chunks = []
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    # Trailers (if any), then an empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append((time.perf_counter(), self.rfile.read(size + 2)[:size]))
        else:
            chunks.append((time.perf_counter(), self.rfile.read(int(self.headers.get("content-length", "0")))))
        return chunks

    def accepted(self):
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()
