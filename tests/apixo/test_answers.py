"""Answers that cannot be trusted: each fails its call at once with a clear code, or is retried
when it is likely transient (a proxy's page), and nothing but an ApixoError ever escapes."""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from apixo_helpers import API_KEY, BASE_URL, Script, Sleeps, envelope
from hypothesis import given, settings
from hypothesis import strategies as st
from loopback import Answer, loopback

from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    ApixoClient,
    ApixoError,
    GenerateInput,
    GenerateRequest,
    MalformedAnswerError,
    NotAnEnvelopeError,
    RetryPolicy,
    TaskState,
    UnexpectedResponseError,
)
from hailuo_batch.apixo.client import MAX_ANSWER_BYTES

MakeClient = Callable[..., tuple[ApixoClient, Script]]
URLS = json.dumps({"resultUrls": ["https://cdn.example.com/v.mp4"]})
REQ = GenerateRequest(
    input=GenerateInput(
        mode="standard-image-to-video",
        prompt="p",
        image_urls=["https://example.com/in.jpg"],
        duration=6,
    )
)


def ok(data: Any) -> httpx.Response:
    """A code-200 envelope; NaN and infinities are written as Python's json writes them."""
    return httpx.Response(200, content=json.dumps(envelope(200, data)).encode())


def status(**fields: Any) -> httpx.Response:
    data = {"taskId": "task_1", "state": "success", "createTime": 1, "resultJson": URLS}
    data.update(fields)
    return ok(data)


