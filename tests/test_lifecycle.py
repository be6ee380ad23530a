"""Money and data invariants of an item's life, as properties over random provider behaviour.

A simulated provider answers every POST, status read and download from a script that
hypothesis draws (successes, every failCode class, 401/402/403/429/5xx refusals, ambiguous
POSTs that did or did not create a task, lost tasks, malformed answers, non-video bytes), the
ledger fails writes at random, and runs are killed at random points and resumed by a new run
that plans each item from the ledger, as `hailuo-batch run` does. After every sequence:

- an item is POSTed while an earlier task of it may still be alive only by a run that reports
  it uncertain, or after a run reported that task as a possible charge (a transient
  resubmission after an uncertain resubmission): no silent duplicate charge;
- an item's tasks are at most one, plus one per failed task read (the transient resubmissions),
  plus one per run that planned it uncertain: the soak's accounting;
- no run's reserved spend ever passes its cap, and the tasks it created fit under the cap;
- every call returns exactly one outcome; a succeeded item's video is one the provider made
  for its last task and was verified.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    AuthenticationError,
    ForbiddenError,
    GenerateInput,
    GenerateRequest,
    InsufficientCreditsError,
    InvalidRequestError,
    Mode,
    Provider,
    TaskState,
    TaskStatus,
)
from hailuo_batch.apixo.errors import (
    ApixoTransportError,
    RateLimitedError,
    ServerError,
    UnexpectedResponseError,
)
from hailuo_batch.budget import Budget, Stop
from hailuo_batch.ledger import (
    TERMINAL,
    LedgerRecord,
    LedgerState,
    LedgerUnavailable,
    Plan,
    plan_item,
)
from hailuo_batch.lifecycle import LifePolicy, Outcome, live_item
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.outcomes import start_record
from hailuo_batch.pacing import RefusalWatch
from hailuo_batch.results import ItemStatus
from hailuo_batch.steps import TaskLost
from hailuo_batch.storage import StoredObject

UNIT = 0.19
MAX_RESUBMITS = 2
PATIENCE = 5.0  # seconds of 429 refusals an item waits out before it gives up
REQUEST = GenerateRequest(
    input=GenerateInput(
        mode="standard-image-to-video",  # type: ignore[arg-type]
        prompt="p",
        image_urls=["https://example.com/a.jpg"],
        duration=6,
    )
)

SUBMIT = st.sampled_from(
    [
        "accept",
        "accept",
        "accept",
        "429",
        "401",
        "402",
        "400",
        "403",
        "503",
        "not_sent",
        "ambiguous_created",
        "ambiguous_not_created",
    ]
)
FINAL = st.sampled_from(
    [
        "success",
        "success",
        "success",
        "GENERATION_FAILED",
        "NSFW",
        "INVALID_PROMPT",
        "INSUFFICIENT_CREDITS",
        "lost",
        "poll_401",
        "malformed",
        "flip",  # reads success, then GENERATION_FAILED ever after
    ]
)
DOWNLOAD = st.sampled_from(["video", "video", "html", "cut"])


class Killed(BaseException):
    """A SIGKILL: nothing after it runs, no handler sees it."""


@dataclass
class Task:
    item: str
    outcome: str  # a FINAL value
    failed: bool = False  # known to the provider as failed (or never created)
    reads: int = 0


@dataclass
class World:
    """The provider, the ledger and the store of one simulated output."""

    submit_script: list[str]
    final_script: list[str]
    download_script: list[str]
    ledger_faults: list[bool]
    kill_at: set[int]
    tasks: dict[str, Task] = field(default_factory=dict)
    posts: dict[str, list[str | None]] = field(default_factory=dict)  # item -> task per POST
    duplicates: dict[str, int] = field(default_factory=dict)
    unflagged_duplicates: list[str] = field(default_factory=list)
    # item -> its tasks a run has reported as possible charges (it planned the item uncertain)
    reported: dict[str, set[str]] = field(default_factory=dict)
    ledger: dict[str, LedgerRecord] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)  # key -> task id of the verified video
    calls: itertools.count = field(default_factory=itertools.count)
    now: float = 0.0  # the run's clock: only waits after a 429 move it
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    poll_faults: list[bool] = field(default_factory=list)  # True: one untrustworthy status read
    failed_reads: dict[str, set[str]] = field(default_factory=dict)  # item -> tasks read failed
    # what each run planned for each item (with the record's state then) and how it ended
    plans: list[tuple[str, str, Plan, LedgerState | None]] = field(default_factory=list)
    ends: list[tuple[str, str, ItemStatus, str | None]] = field(default_factory=list)

    def _next(self, script: list[str], default: str) -> str:
        return script.pop(0) if script else default

    def tick(self) -> None:
        """Every effect is a point where the process may be killed."""
        if next(self.calls) in self.kill_at:
            raise Killed


class Effects:
    def __init__(
        self, world: World, item: str, run: str, created: list[str], flagged: bool = False
    ) -> None:
        self.w, self.item, self.run, self.created = world, item, run, created
        self.flagged = flagged  # this run planned the item as uncertain (and reports it)
        if flagged:  # its result names every earlier task of the item as a possible charge
            posts = world.posts.get(item, [])
            world.reported.setdefault(item, set()).update(t for t in posts if t)

    async def save(self, rec: LedgerRecord) -> LedgerRecord:
        self.w.tick()
        if self.w.ledger_faults and self.w.ledger_faults.pop(0):
            raise LedgerUnavailable("store unreachable")
        rec = rec.model_copy(update={"run_id": self.run})
        self.w.ledger[self.item] = rec
        return rec

    async def still_ours(self, expected: LedgerRecord | None) -> str | None:
        self.w.tick()
        return None

    async def submit(self, request: GenerateRequest) -> str:
        self.w.tick()
        what = self.w._next(self.w.submit_script, "accept")
        alive = [t for t in self.w.posts.get(self.item, []) if t and not self.w.tasks[t].failed]
        task_id = None
        if what in ("accept", "ambiguous_created"):
            task_id = f"task_{next(self.w.ids)}"
            outcome = self.w._next(self.w.final_script, "success")
            self.w.tasks[task_id] = Task(self.item, outcome)
            self.created.append(task_id)
            if alive:
                self.w.duplicates[self.item] = self.w.duplicates.get(self.item, 0) + 1
                unreported = set(alive) - self.w.reported.get(self.item, set())
                if unreported and not self.flagged:
                    self.w.unflagged_duplicates.append(f"{self.item} in {self.run}")
        self.w.posts.setdefault(self.item, []).append(task_id)
        errors: dict[str, Exception] = {
            "429": RateLimitedError("slow down", retry_after=0.0),
            "429_hour": RateLimitedError("come back in an hour", retry_after=3600.0),
            "401": AuthenticationError("bad key"),
            "402": InsufficientCreditsError("top up"),
            "400": InvalidRequestError("Invalid mode type"),
            "403": ForbiddenError("refused"),
            "503": ServerError("unavailable", 503),
            "not_sent": ApixoTransportError("connection refused", request_sent=False),
            "ambiguous_created": AmbiguousSubmitError("read timeout"),
            "ambiguous_not_created": AmbiguousSubmitError("read timeout"),
        }
        if what in errors:
            raise errors[what]
        assert task_id is not None
        return task_id

    async def poll(self, task_id: str, *, immediate: bool) -> TaskStatus:
        self.w.tick()
        if self.w.poll_faults and self.w.poll_faults.pop(0):
            raise UnexpectedResponseError("a proxy's page instead of the status")
        task = self.w.tasks[task_id]
        if task.outcome == "lost":
            task.failed = True  # the provider forgot it: it will never be delivered
            raise TaskLost("TASK_NOT_FOUND", "gone")
        if task.outcome == "poll_401":
            raise AuthenticationError("key revoked")
        if task.outcome == "malformed":
            raise UnexpectedResponseError("costTime is a dict")
        task.reads += 1
        if task.outcome == "flip" and task.reads > 1:
            # a paid task that succeeded: its later failure is no transient failure the item
            # may be resubmitted for (not counted in `failed_reads`), unless the ledger never
            # learned of the success (a failed write that the run which saw it reported)
            task.failed = True
            known = self.w.ledger.get(self.item)
            if known is None or (
                known.state not in (LedgerState.SUCCEEDED, LedgerState.STORED)
                and known.fail_code != "FAILED_AFTER_SUCCESS"
            ):
                self.w.failed_reads.setdefault(self.item, set()).add(task_id)
            return TaskStatus(
                task_id=task_id, state=TaskState.FAILED, fail_code="GENERATION_FAILED"
            )
        if task.outcome in ("success", "flip"):
            return TaskStatus(
                task_id=task_id, state=TaskState.SUCCESS, result_urls=[f"https://cdn/{task_id}"]
            )
        task.failed = True
        self.w.failed_reads.setdefault(self.item, set()).add(task_id)
        return TaskStatus(task_id=task_id, state=TaskState.FAILED, fail_code=task.outcome)

    async def store(self, url: str, key: str, *, sweep: bool) -> StoredObject:
        self.w.tick()
        body = self.w._next(self.w.download_script, "video")
        if body != "video":  # the real store verifies before publishing: nothing lands
            raise ValueError(f"not an MP4 ({body})")
        self.w.stored[key] = url.rsplit("/", 1)[-1]
        return StoredObject(url=key, size=1, sha256="x")

    async def choose_key(self, rec: LedgerRecord) -> str:
        return f"videos/{rec.id}.mp4"

    async def rate_limited(self, wait_s: float) -> None:
        self.w.tick()
        self.w.now += min(max(wait_s, 1.0), 300.0)  # the limiter's floor and cap on a cooldown


def manifest_item(item: str) -> ManifestItem:
    return ManifestItem(
        id=item, row=1, image_url="https://example.com/a.jpg", prompt="p",
        mode=Mode.STANDARD, duration=6, provider=Provider.AUTO,
    )  # fmt: skip


def live_new(fx: Effects, **kw: Any) -> Outcome:
    """One life of `fx`'s item from a first submission, as a run without a record starts it."""
    return asyncio.run(
        live_item(
            start_record(manifest_item(fx.item), None, Plan("submit")), REQUEST, unit_cost=UNIT,
            budget=Budget(), fx=fx, **{"policy": LifePolicy(max_resubmits=MAX_RESUBMITS), **kw},
        )
    )  # fmt: skip


