"""ApixoClient error paths against an httpx.MockTransport (every row of the contract tables)."""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from apixo_helpers import API_KEY, BASE_URL, Script, Sleeps, envelope, ok

from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    ApixoClient,
    ApixoError,
    ApixoTransportError,
    AuthenticationError,
    ForbiddenError,
    GenerateInput,
    GenerateRequest,
    InsufficientCreditsError,
    InvalidRequestError,
    MissingAPIKeyError,
    NotFoundError,
    RateLimitedError,
    RetryPolicy,
    ServerError,
    TaskState,
    UnexpectedResponseError,
)
from hailuo_batch.settings import Settings

MakeClient = Callable[..., tuple[ApixoClient, Script]]

REQ = GenerateRequest(
    input=GenerateInput(
        mode="standard-image-to-video",
        prompt="slow parallax",
        image_urls=["https://example.com/in.jpg"],
        duration="6",
    )
)
SUBMIT_OK = ok({"taskId": "task_abc"})
MAPPED = [
    (400, InvalidRequestError),
    (401, AuthenticationError),
    (402, InsufficientCreditsError),
    (403, ForbiddenError),
    (404, NotFoundError),
]


def http_error(code: int, message: str = "nope", **headers: str) -> httpx.Response:
    return httpx.Response(code, json=envelope(code, None, message), headers=headers)


def body_error(code: int, message: str = "nope", error: str | None = None) -> httpx.Response:
    data = {"error": error} if error else None
    return httpx.Response(200, json=envelope(code, data, message))


# --- submit ----------------------------------------------------------------------------------


def test_submit_sends_contract_body_and_returns_task_id(make_client: MakeClient) -> None:
    client, script = make_client(SUBMIT_OK)
    assert client.submit(REQ) == "task_abc"
    (req,) = script.requests
    assert req.method == "POST"
    assert req.url == f"{BASE_URL}/api/v1/generateTask/hailuo-2-3-fast"
    assert req.headers["authorization"] == f"Bearer {API_KEY}"
    assert script.bodies() == [REQ.to_payload()]


@pytest.mark.parametrize(("code", "cls"), MAPPED)
@pytest.mark.parametrize("layer", ["http", "body"])
def test_submit_client_errors_raise_at_once(
    make_client: MakeClient, sleeps: Sleeps, code: int, cls: type[ApixoError], layer: str
) -> None:
    step = (
        http_error(code, "Invalid mode type")
        if layer == "http"
        else body_error(code, "Invalid mode type")
    )
    client, script = make_client(step, default=SUBMIT_OK)
    with pytest.raises(cls) as ei:
        client.submit(REQ)
    assert ei.value.status_code == code
    assert "Invalid mode type" in ei.value.message
    assert len(script.requests) == 1
    assert sleeps == []


def test_body_error_message_includes_data_error(make_client: MakeClient) -> None:
    client, _ = make_client(body_error(400, "invalid parameters", error="duration must be 6 or 10"))
    with pytest.raises(InvalidRequestError) as ei:
        client.submit(REQ)
    assert ei.value.message == "invalid parameters: duration must be 6 or 10"


@pytest.mark.parametrize("layer", ["http", "body"])
def test_submit_retries_429_honouring_retry_after(
    make_client: MakeClient, sleeps: Sleeps, layer: str
) -> None:
    first = (
        http_error(429, "rate limited", **{"Retry-After": "3"})
        if layer == "http"
        else httpx.Response(200, json=envelope(429, None, "rate"), headers={"Retry-After": "3"})
    )
    client, script = make_client(first, SUBMIT_OK)
    assert client.submit(REQ) == "task_abc"
    assert len(script.requests) == 2
    assert sleeps == [3.0]


