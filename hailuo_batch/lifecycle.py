"""One item's life in a run: submit, poll, store, with every decision taken by `steps`.

`live_item` is the loop; it does no I/O itself. Its effects (ledger writes, the POST, the
status reads, the download) come from an `ItemEffects` object: the flow passes one built on
Prefect tasks, the tests one built on an in-memory provider with injected faults. So the
logic that decides what gets paid for runs the same in both.

Invariants it keeps (tested as properties in tests/test_lifecycle.py):
- a POST happens only after the reservation, the claim check and a durable `submitting`
  record; so an item is POSTed at most once, plus its transient resubmissions (at most
  `max_resubmits` since its last forced run, counted in `LedgerRecord.resubmits`), plus once per
  run that reports it uncertain;
- the budget's spend never passes its cap;
- it returns exactly one `Outcome` per call, whatever the provider answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hailuo_batch.apixo import GenerateRequest, TaskStatus
from hailuo_batch.budget import Budget, Stop
from hailuo_batch.ledger import LedgerRecord, LedgerState, LedgerUnavailable
from hailuo_batch.pacing import RefusalWatch
from hailuo_batch.results import ItemStatus
from hailuo_batch.settings import FailClass
from hailuo_batch.steps import (
    CLAIM_LOST,
    COST_CAP,
    FAILED_AFTER_SUCCESS,
    LEDGER_UNAVAILABLE,
    NOT_SUBMITTED_STOP,
    RATE_LIMITED,
    Step,
    on_poll_error,
    on_store_error,
    on_submit_error,
    on_task_final,
    result_identity,
)
from hailuo_batch.storage import StoredObject
from hailuo_batch.video import paid_for_facts


class ItemEffects(Protocol):
    """The side effects of one item's life. Every method may be slow; none decides anything."""

    async def save(self, rec: LedgerRecord) -> LedgerRecord:
        """Write the ledger record durably; raise `LedgerUnavailable` when the store is down."""

    async def still_ours(self, expected: LedgerRecord | None) -> str | None:
        """Right before a POST: None if this run still owns the item, else why not."""

    async def submit(self, request: GenerateRequest) -> str:
        """POST the task; return its taskId or raise an `ApixoError`."""

    async def poll(self, task_id: str, *, immediate: bool) -> TaskStatus:
        """Read until the task ends; raise `TaskLost`, `AuthenticationError` or a malformed-
        answer error otherwise."""

    async def store(self, url: str, key: str, *, sweep: bool) -> StoredObject:
        """Download `url` into `key`, verified; raise if the bytes are not a video."""

    async def choose_key(self, rec: LedgerRecord) -> str:
        """The store key for this record's video (never another paid video's key)."""

    async def rate_limited(self, wait_s: float) -> None:
        """Wait after a 429 before this item tries to submit again."""


@dataclass(frozen=True)
class LifePolicy:
    """The settings that the steps need."""

    failcode_overrides: dict[str, FailClass] = field(default_factory=dict)
    max_resubmits: int = 2
    rate_limit_patience_s: float = 1800.0  # after this long refused by 429s, give up loudly


@dataclass
class Outcome:
    """An item's fate in this run, and what its result line needs."""

    status: ItemStatus
    rec: LedgerRecord
    fail_code: str | None = None
    fail_msg: str | None = None
    uncertain: bool = False
    run_posts: int = 0  # POSTs this run made that may have cost money (refunded ones excluded)
    cost_time_ms: int | None = None
    stored: StoredObject | None = None
    notes: list[str] = field(default_factory=list)
    ledger_behind: bool = False  # its last ledger write failed: the next run may not know it


async def live_item(
    rec: LedgerRecord,
    request: GenerateRequest,
    *,
    unit_cost: float,
    budget: Budget,
    fx: ItemEffects,
    policy: LifePolicy,
    resumed: bool = False,
    sweep: bool = False,
    clock: Callable[[], float] = time.monotonic,
    refusals: RefusalWatch | None = None,
) -> Outcome:
    """Drive one item from `rec` (its ledger record as planned) to the end of its life here.

    A plan that resubmits an item of unknown outcome passes `rec.state == UNCERTAIN`; that
    state is kept in the ledger until a POST is accepted, so a refusal in between never hides
    the earlier possible charge from the next run. `refusals`: the run's (`RefusalWatch`),
    which stops the run when every POST was refused for the patience; without it only the
    item gives up.
    """
    life = _Life(rec, request, unit_cost, budget, fx, policy, sweep, clock, refusals)
    out = await life.run(resumed)
    if life.stale and await life.save():  # one more try, so a resumed run knows the task
        life.notes.append("ledger caught up")
    out.rec, out.ledger_behind = life.rec, life.stale
    return out