async def one_run(
    world: World,
    items: list[str],
    run: str,
    cap: float | None,
    resubmit_lost: bool,
    *,
    force: bool = False,
) -> tuple[dict[str, tuple[ItemStatus, bool]], Budget, list[str]]:
    """A run over every item, items one after another; stops at a kill. `force`: a rerun."""
    budget = Budget(cap_usd=cap)
    refusals = RefusalWatch()  # one per run, as the flow's
    created: list[str] = []
    fates: dict[str, tuple[ItemStatus, bool]] = {}
    for item in items:
        m = manifest_item(item)
        rec = world.ledger.get(item)
        plan = plan_item(rec, m.input_hash, force=force, resubmit_lost=resubmit_lost)
        world.plans.append((run, item, plan, rec.state if rec is not None else None))
        if plan.action in ("done", "cached", "hold"):
            fates[item] = (ItemStatus.SUCCEEDED, plan.uncertain)  # untouched by this run
            continue
        fx = Effects(world, item, run, created, flagged=plan.uncertain)
        out = await live_item(
            start_record(m, rec, plan),  # where the flow starts an item's life
            REQUEST,
            unit_cost=UNIT,
            budget=budget,
            fx=fx,
            policy=LifePolicy(max_resubmits=MAX_RESUBMITS, rate_limit_patience_s=PATIENCE),
            resumed=plan.action == "poll",
            clock=lambda: world.now,
            refusals=refusals,
        )
        fates[item] = (out.status, plan.uncertain or out.uncertain)
        world.ends.append((run, item, out.status, out.fail_code))
        assert budget.cap_usd is None or budget.spent_usd <= budget.cap_usd + 1e-9
        if out.status == ItemStatus.SUCCEEDED:
            assert out.stored is not None
            # the stored video came from the item's last task, verified by the store
            assert world.stored[out.stored.url] == out.rec.task_id
    return fates, budget, created


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    n_items=st.integers(1, 4),
    submit_script=st.lists(SUBMIT, max_size=30),
    final_script=st.lists(FINAL, max_size=30),
    download_script=st.lists(DOWNLOAD, max_size=10),
    ledger_faults=st.lists(st.booleans(), max_size=40),
    kill_at=st.sets(st.integers(0, 60), max_size=3),
    cap=st.one_of(st.none(), st.floats(0.0, 2.0)),
    resubmit_lost=st.booleans(),
)
def test_money_and_data_invariants_hold_under_any_provider_and_faults(
    n_items: int,
    submit_script: list[str],
    final_script: list[str],
    download_script: list[str],
    ledger_faults: list[bool],
    kill_at: set[int],
    cap: float | None,
    resubmit_lost: bool,
) -> None:
    world = World(submit_script, final_script, download_script, ledger_faults, kill_at)
    items = [f"i{k}" for k in range(n_items)]
    for run in range(4):  # a first run and up to three resumes after kills
        try:
            fates, budget, created = asyncio.run(
                one_run(world, items, f"run{run}", cap, resubmit_lost)
            )
        except Killed:
            # a kill between a POST and its `submitted` record is what `submitting` is for:
            # the next run plans such an item as uncertain and reports it
            continue
        # spend never past the cap, counted from what the provider really created
        if cap is not None:
            assert len(created) * UNIT <= cap + 1e-9
            assert budget.spent_usd <= cap + 1e-9
        assert set(fates) == set(items)  # one fate per item
    # a POST while an earlier task of the item may be alive is a possible duplicate charge:
    # only a run that planned (and so reports) the item as uncertain may make one, or any run
    # once such a report named that task
    assert world.unflagged_duplicates == []
    # the soak's accounting: one POST, its transient resubmissions, one per uncertain run
    for item in items:
        tasks = sum(1 for t in world.posts.get(item, []) if t is not None)
        uncertain_runs = {run for run, i, plan, _ in world.plans if i == item and plan.uncertain}
        failed_reads = len(world.failed_reads.get(item, ()))
        assert tasks <= 1 + failed_reads + len(uncertain_runs), (item, world.posts)