def test_submit_persistent_429_raises_rate_limited(make_client: MakeClient, sleeps: Sleeps) -> None:
    client, script = make_client(default=http_error(429, "slow down"))
    with pytest.raises(RateLimitedError) as ei:
        client.submit(REQ)
    assert len(script.requests) == 4
    assert ei.value.attempts == 4
    assert len(sleeps) == 3


def test_submit_429_reaches_a_callers_limiter_at_once_when_asked(
    make_client: MakeClient, sleeps: Sleeps
) -> None:
    """A run that learns the provider's limit must see every refusal: no blind retry."""
    client, script = make_client(
        http_error(429, "slow down", **{"Retry-After": "2"}),
        SUBMIT_OK,
        retry_rate_limited_submits=False,
    )
    with pytest.raises(RateLimitedError) as ei:
        client.submit(REQ)
    assert len(script.requests) == 1 and sleeps == [] and ei.value.retry_after == 2.0
    assert client.submit(REQ) == "task_abc"  # nothing was created: the caller submits again
    # other refusals that prove nothing was created are still retried inside the call
    client, script = make_client(
        http_error(503, "busy"), SUBMIT_OK, retry_rate_limited_submits=False
    )
    assert client.submit(REQ) == "task_abc" and len(script.requests) == 2


@pytest.mark.parametrize("layer", ["http", "body"])
def test_submit_retries_503_model_unavailable(make_client: MakeClient, layer: str) -> None:
    first = http_error(503, "model unavailable") if layer == "http" else body_error(503)
    client, script = make_client(first, SUBMIT_OK)
    assert client.submit(REQ) == "task_abc"
    assert len(script.requests) == 2


@pytest.mark.parametrize("first", [http_error(503, "busy"), httpx.ConnectError("refused")])
def test_submit_stops_retrying_when_may_retry_says_no(
    make_client: MakeClient, first: httpx.Response | Exception
) -> None:
    """A refusal that proves nothing was created is retried only while the caller may still
    send; then it is raised as it is (not ambiguous: nothing exists to be charged)."""
    client, script = make_client(first, SUBMIT_OK)
    with pytest.raises((ServerError, ApixoTransportError)) as ei:
        client.submit(REQ, may_retry=lambda: False)
    assert not isinstance(ei.value, AmbiguousSubmitError)
    assert len(script.requests) == 1
    client, script = make_client(first, SUBMIT_OK)
    assert client.submit(REQ, may_retry=lambda: True) == "task_abc"
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    "exc", [httpx.ConnectError("refused"), httpx.ConnectTimeout("t"), httpx.PoolTimeout("t")]
)
def test_submit_retries_when_nothing_was_sent(make_client: MakeClient, exc: Exception) -> None:
    client, script = make_client(exc, SUBMIT_OK)
    assert client.submit(REQ) == "task_abc"
    assert len(script.requests) == 2


def test_submit_connect_error_exhausted_is_not_ambiguous(make_client: MakeClient) -> None:
    client, _ = make_client(default=httpx.ConnectError("refused"))
    with pytest.raises(ApixoTransportError) as ei:
        client.submit(REQ)
    assert not isinstance(ei.value, AmbiguousSubmitError)
    assert ei.value.request_sent is False
    assert ei.value.status_code is None


@pytest.mark.parametrize(
    ("step", "cause"),
    [
        (http_error(500, "internal"), ServerError),
        (body_error(500, "internal"), ServerError),
        (http_error(502, "bad gateway"), ServerError),
        (httpx.ReadTimeout("read timed out"), ApixoTransportError),
        (httpx.WriteTimeout("write timed out"), ApixoTransportError),
        (httpx.RemoteProtocolError("Server disconnected"), ApixoTransportError),
        (httpx.ReadError("reset"), ApixoTransportError),
        (httpx.Response(200, text="<html>oops</html>"), UnexpectedResponseError),
        (ok({"noTaskId": 1}), UnexpectedResponseError),
    ],
)
def test_submit_ambiguous_failures_are_not_retried(
    make_client: MakeClient, sleeps: Sleeps, step: Any, cause: type[ApixoError]
) -> None:
    client, script = make_client(step, default=SUBMIT_OK)
    with pytest.raises(AmbiguousSubmitError) as ei:
        client.submit(REQ)
    assert isinstance(ei.value.cause, cause)
    assert "may have been created" in str(ei.value)
    assert len(script.requests) == 1
    assert sleeps == []


