"""The emulator's account, tasks and counters. Task state is computed lazily from a clock.

All mutation happens under one lock: request handlers run on the server's event loop while the
test-side handle (`stats()`, `script_faults()`, ...) calls in from another thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

from hailuo_batch.emulator.config import EmulatorConfig
from hailuo_batch.emulator.contract import (
    MODE_PRO,
    MODEL,
    SubmitRequest,
    fail_marker,
    fail_message,
    flaky_marker,
)
from hailuo_batch.emulator.faults import FaultPlan

State = Literal["pending", "processing", "success", "failed"]
_MICRO = 1_000_000


@dataclass(frozen=True)
class Outcome:
    """How a task ends and when (monotonic clock) that becomes visible."""

    state: Literal["success", "failed"]
    at: float
    fail_code: str | None = None
    fail_msg: str | None = None
    video: Path | None = None


@dataclass
class Task:
    task_id: str
    key_id: str
    request: SubmitRequest
    created_mono: float
    created_wall_ms: int
    start_at: float  # monotonic: pending -> processing
    end_at: float  # monotonic: scheduled end of processing
    cost_ms: int  # nominal, unscaled processing time
    planned_fail: str | None  # failCode decided at submit (markers)
    outcome: Outcome | None = None
    # the record of timings (monotonic): first status read or callback delivery that reported
    # the task ended, and its first result download
    reported_at: float | None = None
    reported_via: Literal["status", "callback"] | None = None
    read_end_at: float | None = None  # the first status read that reported the end
    delivered_at: float | None = None  # the first callback delivery accepted
    downloaded_at: float | None = None

    def state(self, now: float) -> State:
        if now < self.start_at:
            return "pending"
        if self.outcome is None or now < self.outcome.at:
            return "processing"
        return self.outcome.state

    def done_at(self) -> float:
        """When the task is expected to be terminal (best estimate while still working)."""
        return self.outcome.at if self.outcome else self.end_at

    def wall_ms(self, mono: float) -> int:
        return self.created_wall_ms + round((mono - self.created_mono) * 1000)

    def wall_s(self, mono: float | None) -> float | None:
        """A monotonic instant of this task as epoch seconds (None stays None)."""
        if mono is None:
            return None
        return self.created_wall_ms / 1000 + (mono - self.created_mono)

    def timing(self, now: float) -> dict[str, Any]:
        """This task's entry in the record of timings (epoch seconds; None: not yet)."""
        state = self.state(now)
        ended = None
        if self.outcome is not None and state in ("success", "failed"):
            ended = self.outcome.at
        return {
            "task_id": self.task_id,
            "prompt": self.request.prompt,
            "state": state,
            "created": self.wall_s(self.created_mono),
            "started": self.wall_s(self.start_at),
            "ended": self.wall_s(ended),
            "generation_s": None if ended is None else ended - self.created_mono,
            "cost_ms": self.cost_ms,
            "reported": self.wall_s(self.reported_at),
            "reported_via": self.reported_via,
            "notice_lag_s": (
                None if ended is None or self.reported_at is None else self.reported_at - ended
            ),
            "read_end": self.wall_s(self.read_end_at),
            "delivered": self.wall_s(self.delivered_at),
            "downloaded": self.wall_s(self.downloaded_at),
        }


def format_retry_after(seconds: float) -> str:
    """Whole seconds (rounded up) at real speed; a decimal below 1 s when time is scaled."""
    if seconds >= 1:
        return str(math.ceil(seconds))
    return f"{max(seconds, 0.001):.3f}".rstrip("0").rstrip(".")


@dataclass
class Stats:
    submissions: int = 0
    submissions_by_prompt: Counter[str] = field(default_factory=Counter)
    submissions_by_input: Counter[str] = field(default_factory=Counter)
    task_ids: list[str] = field(default_factory=list)
    status_reads: Counter[str] = field(default_factory=Counter)
    status_reads_total: int = 0
    downloads: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    peak_in_flight: int = 0
    callbacks: Counter[str] = field(
        default_factory=lambda: Counter(
            {"delivered": 0, "failed": 0, "lost": 0, "duplicates": 0, "attempts": 0}
        )
    )
    rejected: Counter[str] = field(default_factory=Counter)
    image_fetches: int = 0