def test_a_kill_between_post_and_record_is_reported_uncertain_by_the_next_run() -> None:
    # POST is the 3rd effect of the first item (save submitting=0, still_ours=1... order:
    # still_ours, save(submitting), submit, save(submitted)) -> kill at the 4th call
    world = World([], [], [], [], kill_at={3})
    try:
        asyncio.run(one_run(world, ["a"], "run0", None, False))
    except Killed:
        pass
    assert world.ledger["a"].state == LedgerState.SUBMITTING
    assert len(world.posts["a"]) == 1
    fates, _, _ = asyncio.run(one_run(world, ["a"], "run1", None, False))
    assert fates["a"] == (ItemStatus.SUCCEEDED, True)
    assert world.duplicates.get("a", 0) == 1 and world.unflagged_duplicates == []


def test_a_possible_double_charge_is_reported_by_every_later_run() -> None:
    """Run 0 is killed right after its POST (billed, no taskId recorded); run 1 resubmits it,
    reporting it uncertain, and is killed while polling, before any result is written; run 2
    only polls. Run 2 must still say the item may have been paid for twice, and so must a
    run after it: no run's report can be the only one that ever said so."""
    world = World([], [], [], [], kill_at={3, 8})
    for run in ("run0", "run1"):
        try:
            asyncio.run(one_run(world, ["a"], run, None, False))
        except Killed:
            pass
    assert len([t for t in world.posts["a"] if t]) == 2  # billed twice
    assert world.ledger["a"].possible_duplicate
    for run in ("run2", "run3"):
        fates, _, created = asyncio.run(one_run(world, ["a"], run, None, False))
        assert fates["a"] == (ItemStatus.SUCCEEDED, True) and created == [], run


