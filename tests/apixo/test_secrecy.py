"""No secret leaves the client: a provider that echoes the request (callback URL and token,
a presigned image URL) in its error message, in any layer and any encoding, leaks none of them
into an exception, its arguments, its chain, a log line or a pickle."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import httpx
import pytest
from apixo_helpers import API_KEY, BASE_URL, Sleeps, envelope
from loopback import Answer, Seen, loopback

from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    ApixoClient,
    ApixoError,
    ForbiddenError,
    GenerateInput,
    GenerateRequest,
    InvalidRequestError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    UnexpectedResponseError,
)

TOKEN = "cbTok_9f8e7d6c5b4a3210ZYXW"
CALLBACK = f"https://hooks.example.com/callbacks/{TOKEN}"
SIGNATURE = "feedface0123456789abcdef0123456789abcdef0123456789abcdefcafe0000"
PRESIGNED = (
    "https://bucket.s3.amazonaws.com/inputs/a.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20250101%2Fus-east-1%2Fs3%2Faws4_request"
    f"&X-Amz-Expires=3600&X-Amz-Signature={SIGNATURE}"
)
REQ = GenerateRequest(
    request_type="callback",
    callback_url=CALLBACK,
    input=GenerateInput(
        mode="standard-image-to-video", prompt="p", image_urls=[PRESIGNED], duration=6
    ),
)
FORBIDDEN = [API_KEY, TOKEN, SIGNATURE, "AKIAEXAMPLE"]

ENCODE: dict[str, Callable[[str], str]] = {
    "as-sent": lambda body: body,
    "percent": lambda body: quote(body, safe=""),
    "form": quote_plus,
    "json-escaped-slashes": lambda body: body.replace("/", "\\/"),
    "json-in-json": lambda body: json.dumps(body),
    "with-headers": lambda body: f"Authorization: Bearer {API_KEY}\n{body}",
}


def echo(status: int, layer: str, encoding: str) -> Callable[[httpx.Request], httpx.Response]:
    """A provider that puts the request it received into its error answer."""

    def answer(request: httpx.Request) -> httpx.Response:
        text = ENCODE[encoding](request.content.decode())
        code = status if status != 200 else 400
        if layer == "message":
            body = envelope(code, None, f"invalid request: {text}")
        elif layer == "data.error":
            body = envelope(code, {"error": f"cannot process {text}"}, "invalid parameters")
        else:  # a proxy's HTML page quoting the request
            return httpx.Response(status, html=f"<html><pre>{text}</pre></html>")
        return httpx.Response(status, json=body)

    return answer


def chain_texts(exc: BaseException) -> list[str]:
    """str, repr, args and string attributes of `exc` and of everything chained to it."""
    out: list[str] = []
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        out += [str(e), repr(e), *(str(a) for a in e.args)]
        out += [v for v in vars(e).values() if isinstance(v, str)]
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "cause", None)) if x]
    return out


def leaks(texts: list[str]) -> list[str]:
    return [t for t in texts if any(s in t or quote(s, safe="") in t for s in FORBIDDEN)]


def make(
    known: str, sleeps: Sleeps, handler: Callable[[httpx.Request], httpx.Response]
) -> ApixoClient:
    client = ApixoClient(
        API_KEY,
        BASE_URL,
        transport=httpx.MockTransport(handler),
        retry=RetryPolicy(max_attempts=3, max_elapsed_s=60, base_s=0.5, max_s=4),
        secrets=[TOKEN] if known == "secrets" else (),
        sleep=sleeps,
    )
    if known == "add_secret":
        client.add_secret(TOKEN)
    return client


@pytest.mark.parametrize("known", ["secrets", "add_secret", "submitted-callback-url"])
@pytest.mark.parametrize("encoding", sorted(ENCODE))
@pytest.mark.parametrize(
    ("status", "layer", "raised"),
    [
        (400, "message", InvalidRequestError),
        (400, "data.error", InvalidRequestError),
        (403, "message", ForbiddenError),
        (200, "message", InvalidRequestError),  # HTTP 200 with body code 400
        (200, "data.error", InvalidRequestError),
        (500, "message", AmbiguousSubmitError),
        (500, "html", AmbiguousSubmitError),
        (200, "html", AmbiguousSubmitError),  # a proxy's page with status 200
        (503, "data.error", ServerError),  # retried until the budget runs out
        (429, "message", RateLimitedError),
    ],
)
def test_echoed_request_leaks_no_secret(
    sleeps: Sleeps,
    caplog: pytest.LogCaptureFixture,
    known: str,
    encoding: str,
    status: int,
    layer: str,
    raised: type[ApixoError],
) -> None:
    with (
        make(known, sleeps, echo(status, layer, encoding)) as client,
        caplog.at_level(logging.DEBUG),
        pytest.raises(raised) as ei,
    ):
        client.submit(REQ)
    texts = chain_texts(ei.value) + [r.getMessage() for r in caplog.records]
    texts.append(str(pickle.loads(pickle.dumps(ei.value))))
    assert leaks(texts) == []
    if layer != "html":  # the scrubbed echo is kept, so the message still explains itself
        assert "**********" in str(ei.value)


def test_the_test_provider_really_echoes(sleeps: Sleeps) -> None:
    """Guard against a vacuous suite: without the scrubber the secrets would be there."""
    request = httpx.Request("POST", BASE_URL, json=REQ.to_payload())
    for encoding in ENCODE:
        text = echo(400, "message", encoding)(request).text
        assert TOKEN in text or quote(TOKEN) in text
        assert SIGNATURE in text


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ReadTimeout(f"timed out sending to {CALLBACK}"),
        httpx.RemoteProtocolError(f"peer closed: POST {quote(CALLBACK, safe='')}"),
        httpx.ConnectError(f"cannot connect (image {PRESIGNED})"),
    ],
)
def test_low_level_errors_that_echo_are_scrubbed_with_their_cause(
    sleeps: Sleeps, failure: Exception
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise failure

    with make("secrets", sleeps, handler) as client, pytest.raises(ApixoError) as ei:
        client.submit(REQ)
    texts = chain_texts(ei.value)
    assert any(type(failure).__name__ in t for t in texts)  # the cause is still named
    assert leaks(texts) == []


def test_status_and_download_errors_are_scrubbed(sleeps: Sleeps) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/api/"):
            return httpx.Response(404, json=envelope(404, None, f"no task for hook {CALLBACK}"))
        return httpx.Response(403, text=f"expired: {PRESIGNED}")

    with make("secrets", sleeps, handler) as client:
        with pytest.raises(ApixoError) as e1:
            client.get_status("task_1")
        with pytest.raises(ForbiddenError) as e2, client.stream_download(PRESIGNED):
            pass
    assert leaks(chain_texts(e1.value) + chain_texts(e2.value)) == []


def test_client_scrub_for_the_flows_own_messages() -> None:
    with ApixoClient(API_KEY, BASE_URL, secrets=[TOKEN]) as client:
        text = client.scrub(f"item a: {CALLBACK} {PRESIGNED} key={API_KEY}")
        assert leaks([text]) == []
        assert "https://bucket.s3.amazonaws.com/inputs/a.jpg?" in text
        other = "a-later-secret-value-1234"
        assert client.scrub(other) == other
        client.add_secret(other)
        assert other not in client.scrub(f"x{other}x")


def test_echo_over_real_http(caplog: pytest.LogCaptureFixture) -> None:
    def bad_request(seen: Seen) -> Answer:
        body = json.dumps(envelope(400, {"error": seen.body.decode()}, "invalid parameters"))
        return Answer(400, body.replace("/", "\\/").encode(), {"Content-Type": "application/json"})

    def proxy_page(seen: Seen) -> Answer:
        return Answer(502, b"<html>" + quote(seen.body.decode()).encode() + b"</html>")

    with loopback(bad_request, proxy_page) as server:
        with (
            ApixoClient(API_KEY, server.url, secrets=[TOKEN], retry=RetryPolicy(1, 5)) as client,
            caplog.at_level(logging.DEBUG),
        ):
            with pytest.raises(InvalidRequestError) as e1:
                client.submit(REQ)
            with pytest.raises(AmbiguousSubmitError) as e2:
                client.submit(REQ)
        assert TOKEN.encode() in server.seen[0].body  # the provider did get the secret
    texts = chain_texts(e1.value) + chain_texts(e2.value) + [r.getMessage() for r in caplog.records]
    assert leaks(texts) == []
    assert "invalid parameters" in str(e1.value)


def test_unexpected_answer_types_keep_their_class_after_scrubbing(sleeps: Sleeps) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=envelope(418, None, f"teapot {CALLBACK}"))

    with make("secrets", sleeps, handler) as client, pytest.raises(UnexpectedResponseError) as ei:
        client.get_balance()
    assert ei.value.status_code == 418
    assert leaks(chain_texts(ei.value)) == []


def test_http_library_log_lines_are_scrubbed(
    sleeps: Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    """httpx logs each request line with its full URL; httpcore logs response headers."""
    signed = (
        f"https://cdn.example.com/v.mp4?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SIGNATURE}"
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "cdn.example.com":
            return httpx.Response(200, content=b"v")
        return httpx.Response(302, headers={"Location": signed})

    with caplog.at_level(logging.DEBUG), make("secrets", sleeps, handler) as client:
        for url in (signed, f"https://cdn.example.com/{TOKEN}/v.mp4", f"{BASE_URL}/files/v"):
            with client.stream_download(url) as dl:
                assert b"".join(dl.iter_bytes()) == b"v"
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
    assert sum("HTTP Request: GET" in line for line in lines) >= 4
    assert leaks(lines) == []


STATUS_FIELDS = {
    "state": lambda s: {"state": s},
    "taskId": lambda s: {"taskId": s},
    "costTime": lambda s: {"state": "success", "costTime": s, "resultJson": '{"resultUrls":[]}'},
    "createTime": lambda s: {"createTime": s},
    "resultJson": lambda s: {"state": "success", "resultJson": s},
    "resultUrls": lambda s: {"state": "success", "resultJson": json.dumps({"resultUrls": s})},
    "failCode": lambda s: {"state": "failed", "failCode": {"nested": s}},
    "failMsg": lambda s: {"state": "failed", "failCode": "X", "failMsg": [s]},
}


LONG_KEY = "sk-live-A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v2W3x4Y5z6"
LONG_TOKEN = "cbTok_" + "Zq9" * 20


@pytest.mark.parametrize("secret", ["key", "token"])
@pytest.mark.parametrize("field", sorted(STATUS_FIELDS))
@pytest.mark.parametrize("prefix", ["", "x" * 5, "y" * 30])
def test_a_secret_in_any_status_field_leaks_no_part_of_itself(
    sleeps: Sleeps, secret: str, field: str, prefix: str
) -> None:
    """A status answer that puts a secret where a value belongs: the client's message quotes
    the bad value cut short, and a cut secret was no longer recognised (34 characters of the
    key reached results, the review page and the terminal)."""
    value = LONG_KEY if secret == "key" else LONG_TOKEN
    data = {"taskId": "t1", "state": "processing", "createTime": 1}
    data.update(STATUS_FIELDS[field](prefix + value))

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=envelope(200, data))

    client = ApixoClient(
        LONG_KEY, BASE_URL, transport=httpx.MockTransport(answer), secrets=[LONG_TOKEN],
        sleep=sleeps, retry=RetryPolicy(max_attempts=2, max_elapsed_s=60, base_s=0.5, max_s=4),
    )  # fmt: skip
    with client:
        try:
            got: object = client.get_status("t1")
        except ApixoError as exc:
            got = exc
    texts = chain_texts(got) if isinstance(got, BaseException) else [repr(got)]
    parts = {value[i : i + 10] for i in range(len(value) - 9)}  # any 10 characters of it
    assert not [t for t in texts if any(p in t for p in parts)], texts


@pytest.mark.parametrize("codec", ["utf-8", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_secret_in_an_answer_of_any_json_encoding_leaks_no_part(
    sleeps: Sleeps, codec: str
) -> None:
    """json reads UTF-16 and UTF-32 answers by itself: the secrets are masked in what it read,
    not in bytes taken for UTF-8."""
    data = {"taskId": "t1", "state": "failed", "failCode": "X" * 180 + LONG_KEY,
            "failMsg": "echo " + LONG_KEY, "createTime": 1}  # fmt: skip
    raw = json.dumps(envelope(200, data)).encode(codec)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=raw)

    with ApixoClient(LONG_KEY, BASE_URL, transport=httpx.MockTransport(answer),
                     sleep=sleeps) as client:  # fmt: skip
        status = client.get_status("t1")
    parts = {LONG_KEY[i : i + 10] for i in range(len(LONG_KEY) - 9)}
    shown = f"{status.fail_code} {status.fail_msg}"
    assert not [p for p in parts if p in shown], shown


@pytest.mark.parametrize("key", ["0", "1", "200", "k"])
def test_a_very_short_key_leaves_answers_and_result_urls_whole(sleeps: Sleeps, key: str) -> None:
    """A 1-3 character test key masked digits inside every answer: result URLs broke and
    numbers made the JSON invalid (every submit then looked ambiguous)."""
    url = "http://127.0.0.1:8787/results/task_ab12/0.mp4"
    data = {"taskId": "t1", "state": "success", "createTime": 1, "costTime": 200,
            "resultJson": json.dumps({"resultUrls": [url]})}  # fmt: skip

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=json.dumps(envelope(200, data)).encode())

    with ApixoClient(key, BASE_URL, transport=httpx.MockTransport(answer), sleep=sleeps) as c:
        status = c.get_status("t1")
    assert status.result_urls == [url] and status.cost_time_ms == 200


@pytest.mark.parametrize("field", ["failCode", "failMsg"])
def test_a_signed_url_in_a_failcode_or_message_loses_its_signature(
    sleeps: Sleeps, field: str
) -> None:
    data = {"taskId": "t1", "state": "failed", "failCode": "X", "failMsg": "m", "createTime": 1,
            field: f"FETCH {PRESIGNED}"}  # fmt: skip

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=envelope(200, data))

    with make("secrets", sleeps, answer) as client:
        status = client.get_status("t1")
    assert leaks([str(status.fail_code), str(status.fail_msg)]) == []
    assert "https://bucket.s3.amazonaws.com/inputs/a.jpg" in f"{status.fail_code}{status.fail_msg}"
