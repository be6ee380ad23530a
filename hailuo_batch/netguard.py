"""What the pipeline may fetch: the accepted image URL forms and the private-network guard.

The pipeline reads user-supplied image URLs (to check them before paying) and provider-supplied
result URLs. Without a guard, a manifest could make the worker read cloud metadata
(169.254.169.254), internal services or local files.

Two layers, both without I/O until the last moment:

- `image_url_kind` accepts exactly three forms of image URL, before anything is read or staged:
  `http(s)://host/...`, `s3://bucket/key` and a plain local path. Every other fsspec form
  (`file:`, `ftp://`, `webhdfs://`, chained `simplecache::http://...`, `data:` ...) raises
  `ImageUrlError`, with one message whatever the target (no file-existence or port oracle).
- `GuardedTransport` is an httpx transport that resolves each host once, refuses the connection
  if any address is private, loopback, link-local or otherwise non-public (unless
  `HAILUO_ALLOW_PRIVATE_NETWORKS=1`), and connects to the very address it checked, so a second
  DNS answer cannot point elsewhere (DNS rebinding). Every connection, redirects included, goes
  through it. With a `deadline` it also bounds every DNS lookup, connect, TLS handshake, read
  and write by one wall-clock deadline, so a server trickling bytes cannot hold a fetch open.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import re
import select
import socket
import ssl
import time
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any, Literal
from urllib.parse import urlsplit

import httpcore
import httpx

from hailuo_batch.apixo.transport import decoded_url
from hailuo_batch.secrets import redact_urls

ALLOW_SETTING = "HAILUO_ALLOW_PRIVATE_NETWORKS=1"
ACCEPTED_FORMS = "http(s)://host/path, s3://bucket/key or a plain local file path"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ImageUrlKind = Literal["http", "s3", "local"]
AddressPolicy = Callable[[IPAddress], str | None]

_SCHEME_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
"""A valid S3 bucket name (lower case, digits, dots and hyphens; 3 to 63 characters)."""


class BlockedAddressError(ValueError):
    """The URL is not http(s), cannot be resolved, or resolves to a non-public address."""


class ImageUrlError(ValueError):
    """The image URL is not one of the accepted forms (nothing was read)."""


# --- accepted image URL forms (no I/O) --------------------------------------------------------


def control_character(text: str) -> str | None:
    """A description of the first control character or lone surrogate in `text`, or None."""
    for pos, ch in enumerate(text):
        if unicodedata.category(ch) in ("Cc", "Cs"):
            return f"U+{ord(ch):04X} at position {pos + 1}"
    return None


def format_character(text: str) -> str | None:
    """A description of the first invisible format character (Unicode category Cf: zero-width
    space U+200B, left-to-right mark U+200E, byte order mark U+FEFF, ...) in `text`, or None.
    Pasted after a URL it is invisible on screen, yet the server is asked for another name."""
    for pos, ch in enumerate(text):
        if unicodedata.category(ch) == "Cf":
            name = unicodedata.name(ch, "")
            return f"U+{ord(ch):04X}{' ' + name if name else ''} at position {pos + 1}"
    return None


def image_url_kind(url: str) -> ImageUrlKind:
    """Which accepted form `url` is ("http", "s3" or "local"); `ImageUrlError` for anything else.

    Pure: never resolves, opens or stats anything, so the answer cannot depend on the target.
    Control characters, lone surrogates and invisible format characters (category Cf) are
    refused wherever they are, naming the character and its position.
    """
    if not isinstance(url, str) or not url.strip():
        raise ImageUrlError(f"image URL is empty: use {ACCEPTED_FORMS}")
    bad = control_character(url)
    if bad:
        raise ImageUrlError(f"image URL contains a control character ({bad}): remove it")
    bad = format_character(url)
    if bad:
        raise ImageUrlError(
            f"image URL contains an invisible format character ({bad}): remove it "
            "(in an http(s) URL, percent-encode it if the name really contains it)"
        )
    if url != url.strip():
        raise ImageUrlError("image URL starts or ends with white space: remove it")
    match = _SCHEME_PREFIX.match(url)
    scheme = match.group(1) if match else ""
    if scheme.lower() in ("http", "https"):
        _check_http_url(url)  # fetched with httpx only, never through fsspec
        return "http"
    if "::" in url:  # fsspec reads '::' as a chain of file systems
        raise ImageUrlError(
            f"chained URLs (with '::') are not accepted as image URLs: use {ACCEPTED_FORMS}"
        )
    if match is None:
        if "://" in url:
            raise ImageUrlError(f"image URL {_shown(url)} is not understood: use {ACCEPTED_FORMS}")
        return "local"
    if scheme == "s3":
        _check_s3_url(url)
        return "s3"
    if scheme.lower() == "s3":
        raise ImageUrlError(f"image URL {_shown(url)}: write the scheme in lower case (s3://)")
    raise ImageUrlError(
        f"image URL scheme {scheme.lower()!r} is not accepted: use {ACCEPTED_FORMS} "
        "(a local file whose name contains ':' can be written ./name)"
    )


def _check_http_url(url: str) -> None:
    if not re.match(r"^https?://", url, re.IGNORECASE):
        raise ImageUrlError(f"image URL {_shown(url)} lacks '//' after the scheme")
    if any(ch.isspace() for ch in url):
        raise ImageUrlError(
            f"image URL {_shown(url)} contains white space: percent-encode it (%20)"
        )
    if "\\" in url:
        raise ImageUrlError(f"image URL {_shown(url)} contains a backslash: use '/'")
    try:
        parsed = decoded_url(url)
        parts = urlsplit(url)
        port = parts.port
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
        raise ImageUrlError(f"image URL {_shown(url)} does not parse: {exc}") from None
    if not parsed.host or not parts.hostname:
        raise ImageUrlError(f"image URL {_shown(url)} has no host")
    if port == 0:
        raise ImageUrlError(f"image URL {_shown(url)} has port 0")


def _check_s3_url(url: str) -> None:
    rest = url[len("s3:") :]
    if not rest.startswith("//"):
        raise ImageUrlError(f"image URL {_shown(url)} lacks '//': write s3://bucket/key")
    bucket, _, key = rest[2:].partition("/")
    if not S3_BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ImageUrlError(
            f"image URL {_shown(url)}: {_shown(bucket)} is not a valid S3 bucket name"
        )
    if not key.strip("/"):
        raise ImageUrlError(f"image URL {_shown(url)} names no object: write s3://bucket/key")


def _shown(text: str, limit: int = 120) -> str:
    """`text` quoted for a message: a URL's password and signature redacted, escapes for
    control characters, cut to `limit` characters."""
    text = redact_urls(text)
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


# --- address policy ---------------------------------------------------------------------------


def address_problem(addr: IPAddress) -> str | None:
    """Why `addr` is not a public address, or None when it is public."""
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped or addr.sixtofour
        if mapped is not None:
            inner = address_problem(mapped)
            return f"maps to {mapped}, {inner}" if inner else None
    checks = [
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    ]
    for attr, label in checks:
        if getattr(addr, attr):
            return label
    if isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local:
        return "a site-local address"  # fec0::/10: deprecated, still routed inside some sites
    if any(addr in net for net in _NOT_GLOBAL_YET):
        return "not a public address"
    if not addr.is_global:
        return "not a public address"
    return None


#: ranges IANA set aside after this Python's `ipaddress` tables were written: the IPv6
#: documentation prefix 3fff::/20 (RFC 9637, 2024)
_NOT_GLOBAL_YET = (ipaddress.IPv6Network("3fff::/20"),)


def resolve_host(host: str, port: int | None) -> list[IPAddress]:
    """All addresses `host` resolves to (an IP literal resolves to itself, without DNS)."""
    return [addr for addr, _ in _resolve(host, port or 0, timeout=None)]


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


_DNS_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="hailuo-dns")


def _resolve(
    host: str, port: int, *, timeout: float | None
) -> list[tuple[IPAddress, tuple[int, Any]]]:
    """(address, (family, sockaddr)) for every address of `host`, in resolver order.

    With a `timeout` the lookup runs in a worker thread and is abandoned when it runs out (the
    system resolver cannot be interrupted; its own timeouts end the thread).
    """
    literal = _ip_literal(host)
    if literal is not None and "%" not in host:  # a scoped IPv6 literal goes to getaddrinfo
        if literal.version == 6:
            return [(literal, (socket.AF_INET6, (str(literal), port, 0, 0)))]
        return [(literal, (socket.AF_INET, (str(literal), port)))]
    host = host.strip("[]") if literal is not None else host

    def lookup() -> list[Any]:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    try:
        if timeout is None:
            infos = lookup()
        else:
            infos = _DNS_POOL.submit(lookup).result(timeout=max(timeout, 0.001))
    except concurrent.futures.TimeoutError:
        raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
    except (OSError, UnicodeError) as exc:
        raise BlockedAddressError(f"cannot resolve host {host!r}: {exc}") from exc
    out: list[tuple[IPAddress, tuple[int, Any]]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        addr = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if all(addr != seen for seen, _ in out):
            out.append((addr, (family, sockaddr)))
    if not out:
        raise BlockedAddressError(f"host {host!r} resolves to no address")
    return out


def _refusal(host: str, addr: IPAddress, problem: str) -> BlockedAddressError:
    return BlockedAddressError(
        f"refusing to fetch {host}: it resolves to {addr}, {problem}. "
        f"Set {ALLOW_SETTING} to allow private, loopback and link-local addresses."
    )


def check_url_allowed(url: str, *, allow_private: bool) -> None:
    """Raise `BlockedAddressError` unless `url` is http(s) and its host is public (or allowed).

    The scheme check always applies; the address check is skipped when `allow_private` is true.
    This is an early check only: it resolves the host, and a later connection may resolve it
    differently. Fetches must go through `GuardedTransport`, which checks what it connects to.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise BlockedAddressError(
            f"URL scheme {scheme or '(none)'!r} is not allowed: "
            "only http and https URLs are fetched"
        )
    host = parts.hostname
    if not host:
        raise BlockedAddressError(f"URL has no host: {redact_url(url)}")
    if allow_private:
        return
    try:
        port = parts.port
    except ValueError as exc:
        raise BlockedAddressError(f"URL has an invalid port: {redact_url(url)}") from exc
    for addr in resolve_host(host, port):
        problem = address_problem(addr)
        if problem:
            raise _refusal(host, addr, problem)


