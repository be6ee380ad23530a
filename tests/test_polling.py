"""polling: which failed reads end the wait, the tickers, and the wait loop as a property."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hailuo_batch.apixo import (
    ApixoError,
    AuthenticationError,
    NotFoundError,
    TaskState,
    TaskStatus,
)
from hailuo_batch.apixo.errors import (
    ApixoTransportError,
    MalformedAnswerError,
    NotAnEnvelopeError,
    ServerError,
    UnexpectedResponseError,
)
from hailuo_batch.callbacks import CallbackStore, CallbackWaiter
from hailuo_batch.pacing import GenerationStats, StatsBoard
from hailuo_batch.policy import PollSchedule
from hailuo_batch.polling import (
    LearnedTicker,
    ScheduleTicker,
    callback_schedules,
    learned_plan,
    load_stats,
    read_error_end,
    save_stats,
    stats_board,
    ticker_for,
    watch_task,
)
from hailuo_batch.steps import POLL_TIMEOUT, TASK_NOT_FOUND, TaskLost
from hailuo_batch.storage import OutputStore

FAST = PollSchedule(initial_s=0.0, interval_s=0.001, backoff=1.0, max_interval_s=0.001, timeout_s=5)


def status(state: TaskState, task_id: str = "t1", **kw: object) -> TaskStatus:
    urls = ["https://cdn.example/v.mp4"] if state == TaskState.SUCCESS else []
    return TaskStatus(task_id=task_id, state=state, result_urls=urls, **kw)  # type: ignore[arg-type]


class Script:
    """A status read answering from a list: a TaskStatus is returned, an exception raised."""

    def __init__(self, answers: list[TaskStatus | Exception]) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self, task_id: str) -> TaskStatus:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else status(TaskState.PROCESSING)
        if isinstance(answer, Exception):
            raise answer
        return answer


class Ticks:
    """A ticker giving `n` reads at once, then giving up."""

    timeout_s = 600.0

    def __init__(self, n: int) -> None:
        self.left = n
        self.closed = False
        self.ended_with: TaskStatus | None = None

    async def next_read(self) -> bool | None:
        if self.left <= 0:
            return None
        self.left -= 1
        return False

    def unconfirmed(self) -> None:
        pass

    def ended(self, status: TaskStatus) -> None:
        self.ended_with = status

    def close(self) -> None:
        self.closed = True


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


# --- read_error_end: a pure decision ---------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "since", "ends_with"),
    [
        (AuthenticationError("bad key", 401), 0.0, AuthenticationError),
        (NotFoundError("no such task", 404), 1.0, None),  # within the grace: not visible yet
        (NotFoundError("no such task", 404), 60.0, TaskLost),  # past it: lost
        (NotAnEnvelopeError("a proxy's page"), 0.0, None),
        (MalformedAnswerError("no state"), 0.0, MalformedAnswerError),
        (UnexpectedResponseError("foreign"), 0.0, UnexpectedResponseError),
        (ServerError("500", 500), 0.0, None),
        (ApixoTransportError("reset"), 0.0, None),
    ],
)
def test_read_error_end_decides_which_failed_reads_end_the_wait(
    exc: Exception, since: float, ends_with: type | None
) -> None:
    end = read_error_end(exc, since, not_found_grace_s=30.0, scrub=str)
    if ends_with is None:
        assert end is None
    else:
        assert isinstance(end, ends_with)
    if isinstance(end, TaskLost):
        assert end.code == TASK_NOT_FOUND


def test_read_error_end_scrubs_the_lost_tasks_message_and_reraises_bugs() -> None:
    end = read_error_end(
        NotFoundError("gone sk-SECRET", 404), 99, 1.0, scrub=lambda t: t.replace("sk-SECRET", "*")
    )
    assert isinstance(end, TaskLost) and "sk-SECRET" not in str(end)
    with pytest.raises(KeyError):
        read_error_end(KeyError("a bug"), 0.0, 1.0, str)


# --- the wait loop ---------------------------------------------------------------------------


def test_watch_task_reads_until_the_task_ends_and_tells_the_ticker() -> None:
    read = Script(
        [status(TaskState.PENDING), status(TaskState.PROCESSING), status(TaskState.SUCCESS)]
    )
    ticks = Ticks(10)
    result = run(watch_task("t1", read, ticks, not_found_grace_s=30, warn=lambda m: None))
    assert result.status is not None and result.status.state == TaskState.SUCCESS
    assert (result.reads, read.calls) == (3, 3)
    assert ticks.ended_with is result.status and ticks.closed


def test_watch_task_gives_up_with_poll_timeout_when_the_ticker_does() -> None:
    ticks = Ticks(4)
    result = run(watch_task("t1", Script([]), ticks, not_found_grace_s=30, warn=lambda m: None))
    assert result.status is None and result.reads == 4
    assert isinstance(result.error, TaskLost) and result.error.code == POLL_TIMEOUT
    assert "600 s" in str(result.error) and ticks.closed


def test_watch_task_keeps_reading_through_transient_errors_and_says_so() -> None:
    warnings: list[str] = []
    read = Script(
        [ServerError("busy", 503), NotAnEnvelopeError("<html>"), status(TaskState.FAILED)]
    )
    result = run(watch_task("t1", read, Ticks(10), not_found_grace_s=30, warn=warnings.append))
    assert result.status is not None and result.status.state == TaskState.FAILED
    assert len(warnings) == 2 and all("t1" in w for w in warnings)


OUTCOMES = st.one_of(
    st.sampled_from(
        [
            status(TaskState.PENDING),
            status(TaskState.PROCESSING),
            status(TaskState.SUCCESS),
            status(TaskState.FAILED, fail_code="GENERATION_FAILED"),
        ]
    ),
    st.sampled_from(
        [
            AuthenticationError("401", 401),
            NotFoundError("404", 404),
            NotAnEnvelopeError("<html>"),
            MalformedAnswerError("bad"),
            ServerError("500", 500),
            ApixoTransportError("reset"),
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(answers=st.lists(OUTCOMES, max_size=12), ticks=st.integers(0, 15), grace=st.booleans())
def test_watch_task_property_every_sequence_ends_in_one_known_way(
    answers: list[TaskStatus | Exception], ticks: int, grace: bool
) -> None:
    """For any sequence of answers: never raises, reads at most what the ticker allows, stops
    at the first terminal status or ending error, and returns exactly one of them."""
    read = Script(answers)
    t = Ticks(ticks)
    result = run(
        watch_task("t1", read, t, not_found_grace_s=1e9 if grace else 0.0, warn=lambda m: None)
    )
    assert result.reads == read.calls <= ticks and t.closed
    seen = answers[: result.reads]
    for earlier in seen[:-1]:  # nothing before the last read ended the wait
        assert not (isinstance(earlier, TaskStatus) and earlier.is_terminal)
        assert (
            read_error_end(earlier, 0.0 if grace else 1.0, 1e9 if grace else 0.0, str) is None
            if isinstance(earlier, ApixoError)
            else True
        )
    if result.status is not None:
        assert result.error is None and result.status.is_terminal
        assert seen and seen[-1] is result.status
    else:
        assert isinstance(result.error, AuthenticationError | TaskLost | UnexpectedResponseError)
        if isinstance(result.error, TaskLost) and result.error.code == POLL_TIMEOUT:
            assert result.reads == ticks


# --- tickers ---------------------------------------------------------------------------------


def test_schedule_ticker_follows_its_schedule_then_gives_up() -> None:
    async def ticks() -> list[bool | None]:
        ticker = ScheduleTicker(
            PollSchedule(
                initial_s=0.0, interval_s=0.01, backoff=1.0, max_interval_s=0.01, timeout_s=0.035
            )
        )
        return [await ticker.next_read() for _ in range(6)]

    got = run(ticks())
    assert got == [False] * 5 + [None]  # 0, .01, .02, .03, and a last read at the timeout


def test_a_callback_wakes_the_waiting_item_early_even_if_delivered_before_it_waited(
    tmp_path: Path,
) -> None:
    store = CallbackStore(str(tmp_path / "cb"))
    waiter = CallbackWaiter(store, check_s=0.01)
    slow = PollSchedule(
        initial_s=30.0, interval_s=30.0, backoff=1.0, max_interval_s=30.0, timeout_s=600
    )

    async def scenario() -> tuple[bool | None, bool | None]:
        early = ScheduleTicker(slow, task_id="early", waiter=waiter)
        waiter.seen({"early": status(TaskState.SUCCESS, "early")})
        late_waiter = ScheduleTicker(slow, task_id="late", waiter=waiter)
        waiter.seen({"late": status(TaskState.PROCESSING, "late")})  # not terminal: no wake
        first = await asyncio.wait_for(early.next_read(), 1.0)
        second: bool | None = None
        try:
            second = await asyncio.wait_for(late_waiter.next_read(), 0.1)
        except TimeoutError:
            second = None
        early.close()
        late_waiter.close()
        return first, second

    first, second = run(scenario())
    assert first is True and second is None
    # a delivery seen before the item waits still wakes it
    waiter.seen({"t9": status(TaskState.FAILED, "t9", fail_code="X")})
    assert waiter.waiting("t9").is_set()


def test_an_unconfirmed_callback_drops_the_waiter_and_polls_on_the_fallback() -> None:
    store_less = CallbackWaiter(CallbackStore("memory://polling-test"), check_s=1.0)
    backstop, fallback = callback_schedules(FAST, backstop_s=30.0, immediate=False)
    assert backstop.initial_s == 30.0 and backstop.interval_s == 30.0
    assert callback_schedules(FAST, 30.0, immediate=True)[0].initial_s == 0.0
    warnings: list[str] = []

    async def scenario() -> tuple[int, bool]:
        ticker = ScheduleTicker(backstop, task_id="t1", waiter=store_less, fallback=fallback)
        store_less.seen({"t1": status(TaskState.SUCCESS)})  # a forged callback
        read = Script(
            [status(TaskState.PROCESSING), status(TaskState.PROCESSING), status(TaskState.SUCCESS)]
        )
        result = await asyncio.wait_for(
            watch_task("t1", read, ticker, not_found_grace_s=30, warn=warnings.append), 2.0
        )
        return result.reads, "t1" in store_less._events

    reads, still_waiting = run(scenario())
    assert reads == 3 and not still_waiting
    assert any("not confirmed" in w for w in warnings)


def test_a_callback_whose_confirming_read_fails_is_read_again_soon_not_at_the_backstop() -> None:
    waiter = CallbackWaiter(CallbackStore("memory://polling-test-2"), check_s=1.0)
    backstop, fallback = callback_schedules(FAST, backstop_s=30.0, immediate=False)
    warnings: list[str] = []

    async def scenario() -> tuple[int, TaskState | None]:
        ticker = ScheduleTicker(backstop, task_id="t1", waiter=waiter, fallback=fallback)
        waiter.seen({"t1": status(TaskState.SUCCESS)})
        read = Script([ServerError("502", 502), status(TaskState.SUCCESS)])
        result = await asyncio.wait_for(  # the backstop would read again after 30 s
            watch_task("t1", read, ticker, not_found_grace_s=30, warn=warnings.append), 2.0
        )
        return result.reads, result.status.state if result.status else None

    assert run(scenario()) == (2, TaskState.SUCCESS)
    assert any("failed, reading again" in w for w in warnings)


def test_waiter_checks_the_store_and_survives_an_unreadable_one(tmp_path: Path) -> None:
    store = CallbackStore(str(tmp_path / "cb"))
    body = {"code": 200, "data": {"taskId": "t1", "state": "success", "createTime": 1,
            "resultJson": '{"resultUrls": ["https://r/t1.mp4"]}'}}  # fmt: skip
    store.record("t1", body)
    waiter = CallbackWaiter(store, check_s=0.01)
    event = waiter.waiting("t1")
    run(waiter.check())
    assert event.is_set()

    def broken(*a: object) -> None:
        raise RuntimeError("store down (an error type that is not an OSError)")

    warned: list[str] = []
    sick = CallbackWaiter(store, check_s=0.01, warn=warned.append)
    sick.store.poll_new = broken  # type: ignore[method-assign,assignment]
    sick.waiting("t2")  # a check reads the store only for tasks an item waits for
    run(sick.check())
    assert warned and "store down" in warned[0]
    run(sick.check())  # the same outage, every check_s for the whole run: said once
    assert len(warned) == 1
    sick.store.poll_new = lambda *a: {}  # type: ignore[method-assign,assignment]
    run(sick.check())
    sick.store.poll_new = broken  # type: ignore[method-assign,assignment]
    run(sick.check())  # a new outage is said again
    assert len(warned) == 2


# --- learning --------------------------------------------------------------------------------


def test_learned_plan_scales_its_probes_with_the_guidance() -> None:
    real = learned_plan(PollSchedule())
    assert real.probe_first_s == 2.0 and real.min_interval_s == 0.25
    fast = learned_plan(PollSchedule(initial_s=3.0, interval_s=0.75, timeout_s=30))  # x0.05
    assert fast.probe_first_s == pytest.approx(0.1) and fast.min_interval_s == pytest.approx(0.0125)


def test_a_learned_ticker_records_successful_generation_times_and_frees_its_probe() -> None:
    async def scenario() -> tuple[int, int, int]:
        board = stats_board(None, PollSchedule(initial_s=0.01, interval_s=0.01, timeout_s=5))
        ticker = LearnedTicker(board, started=None, immediate=False)
        probes = board.probes_active
        read = Script([status(TaskState.PROCESSING), status(TaskState.SUCCESS, cost_time_ms=1500)])
        await watch_task("t1", read, ticker, not_found_grace_s=30, warn=lambda m: None)
        return probes, board.probes_active, board.stats.count

    probes, after, count = run(scenario())
    assert (probes, after, count) == (1, 0, 1)


def test_a_learned_ticker_reads_first_near_the_learned_low_quantile() -> None:
    """With 200 earlier times of ~1 s, an item's first read waits until ~0.9 s, not the
    guidance's 0.3 s, and the timeout grows past the guidance for slow providers."""
    earlier = GenerationStats([1.0 + 0.001 * i for i in range(200)]).to_json()

    async def first_read_after() -> float:
        board = stats_board(earlier, PollSchedule(initial_s=0.3, interval_s=0.1, timeout_s=0.5))
        ticker = LearnedTicker(board, started=None, immediate=False)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await ticker.next_read()
        ticker.close()
        assert ticker.timeout_s >= 3.0  # giveup_factor x p99
        return loop.time() - t0

    assert 0.85 < run(first_read_after()) < 1.5