def test_a_refused_resubmission_keeps_the_earlier_possible_charge_on_record() -> None:
    # run0 is killed right after its POST was accepted (ledger: submitting); run1 resubmits
    # it as uncertain and is refused (401); run2 must still know the first task may exist
    world = World(["accept", "401"], [], [], [], kill_at={3})
    try:
        asyncio.run(one_run(world, ["a"], "run0", None, False))
    except Killed:
        pass
    fates, _, _ = asyncio.run(one_run(world, ["a"], "run1", None, False))
    assert fates["a"] == (ItemStatus.NOT_SUBMITTED, True)
    assert world.ledger["a"].state == LedgerState.UNCERTAIN
    fates, _, _ = asyncio.run(one_run(world, ["a"], "run2", None, False))
    assert fates["a"] == (ItemStatus.SUCCEEDED, True)
    assert world.unflagged_duplicates == []


def test_rate_limited_items_are_never_dropped() -> None:
    world = World(["429"] * 5, [], [], [], set())
    fates, budget, created = asyncio.run(one_run(world, ["a"], "run0", None, False))
    assert fates["a"][0] == ItemStatus.SUCCEEDED
    assert len(created) == 1 and budget.spent_usd == UNIT


@pytest.mark.parametrize("retry_after", ["429", "429_hour"])
def test_rate_limit_patience_counts_the_time_waited(retry_after: str) -> None:
    """Refusals without end give up after the patience in time actually waited, whatever
    Retry-After said: 0 s (it would never end) or an hour (it would end at the first)."""
    world = World([retry_after] * 1000, [], [], [], set())
    fates, budget, created = asyncio.run(one_run(world, ["a"], "run0", None, False))
    assert fates["a"][0] == ItemStatus.NOT_SUBMITTED
    assert world.ends[-1][3] == "RATE_LIMITED" and created == [] and budget.spent_usd == 0
    posts = len(world.posts["a"])
    assert 1 < posts < 1000 and world.now >= PATIENCE