HTML = httpx.Response(200, text="<html><body>502 Bad Gateway</body></html>")


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (status(costTime={"ms": 1}), "MALFORMED_STATUS"),
        (status(createTime=[1]), "MALFORMED_STATUS"),
        (status(completeTime=1.5), "MALFORMED_STATUS"),
        (status(costTime=True), "MALFORMED_STATUS"),
        (status(createTime=10**40), "MALFORMED_STATUS"),
        (status(createTime=math.inf), "MALFORMED_STATUS"),  # JSON `Infinity`
        (status(createTime=math.nan), "MALFORMED_STATUS"),  # JSON `NaN`
        (status(state="failed", failCode={"c": 1}), "MALFORMED_STATUS"),
        (status(taskId=42), "MALFORMED_STATUS"),
        (ok(None), "MALFORMED_STATUS"),
        (ok(["task_1", "success"]), "MALFORMED_STATUS"),
        (status(taskId="task_2"), "FOREIGN_TASK"),
        (status(taskId="TASK_1"), "FOREIGN_TASK"),
        (status(state="completed"), "UNKNOWN_STATE"),
        (status(state="error"), "UNKNOWN_STATE"),
        (status(resultJson="{cut"), "BAD_RESULT_JSON"),
        (status(resultJson=json.dumps({"resultUrls": []})), "NO_RESULT_URL"),
        (status(resultJson=json.dumps({"resultUrls": ["file:///etc/passwd"]})), "BAD_RESULT_URL"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_status_fails_at_once_with_its_code(
    make_client: MakeClient, sleeps: Sleeps, answer: httpx.Response, code: str
) -> None:
    client, script = make_client(answer, default=status())
    with pytest.raises(MalformedAnswerError) as ei:
        client.get_status("task_1")
    assert ei.value.fail_code == code
    assert isinstance(ei.value, UnexpectedResponseError)
    assert "task_1" in str(ei.value)
    assert len(script.requests) == 1  # never retried: the same read gives the same answer
    assert sleeps == []


def test_non_json_200_is_retried_then_succeeds(make_client: MakeClient) -> None:
    client, script = make_client(HTML, httpx.Response(200, content=b""), status())
    assert client.get_status("task_1").state is TaskState.SUCCESS
    assert len(script.requests) == 3


@pytest.mark.parametrize(
    "answer",
    [
        HTML,
        httpx.Response(200, content=b""),
        httpx.Response(200, content=b'{"code": 200, "data": {"taskId": "task_1", "st'),
        httpx.Response(200, json={"status": "ok"}),
        httpx.Response(200, json={"code": "two hundred", "data": None}),
        httpx.Response(200, json=[1, 2]),
        httpx.Response(200, content=b"\xff\xfe\x00garbage"),
        httpx.Response(200, content=b"[" * 100_000),
    ],
    ids=["html", "empty", "cut", "no-code", "code-not-number", "array", "binary", "deep"],
)
def test_non_envelope_200_outlasting_the_budget_says_so(
    make_client: MakeClient, answer: httpx.Response
) -> None:
    client, script = make_client(default=answer)
    with pytest.raises(NotAnEnvelopeError) as ei:
        client.get_status("task_1")
    assert ei.value.fail_code == "NOT_AN_ENVELOPE"
    assert ei.value.attempts == 4 == len(script.requests)


def test_oversized_answer_is_not_read_whole(make_client: MakeClient) -> None:
    big = json.dumps(envelope(200, {"taskId": "task_1", "pad": "x" * (MAX_ANSWER_BYTES + 10)}))
    client, _ = make_client(default=httpx.Response(200, content=big.encode()))
    with pytest.raises(NotAnEnvelopeError, match="larger than"):
        client.get_status("task_1")


@pytest.mark.parametrize(("data", "expected"), [(12.5, 12.5), ("7.25", 7.25), (0, 0.0)], ids=repr)
def test_balance_accepts_numbers(make_client: MakeClient, data: Any, expected: float) -> None:
    client, _ = make_client(ok(data))
    assert client.get_balance() == expected


@pytest.mark.parametrize("data", [math.nan, math.inf, "nan", "inf", [1], 10**400], ids=repr)
def test_balance_that_is_not_a_finite_number(make_client: MakeClient, data: Any) -> None:
    answer = (
        httpx.Response(200, content=f'{{"code":200,"data":{data}}}'.encode())
        if isinstance(data, int)
        else ok(data)
    )
    client, script = make_client(answer, default=ok(1.0))
    with pytest.raises(MalformedAnswerError) as ei:
        client.get_balance()
    assert ei.value.fail_code == "MALFORMED_BALANCE"
    assert len(script.requests) == 1


@pytest.mark.parametrize(
    "data",
    [None, {}, {"taskId": ""}, {"taskId": 12}, {"taskId": ["t"]}, {"taskId": "t\n1"},
     {"taskId": "t 1"}, {"taskId": "t\x1b[2J"}, {"taskId": "t\u202e1"}, {"taskId": "t" * 257}],
)  # fmt: skip
def test_submit_without_usable_task_id_is_ambiguous(make_client: MakeClient, data: Any) -> None:
    client, script = make_client(ok(data), default=ok({"taskId": "task_x"}))
    with pytest.raises(AmbiguousSubmitError) as ei:
        client.submit(REQ)
    assert isinstance(ei.value.cause, MalformedAnswerError)
    assert ei.value.cause.fail_code == "MALFORMED_SUBMIT"
    assert len(script.requests) == 1  # never a second paid POST


# --- properties: nothing but an ApixoError ever leaves the client -----------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
STATUS_DATA = st.fixed_dictionaries(
    {"taskId": st.sampled_from(["task_1", "task_2"]) | JSON},
    optional={
        "state": st.sampled_from(["pending", "processing", "success", "failed", "gone"]) | JSON,
        "createTime": st.integers(min_value=0, max_value=2**40) | JSON,
        "costTime": JSON,
        "resultJson": st.just(URLS) | JSON.map(json.dumps) | JSON,
        "failCode": st.just("NSFW") | JSON,
        "failMsg": JSON,
    },
)


def _client(answer: httpx.Response) -> ApixoClient:
    return ApixoClient(
        API_KEY,
        BASE_URL,
        transport=httpx.MockTransport(lambda request: answer),
        retry=RetryPolicy(max_attempts=2, max_elapsed_s=5, base_s=0.01, max_s=0.01),
        sleep=lambda s: None,
    )


@settings(max_examples=150, deadline=None)
@given(data=STATUS_DATA | JSON)
def test_property_any_status_data_gives_a_status_or_a_malformed_answer(data: Any) -> None:
    with _client(ok(data)) as client:
        try:
            st_ = client.get_status("task_1")
        except MalformedAnswerError as exc:
            assert exc.fail_code in {
                "MALFORMED_STATUS",
                "FOREIGN_TASK",
                "UNKNOWN_STATE",
                "BAD_RESULT_JSON",
                "NO_RESULT_URL",
                "BAD_RESULT_URL",
            }
            return
    assert st_.task_id == "task_1"
    if st_.state is TaskState.SUCCESS:
        assert st_.result_urls


@settings(max_examples=100, deadline=None)
@given(
    code=st.integers(min_value=200, max_value=599),
    body=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()),
)
def test_property_any_answer_raises_only_apixo_errors(code: int, body: bytes) -> None:
    with _client(httpx.Response(code, content=body)) as client:
        for call in (lambda: client.get_status("task_1"), client.get_balance):
            try:
                call()
            except ApixoError:
                pass


