"""Waiting for a task's end: status reads on a learned schedule, or callbacks with a backstop.

No Prefect here: the flow's `poll_item` task calls `watch_task` with the client's status read
and a ticker that says when to read next:

- `LearnedTicker` (async mode): `pacing.LearnedPollPlan` through the run's `StatsBoard`, which
  learns the generation time from the tasks that end (and from earlier runs into the same
  output, kept in `{output}/stats/generation.json`);
- `ScheduleTicker` (callback mode, or learning turned off): a fixed `PollSchedule`; in callback
  mode a delivery wakes it early, and the slow schedule is only the backstop for lost callbacks.

`read_error_end` decides which failed reads end the wait: a pure function, tested alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import anyio

from hailuo_batch.apixo import (
    ApixoError,
    AuthenticationError,
    NotFoundError,
    TaskState,
    TaskStatus,
)
from hailuo_batch.apixo.errors import (
    ClientClosedError,
    NotAnEnvelopeError,
    UnexpectedResponseError,
)
from hailuo_batch.callbacks import CallbackWaiter
from hailuo_batch.pacing import (
    GenerationStats,
    LearnedPollPlan,
    StatsBoard,
    generation_seconds,
)
from hailuo_batch.policy import PollSchedule
from hailuo_batch.steps import POLL_TIMEOUT, TASK_NOT_FOUND, TaskLost
from hailuo_batch.storage import OutputStore

#: where a run keeps the generation times it observed, for the next run into the same output
STATS_KEY = "stats/generation.json"

Clock = Callable[[], float]


@dataclass
class PollResult:
    """A terminal status, or the error that ended the reads (`steps.on_poll_error` maps it)."""

    status: TaskStatus | None
    reads: int
    error: Exception | None = None


def read_error_end(
    exc: Exception, since_first_read_s: float, not_found_grace_s: float, scrub: Callable[[str], str]
) -> Exception | None:
    """The error that ends the wait for a failed status read, or None to read again later.

    - 401, or a client the stopping run closed: ends it (no other read will work);
    - 404: read again within `not_found_grace_s` of the first read (a new task may not be
      visible yet), then the task is lost (TASK_NOT_FOUND);
    - a page that is not an apixo answer (a proxy's error page): likely transient, read again;
    - a malformed or foreign answer: ends it (the item fails; its ledger keeps the taskId);
    - any other API error (already retried by the client): read again at the next tick.
    """
    if isinstance(exc, AuthenticationError | ClientClosedError):  # no other read will work
        return exc
    if isinstance(exc, NotFoundError):
        if since_first_read_s < not_found_grace_s:
            return None
        return TaskLost(TASK_NOT_FOUND, scrub(str(exc)))
    if isinstance(exc, NotAnEnvelopeError):
        return None
    if isinstance(exc, UnexpectedResponseError):
        return exc
    if isinstance(exc, ApixoError):
        return None
    raise exc


class Ticker(Protocol):
    """When to read a task's status next."""

    @property
    def timeout_s(self) -> float:
        """How long the ticker waits in all before giving up (for the timeout message)."""
        ...

    async def next_read(self) -> bool | None:
        """Wait until the next read is due: None to give up, else whether a callback woke it."""
        ...

    def unconfirmed(self) -> None:
        """A callback woke the item but the status read did not confirm it."""

    def ended(self, status: TaskStatus) -> None:
        """The task ended with `status`."""

    def close(self) -> None:
        """The item stopped waiting."""


class LearnedTicker:
    """Reads planned by the run's `StatsBoard` (learned generation times), from `started`
    (the clock just before the POST was sent). `immediate`: a task already under way (a
    resumed item) is read at once."""

    def __init__(self, board: StatsBoard, *, started: float | None, immediate: bool) -> None:
        self.board = board
        self.pacer = board.pacer(started=started, immediate=immediate)

    @property
    def timeout_s(self) -> float:
        return self.board.plan.give_up_s(self.board.stats)

    async def next_read(self) -> bool | None:
        return False if await self.pacer.next_read() else None

    def unconfirmed(self) -> None:  # no callbacks in this mode
        pass

    def ended(self, status: TaskStatus) -> None:
        if status.state == TaskState.SUCCESS:
            self.board.observe(
                generation_seconds(status.create_time, status.complete_time, status.cost_time_ms)
            )

    def close(self) -> None:
        self.pacer.close()


#: a task that ended this long before a backstop read found it, with no delivery, lost its
#: callback (a delivery normally follows the end within seconds)
CALLBACK_LATE_S = 30.0


class ScheduleTicker:
    """Reads on a fixed `PollSchedule`. With a `waiter` (callback mode) a delivery for
    `task_id` wakes it early; after an unconfirmed callback it drops the waiter and reads on
    `fallback` for the time that is left. With a `board`, each success's generation time is
    learned, as `LearnedTicker` does, and the wait lasts as long as the board's give-up time,
    which grows while this run learns that generations take longer."""

    def __init__(
        self,
        schedule: PollSchedule,
        *,
        task_id: str = "",
        waiter: CallbackWaiter | None = None,
        fallback: PollSchedule | None = None,
        board: StatsBoard | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.schedule = schedule
        self.task_id = task_id
        self.waiter = waiter
        self.board = board
        self.fallback = fallback or schedule
        self.clock = clock
        self.started = clock()
        self._delays: Iterator[float] = schedule.delays()
        self._reading_on = schedule  # what later reads follow: the fallback once unconfirmed
        self._wake = waiter.waiting(task_id) if waiter is not None else None
        self._woken = False  # the last read was woken by a delivery
        self._waited = False  # the last read came after a wait (not a resumed task's first)

    @property
    def timeout_s(self) -> float:
        if self.board is None:
            return self.schedule.timeout_s
        return max(self.schedule.timeout_s, self.board.plan.give_up_s(self.board.stats))

    async def next_read(self) -> bool | None:
        delay = next(self._delays, None)
        if delay is None:  # the schedule is over; the give-up time may have grown since
            left = self.timeout_s - (self.clock() - self.started)
            if left <= 0:
                return None
            more = self._reading_on
            self._delays = dataclasses.replace(
                more, initial_s=min(more.interval_s, left), timeout_s=left
            ).delays()
            delay = next(self._delays, None)
            if delay is None:
                return None
        if self._wake is None:
            await asyncio.sleep(delay)
            return False
        self._waited = delay > 0
        with anyio.move_on_after(delay):
            await self._wake.wait()
        woken = self._woken = self._wake.is_set()
        self._wake.clear()
        return woken

    def unconfirmed(self) -> None:
        # a forged or early callback: the genuine one may now be dropped as a duplicate
        self.close()
        self._wake = None
        remaining = self.timeout_s - (self.clock() - self.started)
        self._reading_on = self.fallback
        self._delays = dataclasses.replace(self.fallback, timeout_s=max(0.0, remaining)).delays()

    def ended(self, status: TaskStatus) -> None:
        """The task ended: a success's generation time goes to the board (however the read
        was woken). A backstop read (not a delivery) that finds the task ended well before it:
        its callback is missing, and the waiter says so (`CallbackWaiter.missing`)."""
        if self.board is not None and status.state == TaskState.SUCCESS:
            self.board.observe(
                generation_seconds(status.create_time, status.complete_time, status.cost_time_ms)
            )
        if self.waiter is None or self._wake is None or self._woken or not self._waited:
            return
        if status.complete_time is not None:
            ago = time.time() - status.complete_time / 1000
            if ago > CALLBACK_LATE_S:
                self.waiter.missing(self.task_id, ago)

    def close(self) -> None:
        if self.waiter is not None:
            self.waiter.forget(self.task_id)


def callback_schedules(
    guidance: PollSchedule, backstop_s: float, *, immediate: bool, timeout_s: float | None = None
) -> tuple[PollSchedule, PollSchedule]:
    """Callback mode's backstop schedule (a slow poll for lost callbacks) and the schedule an
    item falls back to after an unconfirmed callback (the guidance's interval from the start).
    Both give up after `timeout_s` (default: the guidance's): the learned give-up time, so a
    slow day's tasks are waited for as long in callback mode as when polling."""
    if timeout_s is not None:
        guidance = dataclasses.replace(guidance, timeout_s=timeout_s)
    backstop = dataclasses.replace(
        guidance,
        initial_s=0.0 if immediate else max(guidance.initial_s, backstop_s),
        interval_s=backstop_s,
        max_interval_s=backstop_s,
        backoff=1.0,
    )
    return backstop, dataclasses.replace(guidance, initial_s=guidance.interval_s)


def ticker_for(
    task_id: str,
    board: StatsBoard,
    waiter: CallbackWaiter | None,
    backstop_s: float,
    sent_at: float | None,
    immediate: bool,
) -> Ticker:
    """When to read `task_id`'s status: learned from the generation times on `board` (counted
    from `sent_at`, the POST), or with a `waiter` (callback mode) on a delivery, with a slow
    poll every `backstop_s` as backstop. `immediate`: a resumed task, read at once."""
    if waiter is None:
        return LearnedTicker(board, started=sent_at, immediate=immediate)
    backstop, fallback = callback_schedules(
        board.plan.guidance, backstop_s, immediate=immediate,
        timeout_s=board.plan.give_up_s(board.stats),
    )  # fmt: skip
    return ScheduleTicker(backstop, task_id=task_id, waiter=waiter, fallback=fallback, board=board)


def learned_plan(guidance: PollSchedule) -> LearnedPollPlan:
    """The learned plan under the provider's guidance, in its units: the first probe at 1/30 of
    the guidance's first wait (2 s of 60 s) and reads at most every 1/60 of its interval
    (0.25 s of 15 s), so a scaled-down setup (tests, the benchmark) scales them too."""
    return LearnedPollPlan(
        guidance=guidance,
        probe_first_s=max(1e-3, guidance.initial_s / 30),
        min_interval_s=max(1e-3, guidance.interval_s / 60),
    )


def load_stats(store: OutputStore) -> bytes | None:
    """The generation times earlier runs into this output saw (None: none, or unreadable)."""
    try:
        return store.read_bytes(STATS_KEY) if store.exists(STATS_KEY) else None
    except OSError:
        return None


def save_stats(store: OutputStore, stats: GenerationStats, warn: Callable[[str], None]) -> None:
    """Keep the generation times for the next run into this output (best effort)."""
    try:
        store.write_text_atomic(STATS_KEY, stats.to_json())
    except OSError as exc:
        warn(f"generation times not saved: {exc}")


def stats_board(earlier: str | bytes | None, guidance: PollSchedule) -> StatsBoard:
    """A run's board: generation times from the earlier runs' stats file (if any, else none)."""
    return StatsBoard(GenerationStats.from_json(earlier), learned_plan(guidance))


async def watch_task(
    task_id: str,
    read: Callable[[str], Awaitable[TaskStatus]],
    ticker: Ticker,
    *,
    not_found_grace_s: float,
    warn: Callable[[str], None],
    scrub: Callable[[str], str] = str,
    clock: Clock = time.monotonic,
) -> PollResult:
    """Read `task_id`'s status when `ticker` says so until it ends, an error ends the wait
    (`read_error_end`) or the ticker gives up (POLL_TIMEOUT)."""
    reads = 0
    first_read: float | None = None
    try:
        while (woken := await ticker.next_read()) is not None:
            reads += 1
            first_read = clock() if first_read is None else first_read
            try:
                # a callback is never trusted: a status read confirms it (and gives a fresh URL)
                status = await read(task_id)
            except Exception as exc:  # noqa: BLE001 - read_error_end re-raises what is not ours
                end = read_error_end(exc, clock() - first_read, not_found_grace_s, scrub)
                if end is not None:
                    return PollResult(None, reads, end)
                warn(scrub(f"status read for {task_id} failed, reading again later: {exc}"))
                if woken:  # the callback's news must not wait for the slow backstop
                    ticker.unconfirmed()
                continue
            if status.is_terminal:
                ticker.ended(status)
                return PollResult(status, reads)
            if woken:
                warn(f"task {task_id}: callback not confirmed (state {status.state}); polling it")
                ticker.unconfirmed()
    finally:
        ticker.close()
    timeout = TaskLost(POLL_TIMEOUT, f"no final state after {ticker.timeout_s:.0f} s")
    return PollResult(None, reads, timeout)