def test_a_provider_that_refuses_everything_for_the_patience_stops_the_run_once() -> None:
    """Every POST refused with 429 for the whole patience: the run stops submitting (its state
    says RateLimited), and the items after it end not submitted without a POST each waiting out
    a patience of its own (1,000 items took ~1,000 patiences)."""
    world = World(["429"] * 10_000, [], [], [], set())
    fates, budget, created = asyncio.run(one_run(world, ["a", "b", "c"], "run0", None, False))
    assert [fates[i][0] for i in "abc"] == [ItemStatus.NOT_SUBMITTED] * 3
    assert budget.stopped is not None and budget.stopped[0] == Stop.RATE_LIMITED
    assert "HAILUO_RATE_LIMIT_PATIENCE_S" in budget.stopped[1]
    assert world.posts["a"] and not world.posts.get("b") and not world.posts.get("c")
    assert created == [] and budget.spent_usd == 0


def test_an_old_refusal_never_counts_against_a_later_one() -> None:
    """Item a met a 429, then its retry was refused with 403 (it ended failed); a patience
    later item b meets one 429: b waits for its slot and is accepted, the run goes on."""
    world = World(["429", "403", "429", "accept"], [], [], [], set())
    budget, refusals = Budget(), RefusalWatch()

    async def life(item: str) -> Outcome:
        return await live_item(
            start_record(manifest_item(item), None, Plan("submit")), REQUEST, unit_cost=UNIT,
            budget=budget, fx=Effects(world, item, "run0", []), clock=lambda: world.now,
            policy=LifePolicy(max_resubmits=MAX_RESUBMITS, rate_limit_patience_s=PATIENCE),
            refusals=refusals,
        )  # fmt: skip

    assert asyncio.run(life("a")).fail_code == "HTTP_403"
    world.now += 2 * PATIENCE
    b = asyncio.run(life("b"))
    assert b.status == ItemStatus.SUCCEEDED, (b.fail_code, b.fail_msg)
    assert budget.stopped is None and refusals.since is None and refusals.waiting == 0


def test_refusals_between_accepted_posts_never_stop_the_run() -> None:
    world = World((["429"] * 3 + ["accept"]) * 4, [], [], [], set())
    fates, budget, created = asyncio.run(one_run(world, list("abcd"), "run0", None, False))
    assert [fates[i][0] for i in "abcd"] == [ItemStatus.SUCCEEDED] * 4
    assert budget.stopped is None and len(created) == 4


def test_an_items_own_patience_holds_on_a_clock_that_starts_at_zero() -> None:
    """Without the run's watch: the item's first 429 at t=0.0 was taken for none at all, and
    it was refused for ever."""
    world = World(["429"] * 1000, [], [], [], set())
    assert world.now == 0.0
    out = live_new(
        Effects(world, "a", "run0", []),
        policy=LifePolicy(max_resubmits=MAX_RESUBMITS, rate_limit_patience_s=PATIENCE),
        clock=lambda: world.now,
    )
    assert out.fail_code == "RATE_LIMITED" and len(world.posts["a"]) < 20


def test_one_long_retry_after_does_not_drop_the_item() -> None:
    world = World(["429_hour"], [], [], [], set())
    fates, _, created = asyncio.run(one_run(world, ["a"], "run0", None, False))
    assert fates["a"][0] == ItemStatus.SUCCEEDED and len(created) == 1


