"""Helpers of the apixo client tests: a scripted httpx.MockTransport handler and a no-wait sleep."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx

API_KEY = "sk-test-SECRET-0123456789abcdef"
BASE_URL = "https://api.apixo.test"

Step = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def envelope(code: int = 200, data: Any = None, message: str = "success") -> dict[str, Any]:
    return {"code": code, "message": message, "data": data}


def ok(data: Any, **headers: str) -> httpx.Response:
    return httpx.Response(200, json=envelope(200, data), headers=headers)


class Script:
    """A MockTransport handler answering each request with the next scripted step.

    When the script runs out, `default` answers. Every request is recorded.
    """

    def __init__(self, *steps: Step, default: Step | None = None) -> None:
        self.steps = list(steps)
        self.default = default
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        step = self.steps.pop(0) if self.steps else self.default
        if step is None:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        if isinstance(step, Exception):
            raise step
        if isinstance(step, httpx.Response):
            return step
        return step(request)

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)
