"""The request side of the apixo contract: validating a create-task body, and prompt markers.

Prompt markers make outcomes deterministic for tests and demos:

- `[fail:CODE]`   the task fails with failCode CODE;
- `[flaky:CODE]`  the first submission of that (prompt, image URL) fails with CODE, later ones
  succeed;
- `[reject:NNN]`  the create call itself is refused with code NNN (400, 402, 403, 429, 500, 503).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

MODEL = "hailuo-2-3-fast"
MODE_STANDARD = "standard-image-to-video"
MODE_PRO = "pro-image-to-video"
REQUEST_TYPES = ("async", "callback")
PROVIDERS = ("auto", "value", "official")
REJECTABLE_CODES = (400, 402, 403, 429, 500, 503)

_FAIL_RE = re.compile(r"\[fail:([A-Za-z0-9_.-]+)\]")
_FLAKY_RE = re.compile(r"\[flaky:([A-Za-z0-9_.-]+)\]")
_REJECT_RE = re.compile(r"\[reject:(\d{3})\]")

FAIL_MESSAGES = {
    "CONTENT_VIOLATION": "The content violates the usage policy.",
    "NSFW_DETECTED": "NSFW content detected.",
    "INVALID_IMAGE_URL": "The input image URL is invalid or not accepted.",
    "IMAGE_TOO_LARGE": "The input image is too large.",
    "UNSUPPORTED_FORMAT": "The input image format is not supported.",
    "PROMPT_TOO_LONG": "The prompt is too long.",
    "IMAGE_DOWNLOAD_FAILED": "The input image could not be downloaded.",
    "PROCESSING_TIMEOUT": "Processing timed out.",
    "MODEL_UNAVAILABLE": "The model is temporarily unavailable.",
    "GENERATION_FAILED": "Video generation failed.",
    "INSUFFICIENT_CREDITS": "Insufficient credits.",
}


class InvalidRequest(ValueError):
    """A create-task body the API refuses with code 400; the message is safe to echo."""


@dataclass(frozen=True)
class SubmitRequest:
    """A validated create-task body."""

    request_type: str
    callback_url: str | None
    provider: str
    mode: str
    prompt: str
    image_url: str
    duration: int  # seconds of output video (pro: always 6)

    @property
    def input_key(self) -> str:
        return input_key(self.prompt, self.image_url)


def input_key(prompt: str, image_url: str) -> str:
    """The key of `submissions_by_input` in the stats: sha256 of prompt NUL image URL."""
    return hashlib.sha256(f"{prompt}\0{image_url}".encode()).hexdigest()


def fail_message(code: str) -> str:
    return FAIL_MESSAGES.get(code, f"Task failed: {code}.")


def fail_marker(prompt: str) -> str | None:
    m = _FAIL_RE.search(prompt)
    return m.group(1) if m else None


def flaky_marker(prompt: str) -> str | None:
    m = _FLAKY_RE.search(prompt)
    return m.group(1) if m else None


def reject_marker(prompt: str) -> int | None:
    m = _REJECT_RE.search(prompt)
    if m and int(m.group(1)) in REJECTABLE_CODES:
        return int(m.group(1))
    return None


def _is_http_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://")) and len(value) > 8


def _duration(value: Any) -> int:
    """6 or 10, given as a number or a numeric string."""
    number: float
    if isinstance(value, bool):
        raise InvalidRequest("duration must be 6 or 10")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise InvalidRequest("duration must be 6 or 10") from None
    else:
        raise InvalidRequest("duration is required for standard-image-to-video (6 or 10)")
    if not math.isfinite(number) or number not in (6.0, 10.0):
        raise InvalidRequest("duration must be 6 or 10")
    return int(number)


def parse_submit(body: Any) -> SubmitRequest:
    """Validate a create-task body as the provider does; raise InvalidRequest on any defect."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    request_type = body.get("request_type", "async")
    if request_type not in REQUEST_TYPES:
        raise InvalidRequest("request_type must be 'async' or 'callback'")
    callback_url = body.get("callback_url")
    if request_type == "callback":
        if not _is_http_url(callback_url):
            raise InvalidRequest("callback_url is required when request_type is 'callback'")
    elif callback_url not in (None, ""):
        raise InvalidRequest("callback_url is only allowed when request_type is 'callback'")
    else:
        callback_url = None
    provider = body.get("provider", "auto")
    if provider not in PROVIDERS:
        raise InvalidRequest("provider must be one of auto, value, official")
    inp = body.get("input")
    if not isinstance(inp, dict):
        raise InvalidRequest("input is required")
    mode = inp.get("mode")
    if mode not in (MODE_STANDARD, MODE_PRO):
        raise InvalidRequest("Invalid mode type")
    prompt = inp.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("prompt is required")
    urls = inp.get("image_urls")
    if not isinstance(urls, list) or len(urls) != 1:
        raise InvalidRequest("image_urls must hold exactly one URL")
    if not _is_http_url(urls[0]):
        raise InvalidRequest("image_urls[0] must be an http(s) URL")
    duration = _duration(inp.get("duration")) if mode == MODE_STANDARD else 6
    return SubmitRequest(
        request_type=request_type,
        callback_url=callback_url,
        provider=provider,
        mode=mode,
        prompt=prompt,
        image_url=urls[0],
        duration=duration,
    )
