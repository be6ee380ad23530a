"""Request and status models of the hailuo-2-3-fast contract (pydantic v2).

Validation happens here, before any money is spent: one http(s) image URL, a non-empty prompt,
only the two image-to-video modes, and duration 6 or 10 for standard (pro drops it and says so
through `GenerateInput.dropped_duration`).
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

STANDARD_DURATIONS = (6, 10)
PRO_DURATION_S = 6


class Mode(StrEnum):
    STANDARD = "standard-image-to-video"
    PRO = "pro-image-to-video"


class Provider(StrEnum):
    AUTO = "auto"
    VALUE = "value"
    OFFICIAL = "official"


class RequestType(StrEnum):
    ASYNC = "async"
    CALLBACK = "callback"


class TaskState(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"


def _is_http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


class GenerateInput(BaseModel):
    """The `input` object of a create-task request."""

    model_config = ConfigDict(frozen=False, extra="forbid")

    mode: Mode
    prompt: str
    image_urls: list[str]
    duration: int | None = Field(default=None, validate_default=True)

    _dropped_duration: bool = PrivateAttr(default=False)

    @field_validator("mode", mode="before")
    @classmethod
    def _check_mode(cls, v: Any) -> Any:
        allowed = [m.value for m in Mode]
        if v not in allowed:
            raise ValueError(
                f"Invalid mode type {v!r}: only {' or '.join(allowed)} are supported "
                "(text-to-video is not)"
            )
        return v

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("image_urls")
    @classmethod
    def _check_image_urls(cls, v: list[str]) -> list[str]:
        if len(v) != 1:
            raise ValueError(f"image_urls must hold exactly one URL, got {len(v)}")
        if not _is_http_url(v[0]):
            raise ValueError("image_urls[0] must be an http:// or https:// URL")
        return v

    @field_validator("duration", mode="before")
    @classmethod
    def _coerce_duration(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, bool):
            raise ValueError("duration must be a number of seconds (6 or 10)")
        if isinstance(v, str):
            text = v.strip()
            if not text.isdigit():
                raise ValueError(f"duration must be 6 or 10, got {v!r}")
            return int(text)
        return v

    @field_validator("duration")
    @classmethod
    def _check_duration(cls, v: int | None, info: ValidationInfo) -> int | None:
        mode = info.data.get("mode")
        if mode == Mode.STANDARD:
            if v is None:
                raise ValueError("duration is required for standard-image-to-video (6 or 10)")
            if v not in STANDARD_DURATIONS:
                raise ValueError(f"duration must be 6 or 10 for standard-image-to-video, got {v}")
        return v

    def model_post_init(self, context: Any, /) -> None:
        if self.mode == Mode.PRO and self.duration is not None:
            self.duration = None
            self._dropped_duration = True

    @property
    def dropped_duration(self) -> bool:
        """True when a duration was given for pro mode and dropped (pro is always 6 s)."""
        return self._dropped_duration

    @property
    def video_seconds(self) -> int:
        """Length of the video this input produces."""
        return PRO_DURATION_S if self.mode == Mode.PRO else int(self.duration or 0)


class GenerateRequest(BaseModel):
    """A create-task request; `to_payload()` is the exact JSON body."""

    # callback_url may hold the receiver's secret token: keep it out of validation errors.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    request_type: RequestType = RequestType.ASYNC
    callback_url: str | None = Field(default=None, validate_default=True)
    provider: Provider = Provider.AUTO
    input: GenerateInput

    @field_validator("callback_url")
    @classmethod
    def _check_callback_url(cls, v: str | None, info: ValidationInfo) -> str | None:
        request_type = info.data.get("request_type")
        if request_type == RequestType.CALLBACK:
            if not v:
                raise ValueError("callback_url is required when request_type is 'callback'")
            if not _is_http_url(v):
                raise ValueError("callback_url must be an http:// or https:// URL")
        elif v is not None:
            raise ValueError("callback_url is only allowed when request_type is 'callback'")
        return v

    def to_payload(self) -> dict[str, Any]:
        """The JSON body: no None fields, duration a number (absent for pro)."""
        return self.model_dump(mode="json", exclude_none=True)


def _opt_int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return int(value)


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    return str(value)


def _result_urls(data: dict[str, Any]) -> list[str]:
    raw = data.get("resultJson")
    if raw is None or raw == "":
        urls = data.get("resultUrls", [])
    else:
        obj = json.loads(raw) if isinstance(raw, str | bytes) else raw
        if not isinstance(obj, dict):
            raise ValueError("resultJson must hold a JSON object")
        urls = obj.get("resultUrls", [])
    if urls is None:
        return []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ValueError("resultUrls must be a list of strings")
    return list(urls)


class TaskStatus(BaseModel):
    """A task's status, parsed from a status answer's `data` (or a callback body's `data`)."""

    task_id: str
    state: TaskState
    create_time: int | None = None
    complete_time: int | None = None
    cost_time_ms: int | None = None
    result_urls: list[str] = Field(default_factory=list)
    fail_code: str | None = None
    fail_msg: str | None = None
    raw: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> TaskStatus:
        """Parse the contract's camelCase `data`. Raises ValueError on a malformed object."""
        if not isinstance(data, dict):
            raise ValueError("status data must be a JSON object")
        task_id = data.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            raise ValueError("status data has no taskId")
        state = data.get("state")
        if not isinstance(state, str) or state.lower() not in {s.value for s in TaskState}:
            raise ValueError(f"unknown task state {state!r}")
        return cls(
            task_id=task_id,
            state=TaskState(state.lower()),
            create_time=_opt_int(data.get("createTime")),
            complete_time=_opt_int(data.get("completeTime")),
            cost_time_ms=_opt_int(data.get("costTime")),
            result_urls=_result_urls(data),
            fail_code=_opt_str(data.get("failCode")),
            fail_msg=_opt_str(data.get("failMsg")),
            raw=dict(data),
        )

    @property
    def is_terminal(self) -> bool:
        return self.state in (TaskState.SUCCESS, TaskState.FAILED)
