"""Money and data invariants of an item's life, as properties over random provider behaviour.

A simulated provider answers every POST, status read and download from a script that
hypothesis draws (successes, every failCode class, 401/402/403/429/5xx refusals, ambiguous
POSTs that did or did not create a task, lost tasks, malformed answers, non-video bytes), the
ledger fails writes at random, and runs are killed at random points and resumed by a new run
that plans each item from the ledger, as `hailuo-batch run` does. After every sequence:

- an item is POSTed while an earlier task of it may still be alive only when some run
  reported it uncertain (no silent duplicate charge);
- no run's reserved spend ever passes its cap, and the tasks it created fit under the cap;
- every call returns exactly one outcome; a succeeded item's video is one the provider made
  for its last task and was verified.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

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
    TaskState,
    TaskStatus,
)
from hailuo_batch.apixo.errors import (
    ApixoTransportError,
    RateLimitedError,
    ServerError,
    UnexpectedResponseError,
)
from hailuo_batch.budget import Budget
from hailuo_batch.ledger import LedgerRecord, LedgerState, LedgerUnavailable, plan_item
from hailuo_batch.lifecycle import LifePolicy, live_item
from hailuo_batch.results import ItemStatus
from hailuo_batch.steps import TaskLost
from hailuo_batch.storage import StoredObject

UNIT = 0.19
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
    ledger: dict[str, LedgerRecord] = field(default_factory=dict)
    stored: dict[str, str] = field(default_factory=dict)  # key -> task id of the verified video
    calls: itertools.count = field(default_factory=itertools.count)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))

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
                if not self.flagged:
                    self.w.unflagged_duplicates.append(f"{self.item} in {self.run}")
        self.w.posts.setdefault(self.item, []).append(task_id)
        errors: dict[str, Exception] = {
            "429": RateLimitedError("slow down", retry_after=0.0),
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
        task = self.w.tasks[task_id]
        if task.outcome == "lost":
            task.failed = True  # the provider forgot it: it will never be delivered
            raise TaskLost("TASK_NOT_FOUND", "gone")
        if task.outcome == "poll_401":
            raise AuthenticationError("key revoked")
        if task.outcome == "malformed":
            raise UnexpectedResponseError("costTime is a dict")
        if task.outcome == "success":
            return TaskStatus(
                task_id=task_id, state=TaskState.SUCCESS, result_urls=[f"https://cdn/{task_id}"]
            )
        task.failed = True
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


async def one_run(
    world: World, items: list[str], run: str, cap: float | None, resubmit_lost: bool
) -> tuple[dict[str, tuple[ItemStatus, bool]], Budget, list[str]]:
    """A run over every item, items one after another; stops at a kill."""
    budget = Budget(cap_usd=cap)
    created: list[str] = []
    fates: dict[str, tuple[ItemStatus, bool]] = {}
    for item in items:
        rec = world.ledger.get(item)
        plan = plan_item(rec, "h" * 64, resubmit_lost=resubmit_lost)
        if plan.action in ("done", "cached", "hold"):
            fates[item] = (ItemStatus.SUCCEEDED, plan.uncertain)  # untouched by this run
            continue
        start = (
            rec
            if plan.action == "poll" and rec is not None
            else LedgerRecord(
                id=item,
                input_hash="h" * 64,
                state=LedgerState.UNCERTAIN if plan.uncertain else LedgerState.NOT_SUBMITTED,
                attempts=plan.attempts,
            )
        )
        fx = Effects(world, item, run, created, flagged=plan.uncertain)
        out = await live_item(
            start,
            REQUEST,
            unit_cost=UNIT,
            budget=budget,
            fx=fx,
            policy=LifePolicy(max_resubmits=2, rate_limit_patience_s=5.0),
            resumed=plan.action == "poll",
        )
        fates[item] = (out.status, plan.uncertain or out.uncertain)
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
    # only a run that planned (and so reports) the item as uncertain may make one
    assert world.unflagged_duplicates == []


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


def test_a_ledger_that_cannot_record_the_submission_stops_the_post() -> None:
    world = World([], [], [], [True], set())
    fates, budget, created = asyncio.run(one_run(world, ["a"], "run0", None, False))
    assert fates["a"][0] == ItemStatus.NOT_SUBMITTED
    assert created == [] and budget.spent_usd == 0


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