def test_unknown_body_code_is_unexpected(make_client: MakeClient) -> None:
    client, _ = make_client(body_error(418, "teapot"))
    with pytest.raises(UnexpectedResponseError) as ei:
        client.get_balance()
    assert ei.value.status_code == 418


# --- status ----------------------------------------------------------------------------------

STATUS_OK = ok(
    {
        "taskId": "task_abc",
        "state": "success",
        "createTime": 1,
        "completeTime": 2,
        "costTime": 1,
        "resultJson": '{"resultUrls": ["https://cdn.example.com/v.mp4"]}',
    }
)


def test_get_status_parses_and_sends_task_id(make_client: MakeClient) -> None:
    client, script = make_client(STATUS_OK)
    st = client.get_status("task_abc")
    assert st.state is TaskState.SUCCESS
    assert st.result_urls == ["https://cdn.example.com/v.mp4"]
    (req,) = script.requests
    assert req.method == "GET"
    assert req.url.path == "/api/v1/statusTask/hailuo-2-3-fast"
    assert req.url.params["taskId"] == "task_abc"


def test_get_status_retries_transients(
    make_client: MakeClient, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    client, script = make_client(
        http_error(500),
        body_error(503),
        httpx.ReadTimeout("slow"),
        STATUS_OK,
        retry=None,
    )
    with caplog.at_level(logging.WARNING, logger="hailuo_batch.apixo"):
        assert client.get_status("task_abc").task_id == "task_abc"
    assert len(script.requests) == 4
    assert len(sleeps) == 3
    # default policy: base 1 s doubling, equal jitter -> [0.5, 1], [1, 2], [2, 4]
    assert [lo <= s <= 2 * lo for lo, s in zip([0.5, 1, 2], sleeps, strict=True)] == [True] * 3
    warnings = [r for r in caplog.records if r.name == "hailuo_batch.apixo"]
    assert len(warnings) == 3
    assert all("/api/v1/statusTask/hailuo-2-3-fast" in r.getMessage() for r in warnings)
    assert all("taskId" not in r.getMessage() for r in warnings)


def test_get_status_gives_up_after_max_attempts(make_client: MakeClient) -> None:
    client, script = make_client(default=httpx.RemoteProtocolError("dropped"))
    with pytest.raises(ApixoTransportError):
        client.get_status("task_abc")
    assert len(script.requests) == 4


@pytest.mark.parametrize("layer", ["http", "body"])
def test_get_status_404_raises_at_once(make_client: MakeClient, layer: str) -> None:
    step = http_error(404, "task not found") if layer == "http" else body_error(404, "not found")
    client, script = make_client(step, default=STATUS_OK)
    with pytest.raises(NotFoundError):
        client.get_status("task_x")
    assert len(script.requests) == 1


def test_get_status_malformed_data(make_client: MakeClient) -> None:
    client, _ = make_client(ok({"taskId": "t", "state": "weird"}))
    with pytest.raises(UnexpectedResponseError, match="weird"):
        client.get_status("t")


# --- balance ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [(12.5, 12.5), (3, 3.0), ("7.25", 7.25)])
def test_get_balance(make_client: MakeClient, data: Any, expected: float) -> None:
    client, script = make_client(ok(data))
    assert client.get_balance() == expected
    assert script.requests[0].url.path == "/api/v1/apikeys/current-balance"


@pytest.mark.parametrize("data", [None, {"balance": 1}, "lots", True])
def test_get_balance_not_a_number(make_client: MakeClient, data: Any) -> None:
    client, _ = make_client(ok(data))
    with pytest.raises(UnexpectedResponseError):
        client.get_balance()


def test_get_balance_401_stops(make_client: MakeClient) -> None:
    client, script = make_client(http_error(401, "invalid api key"), default=ok(1.0))
    with pytest.raises(AuthenticationError):
        client.get_balance()
    assert len(script.requests) == 1


# --- download --------------------------------------------------------------------------------


def video(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        content=b"x" * 2500,
        headers={"Content-Type": "video/mp4", "Content-Length": "2500"},
    )


def test_download_streams_in_chunks(make_client: MakeClient) -> None:
    client, _ = make_client(video)
    with client.stream_download("https://cdn.example.com/v.mp4", chunk_size=1000) as dl:
        assert dl.content_length == 2500
        assert dl.content_type == "video/mp4"
        chunks = list(dl.iter_bytes())
    assert b"".join(chunks) == b"x" * 2500
    assert max(len(c) for c in chunks) <= 1000


def test_download_sends_key_only_to_api_origin(make_client: MakeClient) -> None:
    client, script = make_client(video, video)
    with client.stream_download("https://cdn.example.com/v.mp4") as dl:
        list(dl.iter_bytes())
    with client.stream_download(f"{BASE_URL}/files/v.mp4") as dl:
        list(dl.iter_bytes())
    foreign, same = script.requests
    assert "authorization" not in foreign.headers
    assert same.headers["authorization"] == f"Bearer {API_KEY}"


def test_download_redirect_to_other_origin_drops_key(make_client: MakeClient) -> None:
    redirect = httpx.Response(302, headers={"Location": "https://cdn.example.com/v.mp4"})
    client, script = make_client(redirect, video)
    with client.stream_download(f"{BASE_URL}/files/v.mp4") as dl:
        assert len(b"".join(dl.iter_bytes())) == 2500
    assert "authorization" in script.requests[0].headers
    assert "authorization" not in script.requests[1].headers


@pytest.mark.parametrize(
    ("code", "cls"), [(403, ForbiddenError), (404, NotFoundError), (410, NotFoundError)]
)
def test_download_expired_url_raises_at_once(
    make_client: MakeClient, code: int, cls: type[ApixoError]
) -> None:
    client, script = make_client(httpx.Response(code, text="expired"), default=video)
    with pytest.raises(cls) as ei, client.stream_download("https://cdn.example.com/v.mp4?sig=S"):
        pass
    assert ei.value.status_code == code
    assert "sig=S" not in str(ei.value)
    assert len(script.requests) == 1


def test_download_retries_open(make_client: MakeClient, sleeps: Sleeps) -> None:
    client, script = make_client(
        httpx.Response(503),
        httpx.Response(429, headers={"Retry-After": "2"}),
        httpx.ConnectError("refused"),
        video,
    )
    with client.stream_download("https://cdn.example.com/v.mp4") as dl:
        assert len(b"".join(dl.iter_bytes())) == 2500
    assert len(script.requests) == 4
    assert sleeps[1] >= 2.0


class BrokenStream(httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b"abc"
        raise httpx.ReadError("connection reset")


def test_download_interrupted_mid_body(make_client: MakeClient) -> None:
    client, _ = make_client(httpx.Response(200, stream=BrokenStream()))
    got = b""
    with (
        pytest.raises(ApixoTransportError, match="interrupted"),
        client.stream_download("https://cdn.example.com/v.mp4", chunk_size=3) as dl,
    ):
        for chunk in dl.iter_bytes():
            got += chunk
    assert got == b"abc"


# --- construction, settings, threads, pickling, secrecy ----------------------------------------


def test_from_settings_requires_key() -> None:
    with pytest.raises(MissingAPIKeyError, match="APIXO_API_KEY or an ApixoCredentials block"):
        Settings(apixo_api_key=None).apixo_client()


def test_from_settings_uses_key_and_base_url() -> None:
    script = Script(ok(4.5))
    settings = Settings(apixo_api_key=API_KEY, apixo_base_url="http://emu.local:9/")
    with settings.apixo_client(transport=httpx.MockTransport(script)) as client:
        assert client.get_balance() == 4.5
        assert client.retry.max_attempts == settings.retry_max_attempts
    assert str(script.requests[0].url) == "http://emu.local:9/api/v1/apikeys/current-balance"
    assert script.requests[0].headers["authorization"] == f"Bearer {API_KEY}"


@pytest.mark.parametrize("key", ["", "has space", "line\nbreak"])
def test_bad_key_refused_without_echo(key: str) -> None:
    with pytest.raises(ValueError) as ei:
        ApixoClient(key)
    if key:
        assert key not in str(ei.value)


def test_shared_client_across_threads(make_client: MakeClient) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        tid = request.url.params["taskId"]
        return ok({"taskId": tid, "state": "processing", "createTime": 1})

    client, script = make_client(default=answer)
    results: dict[str, str] = {}
    lock = threading.Lock()

    def work(i: int) -> None:
        st = client.get_status(f"task_{i}")
        with lock:
            results[f"task_{i}"] = st.task_id

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {f"task_{i}": f"task_{i}" for i in range(32)}
    assert len(script.requests) == 32


def test_errors_pickle() -> None:
    amb = AmbiguousSubmitError("unknown", cause=ServerError("internal", 500))
    rl = RateLimitedError("slow", retry_after=2.0)
    amb2, rl2 = pickle.loads(pickle.dumps((amb, rl)))
    assert (type(amb2), amb2.status_code, type(amb2.cause)) == (
        AmbiguousSubmitError,
        500,
        ServerError,
    )
    assert (rl2.retry_after, rl2.status_code, str(rl2)) == (2.0, 429, "[429] slow")


def test_key_never_leaks_on_failing_paths(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Even when the server (or a low-level error) echoes the key, our texts never carry it."""
    client, _ = make_client(
        http_error(401, f"invalid api key {API_KEY}"),
        httpx.ReadTimeout(f"timeout while sending Bearer {API_KEY}"),
        http_error(500),
        body_error(429, f"slow down {API_KEY}"),
        httpx.ConnectError("refused"),
        default=http_error(503),
    )
    ours: list[str] = [repr(client)]
    with caplog.at_level(logging.DEBUG):
        for call in (
            client.get_balance,
            lambda: client.submit(REQ),
            lambda: client.get_status("task_1"),
        ):
            with pytest.raises(ApixoError) as ei:
                call()
            exc: Any = ei.value
            while isinstance(exc, ApixoError):
                ours += [str(exc), repr(exc), exc.message]
                exc = getattr(exc, "cause", None) or exc.__cause__
    ours += [r.getMessage() for r in caplog.records]
    ours += [repr(client), repr(client._http.headers)]
    assert len(caplog.records) >= 3  # the retries were logged
    assert any("**********" in t for t in ours)  # the echoed key was scrubbed, not dropped
    assert [t for t in ours if API_KEY in t] == []


# --- rate limits that outlast the budget: the caller can requeue ---------------------------------


def limited(layer: str, retry_after: str | None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    if layer == "http":
        return httpx.Response(429, json=envelope(429, None, "slow down"), headers=headers)
    return httpx.Response(200, json=envelope(429, None, "slow down"), headers=headers)


@pytest.mark.parametrize("layer", ["http", "body"])
def test_persistent_429_carries_the_last_retry_after_and_attempts(
    make_client: MakeClient, sleeps: Sleeps, layer: str
) -> None:
    client, script = make_client(
        limited(layer, "1"), limited(layer, "3"), limited(layer, "2"), limited(layer, "0.5")
    )
    with pytest.raises(RateLimitedError) as ei:
        client.submit(REQ)
    assert not isinstance(ei.value, AmbiguousSubmitError)
    assert ei.value.retry_after == 0.5
    assert ei.value.attempts == 4 == len(script.requests)
    assert len(sleeps) == 3
    assert (sleeps[0] >= 1.0, sleeps[1] >= 3.0, sleeps[2] >= 2.0) == (
        True,
    ) * 3  # each header honoured


@pytest.mark.parametrize("layer", ["http", "body"])
def test_last_retry_after_survives_answers_without_one(make_client: MakeClient, layer: str) -> None:
    client, _ = make_client(limited(layer, "2"), default=limited(layer, None))
    with pytest.raises(RateLimitedError) as ei:
        client.submit(REQ)
    assert ei.value.retry_after == 2.0
    assert ei.value.attempts == 4


def test_retry_after_beyond_the_budget_is_raised_at_once_with_it(
    make_client: MakeClient, sleeps: Sleeps
) -> None:
    client, script = make_client(limited("http", "600"), default=SUBMIT_OK)
    with pytest.raises(RateLimitedError) as ei:
        client.submit(REQ)
    assert (ei.value.retry_after, ei.value.attempts, len(script.requests)) == (600.0, 1, 1)
    assert sleeps == []  # never waits less than asked, never past the budget


def test_no_retry_after_at_all_stays_none(make_client: MakeClient) -> None:
    client, _ = make_client(default=limited("http", None))
    with pytest.raises(RateLimitedError) as ei:
        client.get_status("task_abc")
    assert ei.value.retry_after is None
    assert ei.value.attempts == 4


def test_status_read_rate_limited_carries_retry_after(make_client: MakeClient) -> None:
    client, _ = make_client(default=limited("body", "1.5"))
    with pytest.raises(RateLimitedError) as ei:
        client.get_status("task_abc")
    assert (ei.value.retry_after, ei.value.attempts) == (1.5, 4)


def test_missing_key_is_an_apixo_error_and_a_value_error() -> None:
    with pytest.raises(ApixoError) as ei:
        Settings(apixo_api_key=None).apixo_client()
    assert isinstance(ei.value, ValueError)
    assert isinstance(ei.value, MissingAPIKeyError)


@pytest.mark.parametrize(
    "base_url", ["http://xn--zz--.com", "https://xn--/", "https://xn--ls8h.la"]
)
def test_a_request_that_cannot_be_built_is_reported_never_sent(base_url: str) -> None:
    """A base URL whose host does not decode fails while the request is built: nothing left
    this machine, so a submit is not an ambiguous (possibly charged) one."""
    sent: list[httpx.Request] = []
    with ApixoClient(
        API_KEY, base_url, transport=httpx.MockTransport(lambda r: sent.append(r) or ok({})),
        retry=RetryPolicy(2, 5, 0.01, 0.01), sleep=lambda s: None,
    ) as client:  # fmt: skip
        with pytest.raises(ApixoTransportError) as err:
            client.submit(REQ)
    assert err.value.request_sent is False and "invalid URL" in str(err.value)
    assert sent == []


def test_the_refusals_a_submit_retries_are_those_that_prove_nothing_was_created() -> None:
    """What a lapsed lease may cut short (`retried_refusal`): never a 401, 402, 400 or 404,
    whose own meaning (stop the run, a bad row, a wrong base URL) must reach the run."""
    from hailuo_batch.apixo.client import retried_refusal

    assert retried_refusal(RateLimitedError("slow", retry_after=1.0))
    assert retried_refusal(ServerError("busy", 503))
    assert retried_refusal(ApixoTransportError("refused", request_sent=False))
    for err in (
        AuthenticationError("bad key"),
        InsufficientCreditsError("top up"),
        InvalidRequestError("bad"),
        NotFoundError("gone", 404),
        ServerError("boom", 500),
        ApixoTransportError("reset", request_sent=True),
    ):
        assert not retried_refusal(err), err