class Refused(Exception):
    """A create call refused by the API: `code` goes to the status line and the envelope."""

    def __init__(self, code: int, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class EmulatorState:
    """Account balance, tasks, per-key concurrency, fault plan and statistics."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        seed_rng = random.Random(config.seed)
        self.task_rng = random.Random(seed_rng.getrandbits(64))
        self.callback_rng = random.Random(seed_rng.getrandbits(64))
        self.faults = FaultPlan(
            config.fault_rate,
            random.Random(seed_rng.getrandbits(64)),
            hostile=config.hostile_faults,
        )
        self._secret = secrets.token_bytes(32)
        self.base_url = config.public_base_url or f"http://{config.host}:{config.port}"
        self.balance_micro = round(config.balance_usd * _MICRO)
        self.tasks: dict[str, Task] = {}
        self._in_flight: dict[str, set[str]] = {}
        self._flaky_seen: set[str] = set()
        self.stats_data = Stats()

    @staticmethod
    def now() -> float:
        return time.monotonic()

    # --- account ------------------------------------------------------------------------------
    def price_micro(self, request: SubmitRequest) -> int:
        c = self.config
        if request.mode == MODE_PRO:
            usd = c.price_pro
        else:
            usd = c.price_standard_10s if request.duration == 10 else c.price_standard_6s
        return round(usd * _MICRO)

    def balance_usd(self) -> float:
        with self.lock:
            return self.balance_micro / _MICRO

    def set_balance(self, usd: float) -> None:
        with self.lock:
            self.balance_micro = round(usd * _MICRO)

    # --- tasks --------------------------------------------------------------------------------
    def _prune(self, now: float) -> int:
        """Forget finished tasks in the per-key in-flight sets; return the total in flight."""
        total = 0
        for ids in self._in_flight.values():
            for task_id in [t for t in ids if self.tasks[t].state(now) in ("success", "failed")]:
                ids.discard(task_id)
            total += len(ids)
        return total

    def create_task(self, key_id: str, request: SubmitRequest) -> Task:
        """Admit, bill and schedule a task, or raise Refused (429 concurrency, 402 balance)."""
        c = self.config
        with self.lock:
            now = self.now()
            self._prune(now)
            mine = self._in_flight.setdefault(key_id, set())
            if len(mine) >= c.concurrency:
                self.stats_data.rejected["429"] += 1
                soonest = min(self.tasks[t].done_at() for t in mine) - now
                wait = max(soonest, c.scaled(1.0))
                raise Refused(429, "too many concurrent tasks", format_retry_after(wait))
            price = self.price_micro(request)
            if self.balance_micro < price:
                self.stats_data.rejected["402"] += 1
                raise Refused(402, "insufficient balance")
            self.balance_micro -= price

            planned = fail_marker(request.prompt)
            flaky = flaky_marker(request.prompt)
            if planned is None and flaky is not None and request.input_key not in self._flaky_seen:
                planned = flaky
            self._flaky_seen.add(request.input_key)

            if c.processing_distribution == "lognormal":
                processing = c.processing_s * math.exp(self.task_rng.gauss(0, c.processing_sigma))
            else:
                spread = 1 + self.task_rng.uniform(-c.processing_spread, c.processing_spread)
                processing = c.processing_s * spread
            start = now + c.scaled(c.queue_s)
            task = Task(
                task_id="task_" + secrets.token_hex(16),
                key_id=key_id,
                request=request,
                created_mono=now,
                created_wall_ms=int(time.time() * 1000),
                start_at=start,
                end_at=start + c.scaled(processing),
                cost_ms=round(processing * 1000),
                planned_fail=planned,
            )
            self.tasks[task.task_id] = task
            mine.add(task.task_id)
            s = self.stats_data
            s.submissions += 1
            s.submissions_by_prompt[request.prompt] += 1
            s.submissions_by_input[request.input_key] += 1
            s.task_ids.append(task.task_id)
            s.peak_in_flight = max(s.peak_in_flight, sum(len(v) for v in self._in_flight.values()))
            return task

    def finish(self, task: Task, outcome: Outcome) -> None:
        with self.lock:
            task.outcome = outcome

    def fail_now(self, task: Task, code: str, message: str | None = None) -> None:
        self.finish(task, Outcome("failed", self.now(), code, message or fail_message(code)))

    # --- answers ------------------------------------------------------------------------------
    def sign(self, task_id: str, exp_ms: int) -> str:
        msg = f"{task_id}:{exp_ms}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def verify(self, task_id: str, exp: str, sig: str) -> Literal["ok", "bad", "expired"]:
        if not exp.isdigit() or not hmac.compare_digest(self.sign(task_id, int(exp)), sig):
            return "bad"
        return "ok" if int(exp) > time.time() * 1000 else "expired"

    def result_url(self, task_id: str) -> str:
        """A fresh presigned URL, valid `result_ttl_s` (scaled) from now."""
        exp = int(time.time() * 1000 + self.config.scaled(self.config.result_ttl_s) * 1000)
        query = urlencode({"exp": exp, "sig": self.sign(task_id, exp)})
        return f"{self.base_url}/results/{task_id}/0.mp4?{query}"

    def status_data(self, task: Task) -> dict[str, Any]:
        """The `data` object of a status answer (and of a callback)."""
        now = self.now()
        state = task.state(now)
        data: dict[str, Any] = {
            "taskId": task.task_id,
            "model": MODEL,
            "state": state,
            "createTime": task.created_wall_ms,
        }
        outcome = task.outcome
        if state in ("success", "failed") and outcome is not None:
            data["completeTime"] = task.wall_ms(outcome.at)
            if state == "success":
                data["resultJson"] = json.dumps({"resultUrls": [self.result_url(task.task_id)]})
                data["costTime"] = task.cost_ms
            else:
                data["failCode"] = outcome.fail_code
                data["failMsg"] = outcome.fail_msg
        return data

    def read_status(self, task_id: str) -> dict[str, Any] | None:
        with self.lock:
            self.stats_data.status_reads_total += 1
            task = self.tasks.get(task_id)
            if task is None:
                return None
            self.stats_data.status_reads[task_id] += 1
            data = self.status_data(task)
            if data["state"] in ("success", "failed"):
                self._note_reported(task, "status")
            return data

    def _note_reported(self, task: Task, via: Literal["status", "callback"]) -> None:
        """Record the first answer that told the client the task ended (hold the lock)."""
        now = self.now()
        if task.reported_at is None:
            task.reported_at = now
            task.reported_via = via
        if via == "status" and task.read_end_at is None:
            task.read_end_at = now
        if via == "callback" and task.delivered_at is None:
            task.delivered_at = now

    def note_callback_delivered(self, task: Task) -> None:
        """A callback carrying the task's end was accepted by the receiver."""
        with self.lock:
            self._note_reported(task, "callback")

    def video_for_download(self, task_id: str) -> Path | None:
        with self.lock:
            task = self.tasks.get(task_id)
            now = self.now()
            if task is None or task.state(now) != "success" or task.outcome is None:
                return None
            if task.downloaded_at is None:
                task.downloaded_at = now
            return task.outcome.video

    # --- counters -----------------------------------------------------------------------------
    def count(self, counter: str, key: str, n: int = 1) -> None:
        with self.lock:
            getattr(self.stats_data, counter)[key] += n

    def count_fetch(self) -> None:
        with self.lock:
            self.stats_data.image_fetches += 1

    def reset_stats(self) -> None:
        """Zero every counter (tasks, balance and the flaky memory stay)."""
        with self.lock:
            self.stats_data = Stats()

    def timings(self) -> dict[str, Any]:
        """The record of task timings: per task (in submission order) when it was created,
        started, ended, was first reported ended (`reported`: by a status read or a callback
        delivery, whichever came first; `read_end` and `delivered`: by each) and first
        downloaded, as epoch seconds; `notice_lag_s` = reported - ended."""
        with self.lock:
            now = self.now()
            c = self.config
            return {
                "time_scale": c.time_scale,
                "concurrency": c.concurrency,
                "processing_distribution": c.processing_distribution,
                "processing_s": c.processing_s,
                "processing_sigma": c.processing_sigma,
                "processing_spread": c.processing_spread,
                "queue_s": c.queue_s,
                "rejected_429": self.stats_data.rejected["429"],
                "peak_in_flight": self.stats_data.peak_in_flight,
                "tasks": [t.timing(now) for t in self.tasks.values()],
            }

    def stats(self) -> dict[str, Any]:
        with self.lock:
            now = self.now()
            s = self.stats_data
            in_flight = self._prune(now)
            return {
                "submissions": s.submissions,
                "submissions_by_prompt": dict(s.submissions_by_prompt),
                "submissions_by_input": dict(s.submissions_by_input),
                "tasks": {
                    t: {
                        "prompt": self.tasks[t].request.prompt,
                        "state": self.tasks[t].state(now),
                    }
                    for t in s.task_ids
                },
                "status_reads": dict(s.status_reads),
                "status_reads_total": s.status_reads_total,
                "downloads": dict(s.downloads),
                "faults": dict(s.faults),
                "in_flight": in_flight,
                "peak_in_flight": s.peak_in_flight,
                "balance_usd": self.balance_micro / _MICRO,
                "callbacks": dict(s.callbacks),
                "rejected_429": s.rejected["429"],
                "rejected": dict(s.rejected),
                "image_fetches": s.image_fetches,
                "pending_faults": self.faults.pending(),
            }
