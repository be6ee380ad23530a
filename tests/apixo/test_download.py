"""Downloads: the length a caller may verify against, content codings over real HTTP, and which
transport (and credentials) a result URL on another host is fetched with."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterator

import httpx
import pytest
from apixo_helpers import API_KEY, BASE_URL, Script, Sleeps
from loopback import Answer, loopback
from pydantic import SecretStr

from hailuo_batch.apixo import (
    ApixoClient,
    ApixoError,
    DownloadTooLargeError,
    RetryPolicy,
    UnexpectedResponseError,
)

VIDEO = b"\x00\x00\x00\x18ftypmp42" + os.urandom(20_000) + b"\x00" * 40_000  # compresses


def fetch(client: ApixoClient, url: str) -> tuple[int | None, str | None, bytes]:
    with client.stream_download(url, chunk_size=4096) as dl:
        return dl.content_length, dl.content_encoding, b"".join(dl.iter_bytes())


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("GZIP", gzip.compress),
    ],
)
def test_encoded_body_has_no_content_length(coding: str, encode: object) -> None:
    assert callable(encode)
    body = encode(VIDEO)
    assert len(body) != len(VIDEO)  # the header length would be wrong for the decoded bytes
    answer = Answer(200, body, {"Content-Type": "video/mp4", "Content-Encoding": coding})
    with loopback(answer) as server, ApixoClient(API_KEY, server.url) as client:
        length, encoding, data = fetch(client, f"{server.url}/v.mp4")
    assert data == VIDEO
    assert encoding == coding.lower()
    assert length is None


@pytest.mark.parametrize("coding", [None, "identity", "Identity"])
def test_identity_body_keeps_its_content_length(coding: str | None) -> None:
    headers = {"Content-Type": "video/mp4"}
    if coding:
        headers["Content-Encoding"] = coding
    with (
        loopback(Answer(200, VIDEO, headers)) as server,
        ApixoClient(API_KEY, server.url) as client,
    ):
        length, encoding, data = fetch(client, f"{server.url}/v.mp4")
    assert (length, data) == (len(VIDEO), VIDEO)
    assert encoding == (coding.lower() if coding else None)


@pytest.mark.parametrize(
    "bad",
    [
        b"an error page, not gzip" * 50,
        gzip.compress(VIDEO)[:30] + b"\xff" * 500,
        gzip.compress(VIDEO)[: len(gzip.compress(VIDEO)) // 2],
        gzip.compress(VIDEO)[:-4],
        b"",
    ],
    ids=["not-gzip", "corrupt-stream", "cut-in-half", "cut-trailer", "empty"],
)
def test_corrupt_gzip_body_is_an_unexpected_answer_not_a_crash(bad: bytes) -> None:
    answer = Answer(200, bad, {"Content-Encoding": "gzip"})
    with (
        loopback(answer) as server,
        ApixoClient(API_KEY, server.url, retry=RetryPolicy(1, 5)) as client,
        pytest.raises(UnexpectedResponseError, match="cannot be decoded"),
    ):
        fetch(client, f"{server.url}/v.mp4")


def test_gzip_members_are_all_decoded_in_bounded_chunks() -> None:
    bomb = b"\x00" * 2_000_000  # 2 MB of zeros is 2 kB of gzip
    body = gzip.compress(VIDEO) + gzip.compress(bomb)
    answer = Answer(200, body, {"Content-Encoding": "gzip"})
    with loopback(answer) as server, ApixoClient(API_KEY, server.url) as client:
        with client.stream_download(f"{server.url}/v.mp4", chunk_size=4096) as dl:
            chunks = list(dl.iter_bytes())
    assert b"".join(chunks) == VIDEO + bomb
    sizes = [len(c) for c in chunks]
    assert max(sizes) <= 4096


# --- which transport, which credentials -------------------------------------------------------


def video(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"v" * 100, headers={"Content-Length": "100"})


def refuse(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"the API transport was used for {request.url}")


def test_foreign_downloads_use_the_download_transport(sleeps: Sleeps) -> None:
    api, cdn = Script(default=refuse), Script(video, video)
    with ApixoClient(
        API_KEY,
        BASE_URL,
        transport=httpx.MockTransport(api),
        download_transport=httpx.MockTransport(cdn),
        sleep=sleeps,
    ) as client:
        assert fetch(client, "https://cdn.example.com/v.mp4?sig=abc")[2] == b"v" * 100
        assert fetch(client, "http://10.0.0.1/v.mp4")[2] == b"v" * 100
    assert [str(r.url) for r in cdn.requests] == [
        "https://cdn.example.com/v.mp4?sig=abc",
        "http://10.0.0.1/v.mp4",
    ]
    assert all("authorization" not in r.headers for r in cdn.requests)
    assert api.requests == []


def test_redirect_from_the_api_origin_continues_on_the_download_transport(sleeps: Sleeps) -> None:
    api = Script(
        httpx.Response(302, headers={"Location": f"{BASE_URL}/files/moved.mp4"}),
        httpx.Response(307, headers={"Location": "https://cdn.example.com/v.mp4"}),
        default=refuse,
    )
    cdn = Script(
        httpx.Response(302, headers={"Location": f"{BASE_URL}/files/back.mp4"}),
        video,
    )
    with ApixoClient(
        API_KEY,
        BASE_URL,
        transport=httpx.MockTransport(api),
        download_transport=httpx.MockTransport(cdn),
        sleep=sleeps,
    ) as client:
        assert fetch(client, f"{BASE_URL}/files/v.mp4")[2] == b"v" * 100
    assert [r.url.path for r in api.requests] == ["/files/v.mp4", "/files/moved.mp4"]
    assert all(r.headers["authorization"] == f"Bearer {API_KEY}" for r in api.requests)
    # once off the API origin, never the key again, even when sent back to it
    assert [str(r.url) for r in cdn.requests] == [
        "https://cdn.example.com/v.mp4",
        f"{BASE_URL}/files/back.mp4",
    ]
    assert all("authorization" not in r.headers for r in cdn.requests)


def test_redirect_loop_on_the_api_origin_ends(sleeps: Sleeps) -> None:
    loop = httpx.Response(302, headers={"Location": f"{BASE_URL}/files/v.mp4"})
    with (
        ApixoClient(
            API_KEY, BASE_URL, transport=httpx.MockTransport(Script(default=loop)), sleep=sleeps
        ) as client,
        pytest.raises(UnexpectedResponseError, match="redirected more than"),
    ):
        fetch(client, f"{BASE_URL}/files/v.mp4")


def test_without_download_transport_the_api_transport_carries_downloads(sleeps: Sleeps) -> None:
    script = Script(video)
    with ApixoClient(
        API_KEY, BASE_URL, transport=httpx.MockTransport(script), sleep=sleeps
    ) as client:
        fetch(client, "https://cdn.example.com/v.mp4")
    assert len(script.requests) == 1
    assert "authorization" not in script.requests[0].headers


@pytest.mark.parametrize(
    "location",
    [
        "http://[::1",
        "ftp://files.example.com/v.mp4",
        "https://exa mple.com/v",
        "",
        "https://xn--zz/v.mp4",  # an IDNA host that does not decode
        "https://xn--/v.mp4",
        "https://xn--ls8h.la/v.mp4",
    ],
)
def test_odd_redirects_end_in_an_apixo_error(sleeps: Sleeps, location: str) -> None:
    api = Script(default=httpx.Response(302, headers={"Location": location}))
    cdn = Script(default=httpx.Response(302, headers={"Location": location}))
    with ApixoClient(
        API_KEY,
        BASE_URL,
        transport=httpx.MockTransport(api),
        download_transport=httpx.MockTransport(cdn),
        retry=RetryPolicy(2, 5, 0.01, 0.01),
        sleep=sleeps,
    ) as client:
        for url in (f"{BASE_URL}/files/v.mp4", "https://cdn.example.com/v.mp4"):
            with pytest.raises(ApixoError):
                fetch(client, url)


# --- the size limit (HAILUO_MAX_VIDEO_BYTES) ----------------------------------------------------

LIMIT = 50_000


def limited(url: str, **kw: object) -> ApixoClient:
    return ApixoClient(API_KEY, url, max_download_bytes=LIMIT, retry=RetryPolicy(1, 5), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"v" * (LIMIT + 1), {}),  # said by its Content-Length
        (gzip.compress(b"\x00" * (20 * LIMIT)), {"Content-Encoding": "gzip"}),  # inflates
        (zlib.compress(b"\x00" * (20 * LIMIT)), {"Content-Encoding": "deflate"}),
        (gzip.compress(b"v" * LIMIT) + gzip.compress(b"v"), {"Content-Encoding": "gzip"}),
    ],
    ids=["declared", "gzip-bomb", "deflate-bomb", "one-byte-over-in-a-second-member"],
)
def test_a_download_past_the_limit_is_refused_and_never_yields_more(
    body: bytes, headers: dict[str, str]
) -> None:
    got = bytearray()
    with loopback(Answer(200, body, headers)) as server, limited(server.url) as client:
        with pytest.raises(DownloadTooLargeError, match=r"limit of 50,000 bytes.*MAX_VIDEO_BYTES"):
            with client.stream_download(f"{server.url}/v.mp4", chunk_size=4096) as dl:
                for chunk in dl.iter_bytes():
                    got += chunk
    assert len(got) <= LIMIT


def test_an_endless_body_without_a_length_stops_at_the_limit(sleeps: Sleeps) -> None:
    sent = 0

    def endless(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            nonlocal sent
            while True:
                sent += 8192
                yield b"v" * 8192

        return httpx.Response(200, content=body())  # chunked: no Content-Length

    with limited(BASE_URL, transport=httpx.MockTransport(endless), sleep=sleeps) as client:
        with pytest.raises(DownloadTooLargeError, match="at least"):
            with client.stream_download(f"{BASE_URL}/files/v.mp4", chunk_size=4096) as dl:
                for _ in dl.iter_bytes():
                    pass
    assert LIMIT < sent <= LIMIT + 2 * 8192  # it stopped reading there


@pytest.mark.parametrize("headers", [{}, {"Content-Encoding": "gzip"}])
def test_a_download_of_exactly_the_limit_is_whole(headers: dict[str, str]) -> None:
    data = b"v" * LIMIT
    body = gzip.compress(data) if headers else data
    with loopback(Answer(200, body, headers)) as server, limited(server.url) as client:
        assert fetch(client, f"{server.url}/v.mp4")[2] == data


def test_the_limit_is_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from hailuo_batch.settings import Settings

    monkeypatch.setenv("HAILUO_MAX_VIDEO_BYTES", "2000000")
    assert Settings().apixo_client(api_key=SecretStr("k")).max_download_bytes == 2_000_000
    assert (
        Settings(_env_file=None, max_video_bytes=1 << 20)
        .apixo_client(api_key=SecretStr("k"))
        .max_download_bytes
        == 1 << 20
    )
