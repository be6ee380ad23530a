"""Validation rules of the create-task request and parsing of task statuses."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from hailuo_batch.apixo import (
    GenerateInput,
    GenerateRequest,
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
