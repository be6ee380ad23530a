"""Which request gets which fault: scripted faults first, then the random `fault_rate` draw.

Routes: `submit`, `status`, `balance`, `download` (result videos), or `any` when scripting.

Kinds:
- `500`, `503`, `429` (with Retry-After): that HTTP status with the error envelope;
- `body500`, `body429`: HTTP 200 whose envelope carries code 500 / 429;
- `drop`: the connection is closed without any response;
- `slow`: the normal answer after `slow_s` seconds;
- `drop_after_create`: the request is fully processed (a submit creates and bills its task),
  then the connection is closed instead of answering;
- `truncate` (download): headers and part of the body are sent, then the connection is closed;
- `trickle` (download, scripted only): the body is dribbled out over `slow_s` seconds.
- `401`, `404` (scripted only): that HTTP status with the error envelope (a revoked key, a task
  the provider forgot);
- `bad_status`, `foreign_task`, `unknown_state`, `html200` (status): an answer with a field of
  the wrong type, another task's id, a state the contract does not know, or a proxy's HTML
  page with status 200;
- `html_body`, `empty_body`, `cut_body`, `gzip_body` (download): see `BAD_BODY_KINDS`.
- `reused_task` (submit, scripted only): the task is created and billed, and the answer names
  the first task the emulator created instead;
- `swapped_result` (status, scripted only): a success answer whose `resultJson` is the first
  task's (a freshly signed URL of that task's video).

With `hostile=True` (the emulator's `hostile_faults`), the random draw includes the bad status
answers and bad download bodies too.

Bad result bodies (download, scripted only), as a CDN can serve them; each is HTTP 200:
- `html_body`: a `text/html` error page instead of the video;
- `empty_body`: `Content-Length: 0` and no bytes;
- `cut_body`: no Content-Length and no chunked framing; half the video, then the connection is
  closed, so the client cannot tell the body was cut;
- `gzip_body`: the real video, gzip-compressed with `Content-Encoding: gzip` (a good video).

Download-only kinds given to another route (through `any`) drop the connection.
"""

from __future__ import annotations

import random
from collections import deque

ROUTES = ("submit", "status", "balance", "download")
SCRIPT_ROUTES = (*ROUTES, "any")
FAULT_KINDS = (
    "500",
    "503",
    "429",
    "body500",
    "body429",
    "drop",
    "slow",
    "drop_after_create",
    "truncate",
    "trickle",
    "html_body",
    "empty_body",
    "cut_body",
    "gzip_body",
    "401",
    "404",
    "bad_status",
    "foreign_task",
    "unknown_state",
    "html200",
    "reused_task",
    "swapped_result",
)
BAD_BODY_KINDS = ("html_body", "empty_body", "cut_body", "gzip_body")
#: status answers that are not to be trusted: a field of the wrong type, another task's
#: answer, a state the contract does not know, a proxy's HTML page with status 200
BAD_STATUS_KINDS = ("bad_status", "foreign_task", "unknown_state", "html200")

#: what `hostile=True` adds to the random draw (off by default: seeded sequences stay as they were)
_HOSTILE_KINDS: dict[str, tuple[str, ...]] = {
    "status": BAD_STATUS_KINDS,
    "download": ("html_body", "empty_body", "cut_body", "gzip_body"),
}

_RANDOM_KINDS: dict[str, tuple[str, ...]] = {
    "submit": ("500", "503", "429", "body500", "body429", "drop", "slow", "drop_after_create"),
    "status": ("500", "503", "429", "body500", "body429", "drop", "slow"),
    "balance": ("500", "503", "429", "body500", "body429", "drop", "slow"),
    "download": ("500", "503", "429", "drop", "slow", "truncate"),
}


class FaultPlan:
    """Scripted fault queues plus a seeded random draw. Not thread-safe: callers hold a lock."""

    def __init__(self, rate: float, rng: random.Random, *, hostile: bool = False) -> None:
        self.rate = rate
        self._rng = rng
        self.hostile = hostile
        self._scripted: dict[str, deque[str]] = {r: deque() for r in SCRIPT_ROUTES}

    def script(self, route: str, kind: str, count: int = 1) -> None:
        """Give the next `count` requests of `route` (or of any route) the fault `kind`."""
        if route not in SCRIPT_ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {SCRIPT_ROUTES}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if count < 0:
            raise ValueError("count must be >= 0")
        self._scripted[route].extend([kind] * count)

    def clear(self) -> None:
        for queue in self._scripted.values():
            queue.clear()

    def pending(self) -> dict[str, list[str]]:
        return {route: list(q) for route, q in self._scripted.items() if q}

    def draw(self, route: str) -> str | None:
        """The fault for the next request of `route`, or None."""
        for queue in (self._scripted[route], self._scripted["any"]):
            if queue:
                return queue.popleft()
        if self.rate > 0 and self._rng.random() < self.rate:
            kinds = _RANDOM_KINDS[route]
            if self.hostile:
                kinds = (*kinds, *_HOSTILE_KINDS.get(route, ()))
            return self._rng.choice(kinds)
        return None
