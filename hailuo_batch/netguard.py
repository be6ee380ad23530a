"""Refuse image URLs that point into private networks (SSRF guard).

The pipeline fetches user-supplied image URLs to check them before paying for a task. Without a
guard, a manifest could make the worker read cloud metadata (169.254.169.254) or internal
services. Every address the host resolves to is checked; any non-public one refuses the URL
unless the user opted in with `HAILUO_ALLOW_PRIVATE_NETWORKS=1`.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

ALLOW_SETTING = "HAILUO_ALLOW_PRIVATE_NETWORKS=1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddressError(ValueError):
    """The URL is not http(s), cannot be resolved, or resolves to a non-public address."""


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
    if not addr.is_global:
        return "not a public address"
    return None


def resolve_host(host: str, port: int | None) -> list[IPAddress]:
    """All addresses `host` resolves to (an IP literal resolves to itself, without DNS)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise BlockedAddressError(f"cannot resolve host {host!r}: {exc}") from exc
    addrs: list[IPAddress] = []
    for info in infos:
        raw = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
        addr = ipaddress.ip_address(raw)
        if addr not in addrs:
            addrs.append(addr)
    if not addrs:
        raise BlockedAddressError(f"host {host!r} resolves to no address")
    return addrs


def check_url_allowed(url: str, *, allow_private: bool) -> None:
    """Raise `BlockedAddressError` unless `url` is http(s) and its host is public (or allowed).

    The scheme check always applies; the address check is skipped when `allow_private` is true.
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
        raise BlockedAddressError(f"URL has no host: {_redact(url)}")
    if allow_private:
        return
    try:
        port = parts.port
    except ValueError as exc:
        raise BlockedAddressError(f"URL has an invalid port: {_redact(url)}") from exc
    for addr in resolve_host(host, port):
        problem = address_problem(addr)
        if problem:
            raise BlockedAddressError(
                f"refusing to fetch {host}: it resolves to {addr}, {problem}. "
                f"Set {ALLOW_SETTING} to allow private, loopback and link-local addresses."
            )


def _redact(url: str) -> str:
    """The URL without credentials or query string, for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}"
