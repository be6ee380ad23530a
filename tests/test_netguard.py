from __future__ import annotations

import socket

import pytest

from hailuo_batch.netguard import BlockedAddressError, check_url_allowed


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