def test_stats_board_starts_from_an_unreadable_stats_file_as_new() -> None:
    for junk in (None, b"", b"{not json", b'{"format": 99}', '{"format":1,"samples":[-1,"x"]}'):
        board = stats_board(junk, PollSchedule())
        assert isinstance(board, StatsBoard) and board.stats.count == 0


def test_generation_times_carry_over_to_the_next_run_into_the_same_output(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "out"))
    assert load_stats(store) is None  # a first run starts with none
    warnings: list[str] = []
    save_stats(store, GenerationStats([30.0, 40.0]), warnings.append)
    assert warnings == []
    assert GenerationStats.from_json(load_stats(store)).samples == [30.0, 40.0]


def test_an_unwritable_output_loses_the_stats_with_a_warning_not_the_run(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "out"))
    (tmp_path / "out" / "stats").write_text("a file where the stats folder goes")
    warnings: list[str] = []
    save_stats(store, GenerationStats([30.0]), warnings.append)
    assert load_stats(store) is None
    assert len(warnings) == 1 and warnings[0].startswith("generation times not saved")


def test_the_ticker_is_learned_unless_callbacks_wake_the_item(tmp_path: Path) -> None:
    board = stats_board(None, FAST)
    assert isinstance(
        ticker_for("t1", board, None, 30.0, sent_at=None, immediate=False), LearnedTicker
    )
    waiter = CallbackWaiter(CallbackStore(str(tmp_path / "cb")), 0.01)
    ticker = ticker_for("t1", board, waiter, 30.0, sent_at=None, immediate=True)
    assert isinstance(ticker, ScheduleTicker)
    assert ticker.timeout_s == FAST.timeout_s  # the provider's guidance still bounds the wait


