"""A real HTTP server on 127.0.0.1 answering each request with the next scripted answer.

For what the emulator does not do on purpose: gzip-encoded bodies, a proxy's HTML page, a
provider that echoes the request in its error message. Each answer is a function of the
recorded request, so it can echo the body it received.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Seen:
    """A request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


Reply = Answer | Callable[[Seen], Answer]


class Loopback:
    """The running server: `url` is its base URL, `seen` the requests so far."""

    def __init__(self, replies: list[Reply], default: Reply | None) -> None:
        self.replies = replies
        self.default = default
        self.seen: list[Seen] = []
        self.url = ""
        self._lock = threading.Lock()

    def answer(self, seen: Seen) -> Answer:
        with self._lock:
            self.seen.append(seen)
            reply = self.replies.pop(0) if self.replies else self.default
        if reply is None:
            return Answer(599, b"unexpected request")
        return reply(seen) if callable(reply) else reply


def _handler(loop: Loopback) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            seen = Seen(
                self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body
            )
            answer = loop.answer(seen)
            self.send_response(answer.status)
            headers = {"Content-Length": str(len(answer.body)), **answer.headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(answer.body)

        do_GET = _serve
        do_POST = _serve

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def loopback(*replies: Reply, default: Reply | None = None) -> Iterator[Loopback]:
    """Serve `replies` in order (then `default`) on an ephemeral port of 127.0.0.1."""
    loop = Loopback(list(replies), default)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(loop))
    server.daemon_threads = True
    loop.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield loop
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
