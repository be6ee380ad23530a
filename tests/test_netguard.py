from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hailuo_batch.netguard import (
    BlockedAddressError,
    GuardedTransport,
    ImageUrlError,
    address_problem,
    check_url_allowed,
    control_character,
    format_character,
    image_url_kind,
)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.jpg",
        "http://10.1.2.3/a.jpg",
        "https://172.16.0.1/a.jpg",
        "http://192.168.1.1:8080/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/a.jpg",
        "http://224.0.0.1/a.jpg",
        "http://240.0.0.1/a.jpg",
        "http://[::1]/a.jpg",
        "http://[::]/a.jpg",
        "http://[fe80::1]/a.jpg",
        "http://[fc00::1]/a.jpg",
        "http://[::ffff:127.0.0.1]/a.jpg",
        "http://[::ffff:169.254.169.254]/a.jpg",
        "http://localhost:9000/a.jpg",
        "http://[fec0::1]/a.jpg",  # site-local (deprecated, still routed inside some sites)
        "http://[3fff::1]/a.jpg",  # documentation prefix (RFC 9637)
        "http://[2002:7f00:1::1]/a.jpg",  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused_with_the_setting_named(url: str) -> None:
    with pytest.raises(BlockedAddressError) as err:
        check_url_allowed(url, allow_private=False)
    assert "HAILUO_ALLOW_PRIVATE_NETWORKS=1" in str(err.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://93.184.216.34/a.jpg",
        "http://8.8.8.8:8080/a.jpg",
        "https://[2606:4700:4700::1111]/a.jpg",
        "https://[::ffff:93.184.216.34]/a.jpg",
    ],
)
def test_public_addresses_pass(url: str) -> None:
    check_url_allowed(url, allow_private=False)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1/a.jpg", "http://169.254.169.254/x", "http://[::1]/a.jpg"]
)
def test_allow_private_lets_private_addresses_through(url: str) -> None:
    check_url_allowed(url, allow_private=True)


@pytest.mark.parametrize(
    "url", ["ftp://93.184.216.34/a.jpg", "file:///etc/passwd", "s3://bucket/a.jpg", "/tmp/a.jpg"]
)
def test_only_http_and_https_schemes(url: str) -> None:
    with pytest.raises(BlockedAddressError, match="only http and https"):
        check_url_allowed(url, allow_private=True)