def test_a_ledger_that_cannot_record_the_submission_stops_the_post() -> None:
    world = World([], [], [], [True], set())
    fates, budget, created = asyncio.run(one_run(world, ["a"], "run0", None, False))
    assert fates["a"][0] == ItemStatus.NOT_SUBMITTED
    assert created == [] and budget.spent_usd == 0


def test_a_task_that_succeeded_is_not_paid_for_again_when_it_later_reads_failed() -> None:
    """Run 0 sees the task succeed but cannot store the video; run 1 reads it failed. It is
    kept as lost (no second POST); only `--resubmit-lost` pays for a new task."""
    world = World([], ["flip"], ["html"], [], set())
    fates, _, _ = asyncio.run(one_run(world, ["a"], "run0", None, False))
    assert fates["a"][0] == ItemStatus.FAILED and world.ends[-1][3] == "DOWNLOAD_FAILED"
    for run in ("run1", "run2"):
        fates, _, created = asyncio.run(one_run(world, ["a"], run, None, False))
        assert fates["a"][0] == ItemStatus.FAILED and created == []
        assert world.ends[-1][3] == "FAILED_AFTER_SUCCESS"
        assert world.ledger["a"].state == LedgerState.LOST
    fates, _, created = asyncio.run(one_run(world, ["a"], "run3", None, True))
    assert fates["a"] == (ItemStatus.SUCCEEDED, True) and len(created) == 1


def test_the_429_patience_starts_again_after_an_accepted_post() -> None:
    """A 429, then the POST is accepted, its task runs a minute and fails transiently, and the
    resubmission meets a 429: that is a new wait, not a minute of refusals."""

    class Slow(Effects):
        async def poll(self, task_id: str, *, immediate: bool) -> TaskStatus:
            self.w.now += 60.0  # the generation takes a minute
            return await super().poll(task_id, immediate=immediate)

    world = World(["429", "accept", "429", "accept"], ["GENERATION_FAILED"], [], [], set())
    out = live_new(
        Slow(world, "a", "run0", []),
        policy=LifePolicy(max_resubmits=MAX_RESUBMITS, rate_limit_patience_s=PATIENCE),
        clock=lambda: world.now,
    )
    assert out.status == ItemStatus.SUCCEEDED, (out.status, out.fail_code, out.fail_msg)
    assert len([t for t in world.posts["a"] if t]) == 2


def test_a_stored_task_read_again_and_found_failed_is_not_paid_for_again() -> None:
    """A stored video found missing or damaged: the run reads the task again for a fresh URL.
    If the provider now says it failed, the task still succeeded once: no new POST."""
    world = World([], [], [], [], set())
    world.tasks["task_9"] = Task("a", "flip", reads=1)  # its success was read before
    rec = LedgerRecord(
        id="a", input_hash=manifest_item("a").input_hash, state=LedgerState.STORED,
        task_id="task_9", task_ids=["task_9"], attempts=1, video="videos/a.mp4",
    )  # fmt: skip
    out = asyncio.run(
        live_item(
            rec, REQUEST, unit_cost=UNIT, budget=Budget(), fx=Effects(world, "a", "run1", []),
            policy=LifePolicy(max_resubmits=MAX_RESUBMITS), resumed=True,
        )
    )  # fmt: skip
    assert (out.status, out.fail_code) == (ItemStatus.FAILED, "FAILED_AFTER_SUCCESS")
    assert world.posts.get("a") is None


def test_a_store_that_cannot_be_read_after_the_task_succeeded_keeps_the_paid_task() -> None:
    """Choosing the video's key lists the store; an outage there, after the POST, used to
    escape as an internal error with no task in the result. The item now fails with its task
    kept, and the next run stores the video without paying."""

    class Down(Effects):
        async def choose_key(self, rec: LedgerRecord) -> str:
            raise OSError("the output store is unreachable")

    world = World([], [], [], [], set())
    out = live_new(Down(world, "a", "run0", []))
    assert (out.status, out.fail_code) == (ItemStatus.FAILED, "DOWNLOAD_FAILED")
    assert out.rec.task_id is not None and out.run_posts == 1
    assert world.ledger["a"].state == LedgerState.SUBMITTED
    fates, _, created = asyncio.run(one_run(world, ["a"], "run1", None, False))
    assert fates["a"][0] == ItemStatus.SUCCEEDED and created == []