class _Life:
    """The state of one `live_item` call."""

    def __init__(
        self,
        rec: LedgerRecord,
        request: GenerateRequest,
        unit_cost: float,
        budget: Budget,
        fx: ItemEffects,
        policy: LifePolicy,
        sweep: bool,
        clock: Callable[[], float],
        refusals: RefusalWatch | None,
    ) -> None:
        self.rec, self.request, self.unit = rec, request, unit_cost
        self.budget, self.fx, self.policy, self.sweep = budget, fx, policy, sweep
        self.clock, self.refusals = clock, refusals
        self.run_posts = 0
        self.refused_since: float | None = None  # the first 429 since the last accepted POST
        self.notes: list[str] = []
        self.last_status: TaskStatus | None = None
        self.stale = False  # the ledger is behind `rec`: a write failed

    async def save(self, **changes: Any) -> bool:
        """Write a transition; a store that stays down is noted, not fatal (after the POST the
        task exists: polling and storing it matters more than the record)."""
        new = self.rec.model_copy(update=changes)
        try:
            self.rec = await self.fx.save(new)
        except LedgerUnavailable as exc:
            self.rec, self.stale = new, True
            self.notes.append(f"ledger not updated ({new.state}): {exc}")
            return False
        self.stale = False
        return True

    def end(self, step_or_status: Step | ItemStatus, **kw: Any) -> Outcome:
        if isinstance(step_or_status, Step):
            kw.setdefault("fail_code", step_or_status.fail_code)
            kw.setdefault("fail_msg", step_or_status.fail_msg)
            kw.setdefault("uncertain", step_or_status.uncertain)
            status = step_or_status.status
            assert status is not None
        else:
            status = step_or_status
        if self.last_status is not None:
            kw.setdefault("cost_time_ms", self.last_status.cost_time_ms)
        return Outcome(status, self.rec, run_posts=self.run_posts, notes=self.notes, **kw)

    def signal(self, step: Step) -> None:
        if step.signal is not None:
            self.budget.stop(step.signal, f"{step.fail_code}: {step.fail_msg}")

    async def run(self, resumed: bool) -> Outcome:
        while True:
            rec = self.rec
            if rec.task_id is None or rec.state in (
                LedgerState.NOT_SUBMITTED,
                LedgerState.UNCERTAIN,
            ):
                ended = await self.submit()
                if ended is not None:
                    return ended
                resumed = False
            ended = await self.poll(resumed)
            resumed = False
            if ended is not None:
                return ended

    async def submit(self) -> Outcome | None:
        """Reserve, re-check ownership, record `submitting`, POST. None once a task exists."""
        try:
            return await self._submit()
        finally:
            if self.refused_since is not None and self.refusals is not None:
                self.refusals.left()  # no longer waits on a 429, however it ended

    async def _submit(self) -> Outcome | None:
        while True:
            why_not = self.budget.reserve(self.unit)
            if why_not:
                return self.end(
                    ItemStatus.NOT_SUBMITTED if self.rec.attempts == 0 else ItemStatus.FAILED,
                    fail_code=self.rec.fail_code
                    or (COST_CAP if self.budget.stopped is None else NOT_SUBMITTED_STOP),
                    fail_msg=why_not,
                )
            try:
                lost_why = await self.fx.still_ours(self.rec)
            except LedgerUnavailable as exc:
                lost_why = str(exc)
            if lost_why:
                self.budget.refund(self.unit)
                return self.end(ItemStatus.NOT_SUBMITTED, fail_code=CLAIM_LOST, fail_msg=lost_why)
            # durable BEFORE the POST: a crash from here on leaves a visible `submitting` record
            before = self.rec
            # a POST while an earlier one's outcome is unknown: a possible second charge, kept
            # on the record so that no later run forgets to say so
            twice = before.possible_duplicate or before.state in (
                LedgerState.UNCERTAIN,
                LedgerState.SUBMITTING,
            )
            was_stale = self.stale  # an earlier write of this life may have failed too
            if not await self.save(
                state=LedgerState.SUBMITTING,
                task_id=None,
                attempts=before.attempts + 1,
                possible_duplicate=twice,
            ):
                self.budget.refund(self.unit)
                self.rec, self.stale = before, was_stale
                return self.end(
                    ItemStatus.NOT_SUBMITTED,
                    fail_code=LEDGER_UNAVAILABLE,
                    fail_msg="not submitted: the ledger could not record the submission "
                    f"({self.notes[-1]})",
                )
            self.run_posts += 1
            try:
                task_id = await self.fx.submit(self.request)
            except Exception as err:  # noqa: BLE001 - every refusal is classified by the steps
                step = on_submit_error(
                    err,
                    self.rec.attempts,
                    uncertain_before=before.state
                    in (LedgerState.UNCERTAIN, LedgerState.SUBMITTING),
                )
                self.signal(step)
                if step.refund:
                    self.budget.refund(self.unit)
                    self.run_posts -= 1
                    if step.ledger is not None:  # None: the record is not ours to write
                        await self.save(
                            state=step.ledger,
                            attempts=before.attempts,
                            fail_code=step.fail_code,
                            fail_msg=step.fail_msg,
                        )
                elif step.ledger is not None:
                    await self.save(state=step.ledger, fail_msg=step.fail_msg)
                if step.next != "wait":
                    return self.end(step)
                # patience counts the time that passed, not what the provider asked for: a
                # Retry-After of 0 (or 3600) says nothing of how long the item has waited
                now = self.clock()
                first = self.refused_since is None
                if self.refused_since is None:
                    self.refused_since = now
                waited = now - self.refused_since  # a clock that starts at 0.0 too
                patience = self.policy.rate_limit_patience_s
                everything = self.refusals.refused(now, first=first) if self.refusals else 0.0
                if everything > patience:
                    self.budget.stop(
                        Stop.RATE_LIMITED,
                        f"the provider refused every submission with 429 for {everything:.0f} s "
                        "(HAILUO_RATE_LIMIT_PATIENCE_S): stopped submitting; run again later "
                        "(nothing not submitted was paid for)",
                    )
                if waited > patience or everything > patience:
                    return self.end(
                        ItemStatus.NOT_SUBMITTED if before.attempts == 0 else ItemStatus.FAILED,
                        fail_code=RATE_LIMITED,
                        fail_msg=f"refused by rate limiting for {waited:.0f} s: {err}"
                        + ("" if waited > patience else "; the run stopped submitting"),
                    )
                await self.fx.rate_limited(step.wait_s or 0.0)
                continue
            if self.refusals is not None:
                self.refusals.accepted()
                if self.refused_since is not None:
                    self.refusals.left()
            self.refused_since = None  # accepted: a later 429 starts a new wait
            await self.save(
                state=LedgerState.SUBMITTED,
                task_id=task_id,
                task_ids=[*self.rec.task_ids, task_id],
                fail_code=None,
                fail_msg=None,
            )
            return None

    async def poll(self, resumed: bool) -> Outcome | None:
        """Read the task to its end and act on it. None when the item is to be resubmitted."""
        assert self.rec.task_id is not None
        try:
            st = await self.fx.poll(self.rec.task_id, immediate=resumed)
        except Exception as err:  # noqa: BLE001 - classified by the steps
            step = on_poll_error(err)
            self.signal(step)
            if step.ledger is not None:
                await self.save(state=step.ledger, fail_code=step.fail_code, fail_msg=step.fail_msg)
            return self.end(step)
        self.last_status = st
        step = on_task_final(
            st,
            self.rec.resubmits,
            overrides=self.policy.failcode_overrides,
            max_resubmits=self.policy.max_resubmits,
            # the task was seen to succeed (a stored video found missing or damaged is read
            # again too)
            succeeded_before=self.rec.state in (LedgerState.SUCCEEDED, LedgerState.STORED)
            or self.rec.fail_code == FAILED_AFTER_SUCCESS,
        )
        self.signal(step)
        if step.next == "submit":
            await self.save(
                state=LedgerState.NOT_SUBMITTED,
                resubmits=self.rec.resubmits + 1,  # durable before the POST, like `attempts`
                fail_code=st.fail_code,
                fail_msg=st.fail_msg,
            )
            self.notes.append(f"transient {st.fail_code}: resubmitted")
            return None
        if step.next == "end":
            await self.save(
                state=step.ledger or self.rec.state,
                fail_code=step.fail_code,
                fail_msg=step.fail_msg,
                cost_time_ms=st.cost_time_ms,
            )
            return self.end(step)
        return await self.store(st)

    async def store(self, st: TaskStatus) -> Outcome:
        try:
            key = self.rec.video_key or await self.fx.choose_key(self.rec)
        except Exception as err:  # noqa: BLE001 - the store could not be read: the task is
            return self.end(on_store_error(err))  # kept (`submitted`), the next run fetches it
        await self.save(state=LedgerState.SUCCEEDED, cost_time_ms=st.cost_time_ms, video_key=key)
        try:
            stored = await self.fx.store(st.result_urls[0], key, sweep=self.sweep)
        except Exception as err:  # noqa: BLE001 - classified by the steps
            return self.end(on_store_error(err))
        order = self.request.input
        await self.save(
            state=LedgerState.STORED, video=stored.url, bytes=stored.size, sha256=stored.sha256,
            result=result_identity(st.result_urls[0]),
            **paid_for_facts(stored.info, str(order.mode), order.duration),
        )  # fmt: skip
        return self.end(ItemStatus.SUCCEEDED, stored=stored)