def test_callback_mode_waits_as_long_as_polling_for_a_slow_days_tasks(tmp_path: Path) -> None:
    """Earlier runs saw generations of 380-500 s, near the guidance's 600 s give-up: a polling
    item waits up to 3x their p99, and so must an item waiting for its callback (it gave up at
    600 s, failing paid tasks whose success was on its way)."""
    earlier = GenerationStats([380.0 + 0.6 * i for i in range(200)]).to_json()
    board = stats_board(earlier, PollSchedule())
    waiter = CallbackWaiter(CallbackStore(str(tmp_path / "cb")), 0.01)
    polled = ticker_for("t1", board, None, 120.0, sent_at=None, immediate=False)
    woken = ticker_for("t2", board, waiter, 120.0, sent_at=None, immediate=False)
    assert polled.timeout_s > 1000.0
    assert woken.timeout_s == polled.timeout_s
    assert sum(woken.schedule.delays()) == pytest.approx(polled.timeout_s)  # type: ignore[attr-defined]
    polled.close()
    woken.close()


def test_an_item_waiting_for_its_callback_waits_longer_as_the_run_learns_slow_generations() -> None:
    """On a new output nothing is known at first; tasks that turn out to take ~10x the
    guidance's give-up time are waited for as long as the polling items wait, by the items that
    were already waiting when it was learned too."""
    now = [0.0]
    schedule = PollSchedule(
        initial_s=0.001, interval_s=0.001, backoff=1.0, max_interval_s=0.001, timeout_s=0.003
    )

    async def reads_until_given_up(learn: bool) -> tuple[int, float]:
        board = stats_board(None, schedule)
        ticker = ScheduleTicker(schedule, board=board, clock=lambda: now[0])
        now[0], reads = 0.0, 0
        if learn:  # while the item waits, other items' successes say generations take ~0.01
            for i in range(200):
                board.observe(0.01 + 1e-5 * i)
        while await ticker.next_read() is not None:
            reads += 1
            now[0] += 0.001
        assert ticker.timeout_s == board.plan.give_up_s(board.stats)
        return reads, ticker.timeout_s

    assert run(reads_until_given_up(learn=False)) == (3, 0.003)  # the guidance's give-up
    reads, give_up = run(reads_until_given_up(learn=True))
    assert give_up >= 0.03  # at least 3x the learned p99
    assert give_up / 0.001 - 1 <= reads <= give_up / 0.001 + 5  # read on until then