def redact_url(url: str) -> str:
    """The URL without credentials, query string or fragment, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unparseable URL)"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}"


_redact = redact_url  # the old private name


# --- the guarded transport --------------------------------------------------------------------


def _remaining(deadline: float | None, timeout: float | None) -> float | None:
    """The smaller of `timeout` and the time left before `deadline` (None: no bound)."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    return left if timeout is None else min(timeout, left)


class _SocketStream(httpcore.NetworkStream):
    """A blocking socket as an httpcore stream (what httpcore's own sync backend does)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(timeout)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc) or "read timed out") from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc) or "write timed out") from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        try:
            # The handshake as a whole is bounded by the socket timeout (CPython keeps one
            # deadline across its reads and writes).
            self._sock.settimeout(timeout)
            tls = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)
        except TimeoutError as exc:
            self._sock.close()
            raise httpcore.ConnectTimeout(str(exc) or "TLS handshake timed out") from exc
        except OSError as exc:
            self._sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return _SocketStream(tls)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object" and isinstance(self._sock, ssl.SSLSocket):
            return self._sock._sslobj  # type: ignore[attr-defined]
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _is_readable(self._sock)
        return None


def _is_readable(sock: socket.socket) -> bool:
    """True when the socket has data or EOF waiting (an idle keep-alive peer hung up)."""
    if sock.fileno() < 0:
        return True
    if hasattr(select, "poll"):  # select.select fails on descriptors above 1023
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation ends by the deadline, whatever the peer does."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float | None) -> None:
        self._inner = inner
        self._deadline = deadline

    def _bound(self, timeout: float | None, exc: type[Exception]) -> float | None:
        bound = _remaining(self._deadline, timeout)
        if bound is not None and bound <= 0:
            raise exc("the time limit for this fetch ran out")
        return bound

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._bound(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._bound(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bound = self._bound(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, bound), self._deadline
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class GuardedBackend(httpcore.NetworkBackend):
    """An httpcore network backend that connects only to checked addresses, within a deadline."""

    def __init__(
        self,
        allow_private: bool,
        *,
        deadline: float | None = None,
        address_policy: AddressPolicy = address_problem,
    ) -> None:
        self.allow_private = allow_private
        self.deadline = deadline
        self.address_policy = address_policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        bound = _remaining(self.deadline, timeout)
        if bound is not None and bound <= 0:
            raise httpcore.ConnectTimeout("the time limit for this fetch ran out")
        resolved = _resolve(host, port, timeout=bound)
        if not self.allow_private:
            for addr, _ in resolved:
                problem = self.address_policy(addr)
                if problem:
                    raise _refusal(host, addr, problem)
        last: Exception | None = None
        for addr, (family, sockaddr) in resolved:
            bound = _remaining(self.deadline, timeout)
            if bound is not None and bound <= 0:
                raise httpcore.ConnectTimeout("the time limit for this fetch ran out")
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(bound)
                if local_address is not None:
                    sock.bind((local_address, 0))
                sock.connect(sockaddr)
                self._check_peer(host, addr, sock)
                for option in socket_options or ():
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except BlockedAddressError:
                sock.close()
                raise
            except TimeoutError as exc:
                sock.close()
                last = httpcore.ConnectTimeout(str(exc) or "connect timed out")
                continue
            except OSError as exc:
                sock.close()
                last = httpcore.ConnectError(str(exc))
                continue
            return _DeadlineStream(_SocketStream(sock), self.deadline)
        assert last is not None
        raise last

    def _check_peer(self, host: str, addr: IPAddress, sock: socket.socket) -> None:
        """The connected peer is the address that was checked (belt and braces)."""
        peer = ipaddress.ip_address(str(sock.getpeername()[0]).split("%", 1)[0])
        if peer != addr:
            raise BlockedAddressError(
                f"refusing to fetch {host}: connected to {peer}, not the checked {addr}"
            )
        if not self.allow_private:
            problem = self.address_policy(peer)
            if problem:
                raise _refusal(host, peer, problem)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        raise BlockedAddressError("unix sockets are never fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """An httpx transport for untrusted URLs: pinned, checked addresses and an optional deadline.

    - Each connection resolves its host once, refuses it (`BlockedAddressError`, raised from the
      request) when any address is non-public and `allow_private` is false, and connects to the
      address that was checked. TLS still verifies the URL's host name.
    - `deadline` (a `time.monotonic()` value) bounds every DNS lookup, connect, TLS handshake,
      read and write of every connection this transport makes; past it they raise httpx
      timeouts. Use one transport per fetch when a deadline is set.
    - No proxy is used (an explicit transport makes httpx ignore HTTP(S)_PROXY): a proxy would
      connect on our behalf to addresses the guard never sees.
    - `address_policy` decides which addresses are refused (default `address_problem`).
    """

    def __init__(
        self,
        allow_private: bool = False,
        *,
        deadline: float | None = None,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits | None = None,
        http2: bool = False,
        address_policy: AddressPolicy = address_problem,
    ) -> None:
        # Not calling super().__init__: it would build a default pool (and TLS context) that is
        # replaced here. HTTPTransport's methods only use `self._pool`.
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify)
        self.backend = GuardedBackend(
            allow_private, deadline=deadline, address_policy=address_policy
        )
        self._pool = httpcore.ConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=http2,
            network_backend=self.backend,
        )