# --- the same over real HTTP ----------------------------------------------------------------


def test_real_http_proxy_page_then_foreign_answer() -> None:
    html_page = Answer(200, b"<html>upstream hiccup</html>", {"Content-Type": "text/html"})
    foreign = Answer(
        200,
        json.dumps(envelope(200, {"taskId": "task_9", "state": "processing"})).encode(),
        {"Content-Type": "application/json"},
    )
    with (
        loopback(html_page, foreign) as server,
        ApixoClient(API_KEY, server.url, retry=RetryPolicy(3, 5, 0.01, 0.01)) as client,
        pytest.raises(MalformedAnswerError) as ei,
    ):
        client.get_status("task_1")
    assert ei.value.fail_code == "FOREIGN_TASK"
    assert ei.value.attempts == 2
    assert [s.path for s in server.seen] == ["/api/v1/statusTask/hailuo-2-3-fast?taskId=task_1"] * 2


def test_answer_errors_pickle_with_their_code() -> None:
    errors = [
        MalformedAnswerError("status of task t: unknown task state 'x'", 200, "UNKNOWN_STATE"),
        NotAnEnvelopeError("GET /x: answer is not a JSON envelope (HTTP 200)", 200),
    ]
    for err in errors:
        err.attempts = 3
        back = pickle.loads(pickle.dumps(err))
        assert (type(back), back.fail_code, back.status_code, back.attempts, str(back)) == (
            type(err),
            err.fail_code,
            200,
            3,
            str(err),
        )


# --- provider text: shown as written, never acted on -----------------------------------------

HIDDEN = ["\x00", "\x1b[31m", "\x1b[2J", "\r", "\u202e", "\u2066", "\u200b", "\u2028", "\ud800"]


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("where", ["failCode", "failMsg", "message", "data.error"])
def test_provider_text_reaches_nobody_with_characters_that_act(
    make_client: MakeClient, hidden: str, where: str
) -> None:
    """A terminal acts on ESC and CR, a page shows a bidi override as reversed text, a NUL or
    lone surrogate breaks a file: a provider's failCode or message keeps each as its escape."""
    text = f"bad{hidden}thing"
    if where in ("failCode", "failMsg"):
        data = {"taskId": "t1", "state": "failed", "failCode": "X", "failMsg": "m", where: text}
        client, _ = make_client(ok(data))
        status = client.get_status("t1")
        shown = status.fail_code if where == "failCode" else status.fail_msg
    else:
        body = (
            envelope(400, {"error": text}, "m")
            if where == "data.error"
            else envelope(400, None, text)
        )
        client, _ = make_client(httpx.Response(400, content=json.dumps(body).encode()))
        with pytest.raises(ApixoError) as ei:
            client.get_status("t1")
        shown = str(ei.value)
    assert shown is not None and hidden not in shown
    assert hidden.encode("unicode_escape").decode("ascii") in shown
    shown.encode("utf-8")  # writable anywhere


@pytest.mark.parametrize(("where", "limit"), [("failCode", 200), ("failMsg", 2000)])
def test_a_huge_provider_text_is_cut_saying_so(
    make_client: MakeClient, where: str, limit: int
) -> None:
    """An 800 KB failMsg went into every ledger record, results line, page and artifact."""
    data = {"taskId": "t1", "state": "failed", "failCode": "X", where: "x" * 600_000}
    client, _ = make_client(ok(data))
    status = client.get_status("t1")
    shown = status.fail_code if where == "failCode" else status.fail_msg
    assert shown is not None and len(shown) < limit + 50
    assert shown.endswith(f"... ({600_000 - limit:,} more characters)")