def test_a_ledger_that_refuses_every_write_after_the_post_is_said_in_the_outcome() -> None:
    world = World([], [], [], [False] + [True] * 20, set())
    out = live_new(Effects(world, "a", "run0", []))
    assert out.status == ItemStatus.SUCCEEDED and out.ledger_behind
    assert world.ledger["a"].state == LedgerState.SUBMITTING  # what the next run will find
    ok = live_new(Effects(World([], [], [], [], set()), "b", "run0", []))
    assert not ok.ledger_behind


def test_a_run_that_lost_its_claim_does_not_post() -> None:
    world = World([], [], [], [], set())

    class Lost(Effects):
        async def still_ours(self, expected: LedgerRecord | None) -> str | None:
            return "claimed by run9"

    async def go() -> ItemStatus:
        out = await live_item(
            LedgerRecord(id="a", input_hash="h", state=LedgerState.NOT_SUBMITTED),
            REQUEST,
            unit_cost=UNIT,
            budget=(b := Budget()),
            fx=Lost(world, "a", "r", []),
            policy=LifePolicy(),
        )
        assert b.spent_usd == 0
        return out.status

    assert asyncio.run(go()) == ItemStatus.NOT_SUBMITTED
    assert world.posts == {}


# --- the transient resubmission budget -------------------------------------------------------
# The provider fails the first tasks of an item that really run (`[flaky:CODE]` in the
# emulator); POSTs of unknown outcome and kills come before. Those POSTs are reported uncertain
# by their runs; they must not use up the resubmissions the first failed task is owed.

SOAK_SUBMIT = st.sampled_from(
    ["accept", "accept", "accept", "429", "503", "not_sent", "ambiguous_created",
     "ambiguous_not_created"]
)  # fmt: skip


def _kill_tolerant_run(world: World, run: str, *, force: bool = False) -> None:
    try:
        asyncio.run(one_run(world, ["a"], run, None, False, force=force))
    except Killed:
        pass


def _faults_off(world: World) -> None:
    for script in (world.submit_script, world.download_script, world.poll_faults):
        script.clear()
    world.ledger_faults.clear()
    world.kill_at.clear()


def _created(world: World) -> int:
    return sum(1 for t in world.posts.get("a", []) if t is not None)


def test_posts_of_unknown_outcome_do_not_use_up_the_resubmission_a_failure_is_owed() -> None:
    # the soak's flake: run0 is killed while its POST waits (nothing reached the provider: the
    # record says `submitting`), run1's POST is dropped before the provider took it
    # (`uncertain`); the first task that runs, in run2, fails transiently. 2 POSTs were made
    # before it, but no resubmission: it is resubmitted and the item succeeds.
    world = World(["ambiguous_not_created"], ["GENERATION_FAILED"], [], [], kill_at={2})
    _kill_tolerant_run(world, "run0")
    assert (world.ledger["a"].state, world.posts) == (LedgerState.SUBMITTING, {})
    fates, _, _ = asyncio.run(one_run(world, ["a"], "run1", None, False))
    assert fates["a"] == (ItemStatus.UNCERTAIN, True)
    fates, _, _ = asyncio.run(one_run(world, ["a"], "run2", None, False))
    assert fates["a"] == (ItemStatus.SUCCEEDED, True)
    rec = world.ledger["a"]
    assert (rec.attempts, rec.resubmits) == (4, 1)  # every POST is still counted as paid
    assert _created(world) == 2 and world.unflagged_duplicates == []


def _used_up(world: World) -> LedgerRecord:
    """An item whose last task failed transiently after both resubmissions were used."""
    fates, _, _ = asyncio.run(one_run(world, ["a"], "run0", None, False))
    assert fates["a"][0] == ItemStatus.FAILED and _created(world) == 1 + MAX_RESUBMITS
    return world.ledger["a"]


def test_a_resume_never_widens_the_budget_but_a_rerun_gives_it_again() -> None:
    world = World([], ["GENERATION_FAILED"] * 4, [], [], set())
    rec = _used_up(world)
    assert (rec.state, rec.resubmits, rec.fail_code) == (
        LedgerState.FAILED, MAX_RESUBMITS, "GENERATION_FAILED",
    )  # fmt: skip
    fates, _, _ = asyncio.run(one_run(world, ["a"], "run1", None, False))
    assert fates["a"][0] == ItemStatus.SUCCEEDED and _created(world) == 3  # cached: no POST
    # the user reruns it: one POST (their decision), whose transient failure is resubmitted
    fates, _, _ = asyncio.run(one_run(world, ["a"], "rerun", None, False, force=True))
    assert fates["a"][0] == ItemStatus.SUCCEEDED
    assert _created(world) == 5 and world.ledger["a"].resubmits == 1