def test_every_resolved_address_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with one public and one private address is refused (DNS stubbed at the edge)."""

    def fake_getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        assert host == "images.example.com"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(BlockedAddressError, match=r"10\.0\.0\.5"):
        check_url_allowed("https://images.example.com/a.jpg", allow_private=False)


def test_unresolvable_host_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(BlockedAddressError, match="cannot resolve host"):
        check_url_allowed("https://nowhere.example/a.jpg", allow_private=False)


# --- accepted image URL forms -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://cdn.example.com/a.jpg", "http"),
        ("http://93.184.216.34:8080/x/y.png?sig=1#f", "http"),
        ("HTTPS://CDN.example.com/a.jpg", "http"),
        ("https://[2606:4700::1111]/a.jpg", "http"),
        ("https://user:pw@cdn.example.com/a.jpg", "http"),
        ("https://cdn.example.com/a.jpg?next=http://[::1]/x", "http"),  # never read by fsspec
        ("s3://my-bucket/in/a.jpg", "s3"),
        ("s3://my.bucket.v2/deep/key with space.png", "s3"),
        ("/data/images/a.jpg", "local"),
        ("images/a.jpg", "local"),
        ("./odd:name.jpg", "local"),
        ("//server/share/a.jpg", "local"),
    ],
)
def test_accepted_image_url_forms(url: str, kind: str) -> None:
    assert image_url_kind(url) == kind


@pytest.mark.parametrize(
    "url",
    [
        # other fsspec protocols
        "file:///etc/passwd",
        "file:/etc/passwd",
        "ftp://127.0.0.1/a.jpg",
        "webhdfs://127.0.0.1:50070/a.jpg",
        "sftp://127.0.0.1/a.jpg",
        "smb://127.0.0.1/share/a.jpg",
        "hdfs://127.0.0.1/a.jpg",
        "github://org:repo@sha/a.jpg",
        "memory://a.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        "gs://bucket/a.jpg",
        "s3a://bucket/a.jpg",
        "S3://bucket/a.jpg",
        "htp://example.com/a.jpg",
        "javascript:alert(1)",
        # chained URLs, in every position
        "simplecache::http://127.0.0.1/a.jpg",
        "zip://a.jpg::http://127.0.0.1/x.zip",
        "blockcache::s3://bucket/a.jpg",
        "images/a::b.jpg",
        # malformed http and s3
        "http:/example.com/a.jpg",
        "http:example.com/a.jpg",
        "https:///a.jpg",
        "http://",
        "http://[::1/a.jpg",
        "http://example.com:99999/a.jpg",
        "http://example.com:0/a.jpg",
        "http://exa mple.com/a.jpg",
        "http://example.com/a b.jpg",
        "http://example.com\\@evil.com/a.jpg",
        "s3:/bucket/a.jpg",
        "s3:bucket/a.jpg",
        "s3://",
        "s3://bucket",
        "s3://bucket/",
        "s3://Bucket_Name/a.jpg",
        "s3://../a.jpg",
        # a relative path that fsspec would read as a protocol
        "images/http://example.com/a.jpg",
        "C:\\images\\a.jpg",
        # control characters, surrogates, white space, empty
        "http://example.com/a.jpg\n",
        "http://exa\x00mple.com/a.jpg",
        "/tmp/a\x00.jpg",
        "/tmp/a\ud800.jpg",
        "https://example.com/\x7f.jpg",
        " https://example.com/a.jpg",
        # invisible format characters (category Cf): shown as nothing, sent as %E2%80%8B...
        "http://example.com/good.jpg\u200b",
        "https://example.com/good.jpg\u200e",
        "\ufeff/data/images/a.jpg",
        "s3://my-bucket/in/a\u2060.jpg",
        "https://exam\u00adple.com/a.jpg",
        "",
        "   ",
    ],
)
def test_every_other_form_is_refused_without_io(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_io(*args: object, **kwargs: object) -> None:
        raise AssertionError("image_url_kind must not do I/O")

    monkeypatch.setattr(socket, "getaddrinfo", no_io)
    monkeypatch.setattr(socket, "create_connection", no_io)
    monkeypatch.setattr("os.stat", no_io)
    with pytest.raises(ImageUrlError):
        image_url_kind(url)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_any_string_is_one_accepted_form_or_refused(text: str) -> None:
    """Never another exception; and what is accepted is one of the three forms."""
    try:
        kind = image_url_kind(text)
    except ImageUrlError:
        return
    if kind == "http":
        assert text.lower().startswith(("http://", "https://"))
    elif kind == "s3":
        assert text.startswith("s3://")
    else:
        assert "://" not in text and "::" not in text
        assert not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", text)
    assert control_character(text) is None
    assert format_character(text) is None


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(["http://", "https://", "s3://", "file://", "ftp://", "", "x::", "s3:"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
)
def test_prefixed_strings_never_escape_the_classifier(prefix: str, rest: str) -> None:
    try:
        kind = image_url_kind(prefix + rest)
    except ImageUrlError:
        return
    assert kind in ("http", "s3", "local")
    if prefix in ("file://", "ftp://", "x::"):
        raise AssertionError(f"{prefix + rest!r} was accepted as {kind}")


# --- the guarded transport: counted connections on real listeners --------------------------


class Listener:
    """A TCP listener on loopback that counts accepted connections and answers with `reply`."""

    def __init__(self, host: str = "127.0.0.1", reply: bytes | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.host = host
        self.accepted = 0
        self.reply = reply
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                if self.reply is not None:
                    try:
                        conn.recv(65536)
                        conn.sendall(self.reply)
                    except OSError:
                        pass

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/a.jpg"

    def close(self) -> None:
        self.sock.close()


OK_REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener(reply=OK_REPLY)
    yield lst
    lst.close()


def get(url: str, transport: GuardedTransport) -> httpx.Response:
    with httpx.Client(transport=transport, trust_env=False, timeout=5) as client:
        return client.get(url)


@pytest.mark.parametrize("host_form", ["127.0.0.1", "localhost", "127.1", "2130706433", "0x7f.1"])
def test_guard_never_connects_to_loopback(listener: Listener, host_form: str) -> None:
    url = f"http://{host_form}:{listener.port}/a.jpg"
    with pytest.raises(BlockedAddressError, match="HAILUO_ALLOW_PRIVATE_NETWORKS=1"):
        get(url, GuardedTransport(allow_private=False))
    assert listener.accepted == 0


def test_guard_allows_private_when_told(listener: Listener) -> None:
    assert get(listener.url, GuardedTransport(allow_private=True)).text == "ok"
    assert listener.accepted == 1


def test_refusal_is_the_same_for_open_and_closed_ports(listener: Listener) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    messages = []
    for port in (listener.port, closed_port):
        with pytest.raises(BlockedAddressError) as err:
            get(f"http://127.0.0.1:{port}/a.jpg", GuardedTransport(allow_private=False))
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert listener.accepted == 0


def loopback_v4_is_public(addr: object) -> str | None:
    """Test policy: 127.0.0.1 stands in for a public host; everything else as in production."""
    if str(addr) == "127.0.0.1":
        return None
    return address_problem(addr)  # type: ignore[arg-type]


def test_dns_rebinding_connects_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first answer is checked and used; a second lookup answering ::1 is never made."""
    public = Listener("127.0.0.1", reply=OK_REPLY)
    private = Listener("::1", reply=OK_REPLY)
    answers = [
        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", public.port))],
        [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", private.port, 0, 0))],
    ]
    lookups: list[str] = []

    def rebinding_getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        lookups.append(host)
        answer = answers[min(len(lookups), 2) - 1]
        # the attacker's second answer points at the private listener's port too
        return [
            (*a[:4], (a[4][0], public.port if a[0] == socket.AF_INET else private.port, *a[4][2:]))
            for a in answer
        ]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    transport = GuardedTransport(allow_private=False, address_policy=loopback_v4_is_public)
    try:
        resp = get(f"http://rebind.example:{public.port}/a.jpg", transport)
        assert resp.text == "ok"
        assert lookups == ["rebind.example"]  # resolved once, for the one connection
        assert (public.accepted, private.accepted) == (1, 0)
        # a new connection resolves again, and the private answer is refused
        with pytest.raises(BlockedAddressError, match="::1"):
            get(f"http://rebind.example:{public.port}/a.jpg", transport)
        assert private.accepted == 0
    finally:
        public.close()
        private.close()


def test_a_name_with_any_private_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    public = Listener("127.0.0.1", reply=OK_REPLY)

    def mixed(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", mixed)
    try:
        with pytest.raises(BlockedAddressError, match=r"10\.0\.0\.5"):
            get(
                f"http://mixed.example:{public.port}/",
                GuardedTransport(allow_private=False, address_policy=loopback_v4_is_public),
            )
        assert public.accepted == 0
    finally:
        public.close()


def test_redirects_through_the_transport_are_checked_on_every_hop() -> None:
    private = Listener("::1", reply=OK_REPLY)
    hop = Listener(
        "127.0.0.1",
        reply=(
            f"HTTP/1.1 302 Found\r\nLocation: {private.url}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n"
        ).encode(),
    )
    try:
        transport = GuardedTransport(allow_private=False, address_policy=loopback_v4_is_public)
        with httpx.Client(transport=transport, follow_redirects=True, trust_env=False) as c:
            with pytest.raises(BlockedAddressError, match="::1"):
                c.get(hop.url)
        assert (hop.accepted, private.accepted) == (1, 0)
    finally:
        hop.close()
        private.close()


# --- the deadline ----------------------------------------------------------------------------


class Trickler:
    """Accepts, then sends `payload` one byte per `interval` seconds (a slow-loris server)."""

    def __init__(self, payload: bytes, interval: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.payload, self.interval = payload, interval
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            for b in self.payload:
                if self.stop.wait(self.interval):
                    return
                try:
                    conn.sendall(bytes([b]))
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_deadline_ends_a_fetch_whose_headers_trickle() -> None:
    """Each byte arrives well inside the read timeout; only the deadline can stop it."""
    slow = Trickler(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", interval=0.2)
    try:
        started = time.monotonic()
        transport = GuardedTransport(allow_private=True, deadline=started + 0.6)
        with pytest.raises(httpx.TimeoutException):
            with httpx.Client(transport=transport, timeout=5, trust_env=False) as c:
                c.get(f"http://127.0.0.1:{slow.port}/")
        # without the deadline the answer would arrive whole after ~9 s (each byte is well
        # inside the 5 s read timeout), so the request would succeed
    finally:
        slow.close()


def test_a_passed_deadline_connects_to_nothing(listener: Listener) -> None:
    transport = GuardedTransport(allow_private=True, deadline=time.monotonic() - 1)
    with pytest.raises(httpx.ConnectTimeout):
        get(listener.url, transport)
    assert listener.accepted == 0


@pytest.mark.parametrize(
    "url",
    [
        "https://bob:Hunter2pw@cdn.example/a b.jpg",
        "https://cdn.example/a.jpg?X-Amz-Signature=SIGSECRET&x=\\y",
        "http:/bob:Hunter2pw@cdn.example/a.jpg?X-Amz-Signature=SIGSECRET",
    ],
)
def test_a_refused_image_urls_password_and_signature_stay_out_of_the_reason(url: str) -> None:
    with pytest.raises(ImageUrlError) as err:
        image_url_kind(url)
    assert "Hunter2pw" not in str(err.value) and "SIGSECRET" not in str(err.value)