def test_callback_mode_learns_generation_times_for_the_next_run(tmp_path: Path) -> None:
    board = stats_board(None, FAST)
    waiter = CallbackWaiter(CallbackStore(str(tmp_path / "cb")), 0.01)

    async def scenario() -> None:
        ticker = ticker_for("t1", board, waiter, 0.01, sent_at=None, immediate=True)
        read = Script([status(TaskState.SUCCESS, create_time=1_000, complete_time=43_000)])
        await watch_task("t1", read, ticker, not_found_grace_s=30, warn=lambda m: None)

    run(scenario())
    assert board.stats.samples == [42.0]


def test_a_task_the_backstop_finds_long_ended_says_its_callback_is_missing() -> None:
    """Callbacks that never arrive (a wrong URL or token, a receiver down) only slow the run
    down: the first backstop read that finds a task ended long before, with no delivery, says
    what to check, once per run. A task woken by its delivery, found soon after its end, or
    read at once on resume says nothing."""
    import time as clock

    warnings: list[str] = []
    waiter = CallbackWaiter(CallbackStore("memory://missing-cb"), check_s=1.0, warn=warnings.append)
    quick = PollSchedule(
        initial_s=0.01, interval_s=0.01, backoff=1.0, max_interval_s=0.01, timeout_s=5
    )
    long_ago = int((clock.time() - 300) * 1000)
    just_now = int(clock.time() * 1000)

    async def one(task_id: str, done_at: int, *, wake: bool = False, schedule=quick) -> None:
        ticker = ScheduleTicker(schedule, task_id=task_id, waiter=waiter)
        if wake:
            waiter.seen({task_id: status(TaskState.SUCCESS, task_id)})
        read = Script([status(TaskState.SUCCESS, task_id, complete_time=done_at)])
        await asyncio.wait_for(
            watch_task(task_id, read, ticker, not_found_grace_s=30, warn=warnings.append), 2.0
        )

    resumed = dataclasses.replace(quick, initial_s=0.0)
    run(one("woken", long_ago, wake=True))
    run(one("soon", just_now))
    run(one("resumed", long_ago, schedule=resumed))
    assert warnings == [] and waiter.missed == 0
    run(one("lost-1", long_ago))
    run(one("lost-2", long_ago))
    assert waiter.missed == 2 and len(warnings) == 1
    assert "task lost-1 ended 300 s ago and no callback arrived" in warnings[0]
    assert "HAILUO_CALLBACK_URL" in warnings[0]
