"""Image checks against a hostile image server: slow headers, slow bodies, lying lengths,
redirects to private addresses and to locations that do not parse, answers that are not HTTP.

The server speaks raw HTTP/1.1 on a loopback socket so that it can misbehave in ways a real
HTTP library would not let it. Every case must end as an `ImageFetchError` (or a rule
violation) within the fetch time limit: never another exception, never a hang.
"""

from __future__ import annotations

import functools
import io
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from PIL import Image

from hailuo_batch import images
from hailuo_batch.images import ImageFetchError, check_image_rules, inspect_image
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.netguard import GuardedTransport, address_problem
from hailuo_batch.settings import Settings
from hailuo_batch.validation import preflight

MB = 1024 * 1024


def jpeg(width: int = 1280, height: int = 720) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 30, 160)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


PHOTO = jpeg()


def head(status: str = "200 OK", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def trickle(conn: socket.socket, data: bytes, interval: float, stop: threading.Event) -> None:
    for b in data:
        if stop.wait(interval):
            return
        conn.sendall(bytes([b]))


Route = Callable[[socket.socket, threading.Event], None]


class HostileServer:
    """Raw HTTP on 127.0.0.1; `/name` runs ROUTES[name]. Counts connections per route."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.hits: dict[str, int] = {}
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                path = request.split(b" ", 2)[1].decode("latin-1")
                name = path.strip("/").split("?", 1)[0]
                self.hits[name] = self.hits.get(name, 0) + 1
                route = self.routes.get(name)
                if route is None:
                    conn.sendall(head("404 Not Found", Content_Length="0"))
                else:
                    route(conn, self.stop)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def location(target: str) -> Route:
    def route(conn: socket.socket, stop: threading.Event) -> None:
        raw = b"HTTP/1.1 302 Found\r\nLocation: " + target.encode("utf-8", "surrogateescape")
        conn.sendall(raw + b"\r\nContent-Length: 0\r\n\r\n")

    return route


def send(data: bytes) -> Route:
    return lambda conn, stop: conn.sendall(data)


ROUTES: dict[str, Route] = {
    "good": send(head(Content_Length=str(len(PHOTO))) + PHOTO),
    # one header byte every 0.3 s: each read succeeds well inside any read timeout
    "slow-headers": lambda c, s: trickle(c, head(Content_Length=str(len(PHOTO))), 0.3, s),
    # headers at once, then the body one byte every 0.05 s
    "slow-body": lambda c, s: (
        c.sendall(head(Content_Length=str(len(PHOTO)))),
        trickle(c, PHOTO, 0.05, s),
    ),
    # says 1 MB, sends 2 KB, closes
    "short-body": send(head(Content_Length=str(MB)) + PHOTO[:2048]),
    # says 200 bytes: the header of a JPEG does not fit, whatever follows
    "length-too-small": send(head(Content_Length="200") + PHOTO),
    "length-huge": send(head(Content_Length="9" * 5000) + PHOTO),
    "size-huge": send(
        head(
            "206 Partial Content",
            Content_Length=str(len(PHOTO)),
            Content_Range=f"bytes 0-{len(PHOTO) - 1}/{10**15}",
        )
        + PHOTO
    ),
    "length-garbage": send(head(Content_Length="12, 13") + PHOTO),
    "range-lie-total": send(
        head(
            "206 Partial Content",
            Content_Length=str(len(PHOTO)),
            Content_Range=f"bytes 0-{len(PHOTO) - 1}/100",
        )
        + PHOTO
    ),
    "range-not-from-0": send(
        head(
            "206 Partial Content",
            Content_Length=str(len(PHOTO) - 10),
            Content_Range=f"bytes 10-{len(PHOTO) - 1}/{len(PHOTO)}",
        )
        + PHOTO[10:]
    ),
    "range-unreadable": send(
        head("206 Partial Content", Content_Length="4", Content_Range="bytes x-y/z") + b"abcd"
    ),
    # a range of unknown total (`/*`), no length, and the connection closes half way
    "star-short": send(
        head(
            "206 Partial Content",
            Content_Range=f"bytes 0-{len(PHOTO) - 1}/*",
            Connection="close",
        )
        + PHOTO[: len(PHOTO) // 2]
    ),
    "gzip": send(head(Content_Length=str(len(PHOTO)), Content_Encoding="gzip") + PHOTO),
    "not-http": send(b"SSH-2.0-OpenSSH_9.2\r\n"),
    "close-at-once": lambda c, s: None,
    "huge-header": send(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n"),
    "redirect-loop": location("/redirect-loop"),
    "to-metadata": location("http://169.254.169.254/latest/meta-data/"),
    "to-v6-loopback": location("http://[::1]:9/a.jpg"),
    "to-ten": location("http://10.1.2.3/a.jpg"),
    "to-file": location("file:///etc/passwd"),
    "to-ftp": location("ftp://127.0.0.1/a.jpg"),
    "to-s3": location("s3://bucket/a.jpg"),
    "to-bad-ipv6": location("http://[::1/a.jpg"),
    "to-bad-port": location("http://example.com:99999999/a.jpg"),
    "to-space-host": location("http://exa mple.com/a.jpg"),
    "to-control": location("http://example.com/\x01.jpg"),
    "to-non-utf8": location("http://ex\udcffample.com/"),
    "to-empty-host": location("http:///a.jpg"),
    "to-tab": location("http://example.com/\ta.jpg"),
    "to-bad-idna": location("http://xn--zz/a.jpg"),
    "to-empty": location(""),
    "to-data": location("data:image/png;base64,AAAA"),
    "to-backslashes": location("http:\\\\example.com\\a.jpg"),
    "to-chained": location("simplecache::http://example.com/a.jpg"),
    "to-bad-idna-empty": location("http://xn--/a.jpg"),
    "to-bad-idna-codepoint": location("https://xn--ls8h.la/a.jpg"),
}


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    srv = HostileServer(ROUTES)
    yield srv
    srv.close()


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "allow_private_networks": True,
        "fetch_timeout_s": 1.0,
        "connect_timeout_s": 1.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def test_the_server_serves_a_good_image(server: HostileServer) -> None:
    info = inspect_image(f"{server.base}/good", settings=settings())
    assert (info.format, info.width, info.height, info.size_bytes) == (
        "jpeg",
        1280,
        720,
        len(PHOTO),
    )


@pytest.mark.parametrize("route", ["slow-headers", "slow-body"])
def test_a_trickling_server_is_cut_off_by_the_fetch_limit(
    server: HostileServer, route: str
) -> None:
    # Without one deadline over the whole fetch, these would take minutes and then succeed
    # (slow-headers sends ~40 header bytes at 0.3 s each; slow-body ~12 KB at 0.05 s each).
    with pytest.raises(ImageFetchError, match="within the 1 s limit"):
        inspect_image(f"{server.base}/{route}", settings=settings())


@pytest.mark.parametrize(
    "route",
    [
        "short-body",
        "length-huge",
        "length-garbage",
        "not-http",
        "close-at-once",
        "huge-header",
    ],
)
def test_broken_answers_are_one_fetch_error(server: HostileServer, route: str) -> None:
    with pytest.raises(ImageFetchError, match="no complete HTTP answer"):
        inspect_image(f"{server.base}/{route}", settings=settings())


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("range-lie-total", "inconsistent size"),
        ("range-not-from-0", "not starting at 0"),
        ("range-unreadable", "unreadable range"),
        ("gzip", "sent compressed"),
        ("star-short", f"ended after {len(PHOTO) // 2} of the {len(PHOTO)} bytes of its range"),
        ("redirect-loop", "more than 5 redirects"),
        ("to-file", "not http"),
        ("to-ftp", "not http"),
        ("to-s3", "not http"),
        ("to-bad-ipv6", "does not parse"),
        ("to-bad-port", "does not parse"),
        ("to-space-host", "does not parse"),
        ("to-control", "does not parse"),
        ("to-tab", "does not parse"),
        ("to-bad-idna", "does not parse"),
        ("to-empty", "to nowhere"),
        ("to-data", "not http|does not parse"),
        ("to-backslashes", "not http|does not parse"),
        ("to-chained", "not http|does not parse"),
        ("to-bad-idna-empty", "does not parse"),
        ("to-bad-idna-codepoint", "does not parse"),
    ],
)
def test_lies_and_bad_redirects_are_fetch_errors(
    server: HostileServer, route: str, message: str
) -> None:
    with pytest.raises(ImageFetchError, match=message):
        inspect_image(f"{server.base}/{route}", settings=settings())


def test_a_length_too_small_for_the_header_breaks_a_rule(server: HostileServer) -> None:
    info = inspect_image(f"{server.base}/length-too-small", settings=settings())
    assert info.size_bytes == 200
    assert any("dimensions" in p for p in check_image_rules(info, max_bytes=20 * MB))


def test_an_announced_size_over_the_limit_breaks_a_rule(server: HostileServer) -> None:
    info = inspect_image(f"{server.base}/size-huge", settings=settings())
    assert info.size_bytes == 10**15
    assert any("over the limit" in p for p in check_image_rules(info, max_bytes=20 * MB))


def loopback_v4_is_public(addr: object) -> str | None:
    """Test policy: the hostile server on 127.0.0.1 stands in for a public host."""
    return None if str(addr) == "127.0.0.1" else address_problem(addr)  # type: ignore[arg-type]


@pytest.mark.parametrize("route", ["to-metadata", "to-v6-loopback", "to-ten"])
def test_redirects_to_private_addresses_are_refused_before_connecting(
    server: HostileServer, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        images,
        "GuardedTransport",
        functools.partial(GuardedTransport, address_policy=loopback_v4_is_public),
    )
    with pytest.raises(ImageFetchError, match="HAILUO_ALLOW_PRIVATE_NETWORKS=1"):
        inspect_image(f"{server.base}/{route}", settings=settings(allow_private_networks=False))


def test_with_the_guard_on_the_server_is_never_reached(server: HostileServer) -> None:
    before = dict(server.hits)
    with pytest.raises(ImageFetchError, match="loopback"):
        inspect_image(f"{server.base}/good", settings=settings(allow_private_networks=False))
    assert server.hits == before


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_preflight_turns_every_hostile_answer_into_a_verdict(
    server: HostileServer, route: str
) -> None:
    """The run's view: a verdict for every route, never an exception; only `good` is valid."""
    item = ManifestItem(
        id=f"r-{route}",
        row=1,
        image_url=f"{server.base}/{route}",
        prompt="p",
        mode="standard-image-to-video",  # type: ignore[arg-type]
        duration=6,
        provider="auto",  # type: ignore[arg-type]
    )
    verdict = preflight(item, settings=settings())
    assert verdict.ok is (route == "good")
    if not verdict.ok:
        assert verdict.field == "image_url" and verdict.errors
