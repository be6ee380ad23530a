"""Request and status models of the hailuo-2-3-fast contract (pydantic v2).

Validation happens here, before any money is spent: one http(s) image URL, a non-empty prompt,
only the two image-to-video modes, and duration 6 or 10 for standard (pro drops it and says so
through `GenerateInput.dropped_duration`).
"""

from __future__ import annotations

import json
import math
import unicodedata
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from hailuo_batch.apixo.errors import (
    BAD_RESULT_JSON,
    BAD_RESULT_URL,
    MALFORMED_STATUS,
    NO_RESULT_URL,
    UNKNOWN_STATE,
)
from hailuo_batch.apixo.transport import decoded_url

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


_MAX_WHOLE = 2**63 - 1  # a time in ms or a duration beyond this is not a time


class MalformedStatus(ValueError):
    """A status `data` object that breaks the contract; `.fail_code` names the broken rule
    (one of the codes of `hailuo_batch.apixo.errors`)."""

    def __init__(self, fail_code: str, message: str) -> None:
        super().__init__(message)
        self.fail_code = fail_code


#: the longest failCode and provider message kept (a hostile answer may send megabytes, which
#: every ledger record, results line, page and artifact would then carry)
MAX_FAIL_CODE = 200
MAX_PROVIDER_MESSAGE = 2000
#: characters a terminal or a page acts on instead of showing: controls (ESC, NUL, CR),
#: formats (bidi overrides, zero-width), lone surrogates, line and paragraph separators
_HIDDEN = {"Cc", "Cf", "Cs", "Zl", "Zp"}
#: format characters that only shape what is shown (emoji sequences, Persian and Indic
#: scripts, soft hyphens): kept
_SHAPING = {"\u200c", "\u200d", "\u00ad"}


def provider_text(text: str, limit: int) -> str:
    """Text the provider wrote, as it may be shown anywhere: cut to `limit` characters (saying
    how much more there was), and every character that acts instead of showing written as
    its escape (`\\x1b`, `\\u202e`); newlines and tabs stay."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit:,} more characters)"
    if text.isprintable():
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if ch not in "\n\t" and ch not in _SHAPING and unicodedata.category(ch) in _HIDDEN
        else ch
        for ch in text
    )


def shown(value: Any) -> str:
    """Any text from outside (a file name, an id, a message) as a log line may show it: one
    line's worth, acting characters escaped (`provider_text`, cut at 500 characters)."""
    return provider_text(str(value), 500)


def _describe(value: Any) -> str:
    """A short description of a JSON value for an error message (never the whole value)."""
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(data: dict[str, Any], key: str) -> int | None:
    """`data[key]` as a whole number in [0, 2**63), None when absent, null or "".

    JSON does not tell integers from floats, so 120000.0 is 120000; a fraction, NaN, an
    infinity, a boolean, an object or a list is malformed. A string of ASCII digits is
    accepted (the provider's own examples quote numbers).
    """
    value = data.get(key)
    if value is None or (isinstance(value, str) and value == ""):
        return None
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 19:
            number = int(text)
    if number is None:
        raise MalformedStatus(
            MALFORMED_STATUS, f"{key} must be a whole number, got {_describe(value)}"
        )
    if not 0 <= number <= _MAX_WHOLE:
        raise MalformedStatus(MALFORMED_STATUS, f"{key} {_describe(number)} is out of range")
    return number


def _text(data: dict[str, Any], key: str, *, limit: int, numbers: bool = False) -> str | None:
    """`data[key]` as a string (`provider_text`), None when absent or null; a whole number
    too when `numbers`."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return provider_text(value, limit)
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise MalformedStatus(MALFORMED_STATUS, f"{key} must be a string, got {_describe(value)}")


def _is_fetchable_url(value: str) -> bool:
    """An absolute http(s) URL with a host, that httpx accepts as it is."""
    if any(c.isspace() or not c.isprintable() for c in value):
        return False
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    try:
        url = decoded_url(value)
    except (httpx.InvalidURL, ValueError):
        return False
    return url.scheme in ("http", "https") and bool(url.host)


def _result_object(data: dict[str, Any]) -> dict[str, Any]:
    """The object that holds `resultUrls`: resultJson (a JSON string, or already an object),
    or `data` itself when the answer puts resultUrls at the top level."""
    raw = data.get("resultJson")
    if raw is None or raw == "":
        return data
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise MalformedStatus(
            BAD_RESULT_JSON, f"resultJson must be a JSON string, got {_describe(raw)}"
        )
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise MalformedStatus(BAD_RESULT_JSON, "resultJson does not parse as JSON") from None
    if not isinstance(obj, dict):
        raise MalformedStatus(
            BAD_RESULT_JSON, f"resultJson must hold a JSON object, got {_describe(obj)}"
        )
    return obj


def _result_urls(data: dict[str, Any]) -> list[str]:
    """The result URLs of a successful task: a non-empty list of http(s) URLs."""
    urls = _result_object(data).get("resultUrls")
    if urls is None or urls == []:
        raise MalformedStatus(NO_RESULT_URL, "success without any resultUrls")
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise MalformedStatus(BAD_RESULT_JSON, "resultUrls must be a list of strings")
    if not all(_is_fetchable_url(u) for u in urls):
        raise MalformedStatus(BAD_RESULT_URL, "a result URL is not an absolute http(s) URL")
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
    def from_data(cls, data: Any) -> TaskStatus:
        """Parse the contract's camelCase `data`.

        Total over JSON: for any decoded JSON value it returns a status or raises
        `MalformedStatus` (a ValueError) whose `.fail_code` names the broken rule. A success must
        carry at least one http(s) result URL; `resultJson` is only read on success.
        """
        if not isinstance(data, dict):
            raise MalformedStatus(
                MALFORMED_STATUS, f"status data must be a JSON object, got {_describe(data)}"
            )
        task_id = data.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            raise MalformedStatus(
                MALFORMED_STATUS, f"status data has no taskId string (got {_describe(task_id)})"
            )
        state = data.get("state")
        if not isinstance(state, str):
            raise MalformedStatus(
                MALFORMED_STATUS, f"status data has no state string (got {_describe(state)})"
            )
        known = {s.value for s in TaskState}
        if state.strip().lower() not in known:
            raise MalformedStatus(UNKNOWN_STATE, f"unknown task state {_describe(state)}")
        task_state = TaskState(state.strip().lower())
        fields: dict[str, Any] = {
            "create_time": _whole(data, "createTime"),
            "complete_time": _whole(data, "completeTime"),
            "cost_time_ms": _whole(data, "costTime"),
            "fail_code": _text(data, "failCode", numbers=True, limit=MAX_FAIL_CODE),
            "fail_msg": _text(data, "failMsg", limit=MAX_PROVIDER_MESSAGE),
        }
        if task_state == TaskState.SUCCESS:
            fields["result_urls"] = _result_urls(data)
        try:
            return cls(task_id=task_id, state=task_state, raw=dict(data), **fields)
        except ValidationError as exc:  # not reached: every field is checked above
            raise MalformedStatus(
                MALFORMED_STATUS, f"status data has {exc.error_count()} invalid field(s)"
            ) from None

    @property
    def is_terminal(self) -> bool:
        return self.state in (TaskState.SUCCESS, TaskState.FAILED)