def test_a_rerun_of_an_item_whose_failure_was_never_recorded_resubmits_it() -> None:
    # the record still says `submitted` with the failed task (its last write was lost in a
    # store outage) and the budget is used up: a resume reads the failure and ends the item
    # failed; a rerun, which the user asked for, resubmits it
    world = World([], ["GENERATION_FAILED"] * 3, [], [], set())
    rec = _used_up(world)
    world.ledger["a"] = rec.model_copy(update={"state": LedgerState.SUBMITTED})
    fates, _, _ = asyncio.run(one_run(world, ["a"], "run1", None, False))
    assert fates["a"][0] == ItemStatus.FAILED and _created(world) == 3
    world.ledger["a"] = rec.model_copy(update={"state": LedgerState.SUBMITTED})
    fates, _, _ = asyncio.run(one_run(world, ["a"], "rerun", None, False, force=True))
    assert fates["a"][0] == ItemStatus.SUCCEEDED and _created(world) == 4


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    failures=st.integers(0, 2 * MAX_RESUBMITS + 2),
    submit_script=st.lists(SOAK_SUBMIT, max_size=16),
    poll_faults=st.lists(st.booleans(), max_size=12),
    download_script=st.lists(DOWNLOAD, max_size=6),
    ledger_faults=st.lists(st.booleans(), max_size=30),
    kill_at=st.sets(st.integers(0, 40), max_size=3),
    runs=st.integers(1, 4),
)
def test_transient_failures_get_their_resubmissions_whatever_came_before(
    failures: int,
    submit_script: list[str],
    poll_faults: list[bool],
    download_script: list[str],
    ledger_faults: list[bool],
    kill_at: set[int],
    runs: int,
) -> None:
    """Runs and resumes under the soak's faults (429, 503, POSTs not sent or of unknown
    outcome, untrustworthy status reads, bad downloads, ledger outages, kills); the provider
    fails the first `failures` tasks that run. Then the faults stop and the user reruns it."""
    world = World(submit_script, ["GENERATION_FAILED"] * failures, download_script,
                  ledger_faults, kill_at, poll_faults=poll_faults)  # fmt: skip
    for run in range(runs):
        _kill_tolerant_run(world, f"run{run}")
    resumed_posts = _created(world)
    # the provider failing no more tasks than the budget, no run gives the item up for it
    if failures <= MAX_RESUBMITS:
        assert not [e for e in world.ends if e[3] == "GENERATION_FAILED"], world.ends
    # a resume never widens the budget: one POST, its resubmissions, one per uncertain run
    uncertain_runs = len({run for run, _, plan, _ in world.plans if plan.uncertain})
    assert resumed_posts <= 1 + MAX_RESUBMITS + uncertain_runs

    _faults_off(world)
    before = world.ledger.get("a")
    owed = len(world.final_script)  # failures the provider has still to give
    _kill_tolerant_run(world, "rerun", force=True)
    rerun_posts = _created(world) - resumed_posts
    rerun_plan = world.plans[-1][2]
    if rerun_plan.action == "poll" and before is not None and before.task_id is not None:
        owed += world.tasks[before.task_id].outcome == "GENERATION_FAILED"  # the task it reads
    rerun_end = [e for e in world.ends if e[0] == "rerun"]
    if before is not None and before.state == LedgerState.STORED:
        assert rerun_posts == 0  # a rerun never pays again for a stored video
    elif owed <= MAX_RESUBMITS:
        assert rerun_end[0][2] == ItemStatus.SUCCEEDED, (before, rerun_end)
    else:
        assert rerun_end[0][2:] == (ItemStatus.FAILED, "GENERATION_FAILED")
    # the rerun pays for one POST, the user's decision (none when it polls a known task), and
    # at most the whole budget of resubmissions again; nothing silent
    paid_again = 0 if rerun_plan.action == "poll" else 1
    assert rerun_posts <= paid_again + MAX_RESUBMITS
    assert before is None or before.state not in TERMINAL or rerun_plan.action == "submit"
