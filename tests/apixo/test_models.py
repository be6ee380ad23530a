"""Validation rules of the create-task request and parsing of task statuses."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hailuo_batch.apixo import (
    GenerateInput,
    GenerateRequest,
    MalformedStatus,
    Mode,
    Provider,
    RequestType,
    TaskState,
    TaskStatus,
)

IMG = "https://example.com/input.jpg"


def std(**kw: Any) -> GenerateInput:
    args: dict[str, Any] = {"mode": "standard-image-to-video", "prompt": "p", "image_urls": [IMG]}
    args.update(kw)
    return GenerateInput(**args)


def error_fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


@pytest.mark.parametrize("duration", [6, 10, "10", "6", " 6 "])
def test_standard_accepts_6_and_10_as_int_or_string(duration: Any) -> None:
    inp = std(duration=duration)
    assert inp.duration == int(str(duration))
    assert isinstance(inp.duration, int)
    assert inp.video_seconds == int(str(duration))
    assert not inp.dropped_duration


@pytest.mark.parametrize("duration", [7, 5, 0, "7", "ten", "6.5", True, 11])
def test_standard_refuses_other_durations(duration: Any) -> None:
    with pytest.raises(ValidationError) as ei:
        std(duration=duration)
    assert error_fields(ei.value) == {"duration"}
    assert "6 or 10" in str(ei.value)


def test_standard_requires_duration() -> None:
    with pytest.raises(ValidationError) as ei:
        std()
    assert error_fields(ei.value) == {"duration"}
    assert "required" in str(ei.value)


def test_pro_drops_duration_and_says_so() -> None:
    inp = GenerateInput(mode=Mode.PRO, prompt="p", image_urls=[IMG], duration="10")
    assert inp.duration is None
    assert inp.dropped_duration is True
    assert inp.video_seconds == 6
    assert "duration" not in GenerateRequest(input=inp).to_payload()["input"]


def test_pro_without_duration_drops_nothing() -> None:
    inp = GenerateInput(mode=Mode.PRO, prompt="p", image_urls=[IMG])
    assert inp.duration is None
    assert inp.dropped_duration is False


@pytest.mark.parametrize("mode", ["text-to-video", "standard-text-to-video", "", "PRO"])
def test_other_modes_refused(mode: str) -> None:
    with pytest.raises(ValidationError) as ei:
        GenerateInput(mode=mode, prompt="p", image_urls=[IMG], duration=6)
    assert "mode" in error_fields(ei.value)
    assert "Invalid mode type" in str(ei.value)


@pytest.mark.parametrize(
    "urls", [[], [IMG, "https://example.com/b.jpg"], ["ftp://x/a.jpg"], ["/local/a.jpg"], ["x"]]
)
def test_exactly_one_http_image_url(urls: list[str]) -> None:
    with pytest.raises(ValidationError) as ei:
        std(duration=6, image_urls=urls)
    assert error_fields(ei.value) == {"image_urls"}


@pytest.mark.parametrize("prompt", ["", "   "])
def test_prompt_must_not_be_empty(prompt: str) -> None:
    with pytest.raises(ValidationError) as ei:
        std(duration=6, prompt=prompt)
    assert error_fields(ei.value) == {"prompt"}


def test_callback_requires_url() -> None:
    with pytest.raises(ValidationError) as ei:
        GenerateRequest(request_type=RequestType.CALLBACK, input=std(duration=6))
    assert error_fields(ei.value) == {"callback_url"}


def test_async_refuses_callback_url_without_echoing_it() -> None:
    secret_url = "https://hooks.example.com/cb/SECRET-TOKEN"
    with pytest.raises(ValidationError) as ei:
        GenerateRequest(callback_url=secret_url, input=std(duration=6))
    assert error_fields(ei.value) == {"callback_url"}
    assert "SECRET-TOKEN" not in str(ei.value)


def test_payload_shape_async_standard() -> None:
    req = GenerateRequest(input=std(duration="10", prompt="slow parallax"))
    assert req.to_payload() == {
        "request_type": "async",
        "provider": "auto",
        "input": {
            "mode": "standard-image-to-video",
            "prompt": "slow parallax",
            "image_urls": [IMG],
            "duration": 10,
        },
    }
    # a number on the wire, not a string
    assert '"duration": 10' in json.dumps(req.to_payload())


def test_payload_shape_callback_pro() -> None:
    req = GenerateRequest(
        request_type="callback",
        callback_url="https://example.com/hook",
        provider=Provider.OFFICIAL,
        input=GenerateInput(mode="pro-image-to-video", prompt="p", image_urls=[IMG], duration=6),
    )
    assert req.to_payload() == {
        "request_type": "callback",
        "callback_url": "https://example.com/hook",
        "provider": "official",
        "input": {"mode": "pro-image-to-video", "prompt": "p", "image_urls": [IMG]},
    }


def test_unknown_provider_refused() -> None:
    with pytest.raises(ValidationError) as ei:
        GenerateRequest(provider="cheapest", input=std(duration=6))
    assert error_fields(ei.value) == {"provider"}


# --- TaskStatus ------------------------------------------------------------------------------


def test_status_success_with_result_json_string() -> None:
    data = {
        "taskId": "task_1",
        "state": "success",
        "createTime": 1700000000000,
        "completeTime": 1700000120000,
        "costTime": 120000,
        "resultJson": json.dumps({"resultUrls": ["https://cdn.example.com/v.mp4"]}),
    }
    st = TaskStatus.from_data(data)
    assert st.task_id == "task_1"
    assert st.state is TaskState.SUCCESS
    assert st.is_terminal
    assert st.result_urls == ["https://cdn.example.com/v.mp4"]
    assert (st.create_time, st.complete_time, st.cost_time_ms) == (
        1700000000000,
        1700000120000,
        120000,
    )
    assert st.raw == data


def test_status_success_with_result_json_object() -> None:
    st = TaskStatus.from_data(
        {"taskId": "t", "state": "success", "resultJson": {"resultUrls": ["https://x/v.mp4"]}}
    )
    assert st.result_urls == ["https://x/v.mp4"]


def test_status_failed() -> None:
    st = TaskStatus.from_data(
        {
            "taskId": "t",
            "state": "failed",
            "createTime": 1,
            "failCode": "NSFW_DETECTED",
            "failMsg": "nope",
        }
    )
    assert st.state is TaskState.FAILED
    assert st.is_terminal
    assert (st.fail_code, st.fail_msg) == ("NSFW_DETECTED", "nope")
    assert st.result_urls == []


@pytest.mark.parametrize("state", ["pending", "processing"])
def test_status_not_terminal(state: str) -> None:
    st = TaskStatus.from_data({"taskId": "t", "state": state, "createTime": 5})
    assert st.state == state
    assert not st.is_terminal
    assert st.complete_time is None


@pytest.mark.parametrize(
    "data",
    [
        {"state": "success"},
        {"taskId": "t", "state": "exploded"},
        {"taskId": "t", "state": "success", "resultJson": "{not json"},
        {"taskId": "t", "state": "success", "resultJson": json.dumps({"resultUrls": "x"})},
    ],
)
def test_status_malformed_raises_value_error(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TaskStatus.from_data(data)


# --- TaskStatus: defensive parsing -----------------------------------------------------------

OK_URL = json.dumps({"resultUrls": ["https://cdn.example.com/v.mp4"]})
WRONG_WHOLE = [
    {"a": 1},
    [1],
    1.5,
    True,
    False,
    math.nan,
    math.inf,
    -math.inf,
    10**30,
    -1,
    "12a",
    "1e3",
]
FAIL_CODES = {
    "MALFORMED_STATUS",
    "UNKNOWN_STATE",
    "BAD_RESULT_JSON",
    "NO_RESULT_URL",
    "BAD_RESULT_URL",
}


def success(**extra: Any) -> dict[str, Any]:
    return {"taskId": "t", "state": "success", "resultJson": OK_URL, **extra}


def code_of(data: Any) -> str:
    with pytest.raises(MalformedStatus) as ei:
        TaskStatus.from_data(data)
    assert isinstance(ei.value, ValueError)
    return ei.value.fail_code


@pytest.mark.parametrize("field", ["createTime", "completeTime", "costTime"])
@pytest.mark.parametrize("value", WRONG_WHOLE, ids=repr)
def test_wrong_typed_number_is_malformed(field: str, value: Any) -> None:
    assert code_of(success(**{field: value})) == "MALFORMED_STATUS"


@pytest.mark.parametrize(
    ("value", "expected"), [(120000, 120000), (120000.0, 120000), ("120000", 120000), ("", None)]
)
def test_whole_numbers_in_any_json_form(value: Any, expected: int | None) -> None:
    assert TaskStatus.from_data(success(costTime=value)).cost_time_ms == expected


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "success",
        {},
        {"state": "success"},
        {"taskId": 7, "state": "success"},
        {"taskId": "", "state": "success"},
        {"taskId": {"id": "t"}, "state": "success"},
        {"taskId": "t"},
        {"taskId": "t", "state": 1},
        {"taskId": "t", "state": ["success"]},
        {"taskId": "t", "state": "failed", "failCode": {"code": "X"}},
        {"taskId": "t", "state": "failed", "failCode": 1.5},
        {"taskId": "t", "state": "failed", "failMsg": ["nope"]},
        {"taskId": "t", "state": "failed", "failMsg": 3},
    ],
    ids=repr,
)
def test_malformed_status_objects(data: Any) -> None:
    assert code_of(data) == "MALFORMED_STATUS"


@pytest.mark.parametrize("state", ["done", "SUCCEEDED", "error", "cancelled", "timeout", ""])
def test_unknown_state_is_refused_not_waited_on(state: str) -> None:
    assert code_of({"taskId": "t", "state": state}) == "UNKNOWN_STATE"


def test_state_is_case_and_space_insensitive_and_numeric_fail_code_kept() -> None:
    st_ = TaskStatus.from_data({"taskId": "t", "state": " FAILED ", "failCode": 5001})
    assert (st_.state, st_.fail_code) == (TaskState.FAILED, "5001")


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"resultJson": "{not json"}, "BAD_RESULT_JSON"),
        ({"resultJson": "[1, 2]"}, "BAD_RESULT_JSON"),
        ({"resultJson": 12}, "BAD_RESULT_JSON"),
        ({"resultJson": ["https://cdn.example.com/v.mp4"]}, "BAD_RESULT_JSON"),
        ({"resultJson": "[" * 100_000}, "BAD_RESULT_JSON"),
        ({"resultJson": json.dumps({"resultUrls": "https://x/v.mp4"})}, "BAD_RESULT_JSON"),
        ({"resultJson": json.dumps({"resultUrls": [{"url": "https://x"}]})}, "BAD_RESULT_JSON"),
        ({"resultJson": json.dumps({"other": 1})}, "NO_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": []})}, "NO_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": None})}, "NO_RESULT_URL"),
        ({}, "NO_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": ["ftp://x/v.mp4"]})}, "BAD_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": ["/videos/v.mp4"]})}, "BAD_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": ["https://"]})}, "BAD_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": ["javascript:alert(1)"]})}, "BAD_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": ["https://a b/v.mp4"]})}, "BAD_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": ["https://xn--zz/v.mp4"]})}, "BAD_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": ["https://xn--/v.mp4"]})}, "BAD_RESULT_URL"),
        ({"resultJson": json.dumps({"resultUrls": ["https://xn--ls8h.la/v"]})}, "BAD_RESULT_URL"),
        (
            {"resultJson": json.dumps({"resultUrls": ["https://x/v.mp4", "file:///etc"]})},
            "BAD_RESULT_URL",
        ),
    ],
    ids=repr,
)
def test_success_needs_usable_result_urls(result: dict[str, Any], expected: str) -> None:
    assert code_of({"taskId": "t", "state": "success", **result}) == expected


def test_result_json_is_only_read_on_success() -> None:
    st_ = TaskStatus.from_data(
        {"taskId": "t", "state": "failed", "failCode": "NSFW", "resultJson": "{garbage"}
    )
    assert (st_.fail_code, st_.result_urls) == ("NSFW", [])


def test_top_level_result_urls_still_accepted() -> None:
    st_ = TaskStatus.from_data(
        {"taskId": "t", "state": "success", "resultUrls": ["https://x.example/v.mp4"]}
    )
    assert st_.result_urls == ["https://x.example/v.mp4"]


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "taskId",
    "state",
    "createTime",
    "completeTime",
    "costTime",
    "resultJson",
    "resultUrls",
    "failCode",
    "failMsg",
]
STATE_LIKE = st.sampled_from(["pending", "processing", "success", "failed", "SUCCESS", "done"])
RESULT_JSON_LIKE = st.one_of(
    JSON.map(json.dumps),
    st.lists(st.text(max_size=30), max_size=3).map(lambda u: json.dumps({"resultUrls": u})),
    st.just(OK_URL),
)


@st.composite
def status_like(draw: st.DrawFn) -> dict[str, Any]:
    """A plausible status object with up to three of its fields replaced by arbitrary JSON."""
    data: dict[str, Any] = {
        "taskId": draw(st.text(min_size=1, max_size=10)),
        "state": draw(STATE_LIKE),
        "createTime": draw(st.integers(min_value=0, max_value=2**45)),
        "resultJson": draw(RESULT_JSON_LIKE),
        "failCode": draw(st.sampled_from(["NSFW", "PROCESSING_TIMEOUT", None])),
    }
    for key in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        data[key] = draw(JSON)
    return data


@settings(max_examples=200, deadline=None)
@given(data=JSON | status_like())
def test_property_from_data_is_total_over_json(data: Any) -> None:
    """Any decoded JSON gives a status or a MalformedStatus with a known code; nothing else."""
    try:
        st_ = TaskStatus.from_data(data)
    except MalformedStatus as exc:
        assert exc.fail_code in FAIL_CODES
        return
    assert isinstance(data, dict) and st_.task_id == data["taskId"]
    assert st_.state in set(TaskState)
    for n in (st_.create_time, st_.complete_time, st_.cost_time_ms):
        assert n is None or 0 <= n < 2**63
    if st_.state is TaskState.SUCCESS:
        assert st_.result_urls and all(
            u.startswith(("http://", "https://")) for u in st_.result_urls
        )
