"""One item: check its image, claim it, plan it, live it (`lifecycle.live_item`), release it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from prefect.concurrency.asyncio import concurrency as global_concurrency

from flows.runtime import Runtime
from flows.tasks import Balance, poll_item, store_video, submit_item
from hailuo_batch import outcomes
from hailuo_batch.apixo import GenerateRequest, TaskStatus
from hailuo_batch.apixo.client import retried_refusal
from hailuo_batch.budget import Budget
from hailuo_batch.ledger import (
    Ledger,
    LedgerRecord,
    LedgerUnavailable,
    Plan,
    claim_or_wait,
    may_be_behind,
    plan_in_batch,
    refetch_key,
    stored_intact,
    stored_key,
    stored_unrecorded,
    task_from_results,
    with_retries,
)
from hailuo_batch.lifecycle import LifePolicy, live_item
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.pacing import AdaptiveSlots, RefusalWatch, Slot
from hailuo_batch.parts import results_folder
from hailuo_batch.policy import Prices, estimate_cost, not_forced_again
from hailuo_batch.results import DRY_RUN_REASON, ItemResult, from_jsonl, jsonl_lines
from hailuo_batch.steps import (
    LeaseLapsed,
    ResultOfAnotherItem,
    TaskIdReused,
    TaskOwners,
    choose_video_key,
)
from hailuo_batch.storage import StoredObject, run_key
from hailuo_batch.validation import Preflight, preflight

GLOBAL_LIMIT = "apixo"
T = TypeVar("T")


@dataclass
class PartsOfRun:
    """What a large run knows of its parts (`flows/parts.py`); empty for a run in one piece."""

    # the parts that ran on workers: name, final state, items, learned concurrency
    on_workers: list[dict[str, Any]] = field(default_factory=list)
    # their run ids: what they decided for an item stands when this run finishes their parts
    runs: frozenset[str] = frozenset()
    # a part run on a worker: the part's claim, checked before each item starts (the batch run
    # may have taken the part over while this run's lease looked dead)
    claim: str | None = None
    # ... and the batch run it is a part of: once that run is over (cancelled, crashed), the
    # part starts no further item
    batch_run: str | None = None


@dataclass
class RunState:
    """What the items of one run share: runtime, ledger, budget and stop flags, slots."""

    rt: Runtime
    ledger: Ledger
    run_id: str
    prices: Prices
    slots: AdaptiveSlots  # --concurrency is the ceiling; 429s bring the in-flight target down
    budget: Budget = field(default_factory=Budget)
    refusals: RefusalWatch = field(default_factory=RefusalWatch)  # 429s with none accepted
    force: bool = False
    # a rerun that chose its items itself (`rerun-failed`): force resubmits all it was given;
    # else force leaves content violations and unchanged bad input (`policy.not_forced_again`)
    chosen: bool = False
    resubmit_lost: bool = False
    use_global_limit: bool = False  # the Prefect global concurrency limit `apixo` exists
    dry_run: bool = False
    checks: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(4))
    # items checked and not yet given a slot: checks keep just ahead of the submissions, so a
    # batch of any size holds a bounded number of items (and threads) at once
    ahead: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))
    would_cost_usd: float = 0.0  # a dry run: what submitting its valid items would cost
    would_submit: int = 0  # a dry run: the valid items a real run would still pay for
    # a dry run: the estimate and the balance a real run's money guards would check
    dry_check: tuple[float, Balance] | None = None
    # what each row still costs to submit (resume-aware), by row: the estimate, and a part's
    # share of the cap
    planned_costs: dict[int, float] = field(default_factory=dict)
    parts: PartsOfRun = field(default_factory=PartsOfRun)
    owners: TaskOwners = field(default_factory=TaskOwners)  # which item each task is
    # the results files of earlier runs read so far, by run id (`results_of_run`)
    run_results: dict[str, dict[tuple[str, str | None], ItemResult]] = field(default_factory=dict)
    # each item's POSTs before this run began, by (id, input_hash) (`know_at_start`)
    posts_at_start: dict[tuple[str, str], int] = field(default_factory=dict)

    def plan(self, item: ManifestItem, rec: LedgerRecord | None) -> Plan:
        return plan_in_batch(
            rec,
            item.input_hash,
            part_runs=self.parts.runs,
            force=self.force,
            uncertain_policy=self.rt.settings.uncertain_policy,
            resubmit_lost=self.resubmit_lost,
            not_forced=None
            if self.chosen
            else partial(not_forced_again, overrides=self.rt.settings.failcode_policy),
        )

    def unit_cost(self, item: ManifestItem) -> float:
        return estimate_cost(str(item.mode), item.duration, self.prices)

    def results_of_run(self, run_id: str) -> dict[tuple[str, str | None], ItemResult]:
        """The results run `run_id` wrote into this output, by (id, input_hash): read once per
        run, a bad line skipped; {} when it wrote none. A store that cannot be read raises
        `LedgerUnavailable` (the item is then not submitted: never paid again blind)."""
        if run_id not in self.run_results:
            key = run_key(results_folder(run_id), "results.jsonl")
            try:
                text = with_retries(partial(self.rt.store.read_text, key), f"reading {key}")
            except (FileNotFoundError, ValueError):  # no such file, or not a run id at all
                text = ""
            found: dict[tuple[str, str | None], ItemResult] = {}
            for line in jsonl_lines(text):
                with contextlib.suppress(ValueError):
                    for r in from_jsonl(line):
                        found[(r.id, r.input_hash)] = r
            self.run_results[run_id] = found
        return self.run_results[run_id]

    def key_of(self, url: str) -> str | None:
        """The key of `url` in this run's store, None when it is not one of its objects."""
        root = self.rt.store.url_for("").rstrip("/") + "/"
        return url[len(root) :] if url.startswith(root) else None

    def task_behind(self, rec: LedgerRecord) -> LedgerRecord | None:
        """`ledger.task_from_results` for `rec`, from the results of the run that wrote it;
        a record that knows its task, or is past submitting, reads nothing."""
        if not rec.run_id or not may_be_behind(rec):  # nothing to read for
            return None
        line = self.results_of_run(rec.run_id).get((rec.id, rec.input_hash))
        found = task_from_results(rec, [line] if line else [], self.key_of)
        if found is not None:
            self.know(found)
        return found

    def know(self, rec: LedgerRecord) -> None:
        """The tasks and stored result an earlier run recorded are `rec`'s item's."""
        self.owners.know(rec.id, [rec.task_id, *rec.task_ids], [rec.result])

    def know_at_start(self, rec: LedgerRecord) -> None:
        """`know`, and how many POSTs the item had before this run (`parts_spend`)."""
        self.know(rec)
        self.posts_at_start[(rec.id, rec.input_hash)] = rec.attempts

    def parts_spend(self, rec: LedgerRecord | None, unit_usd: float) -> float:
        """What a part run of this batch spent on the item it left (killed, cancelled) for
        this run to finish: this run's spend, though the part's record says it. 0 for any other
        record, and in a part run itself."""
        if rec is None or self.parts.claim is not None or rec.run_id not in self.parts.runs:
            return 0.0
        before = self.posts_at_start.get((rec.id, rec.input_hash), 0)
        return max(0, rec.attempts - before) * unit_usd

    def know_records(self, items: list[ManifestItem]) -> None:
        """`know` every record of `items` (a part's run, which plans no spend of its own)."""
        for item in items:
            with contextlib.suppress(LedgerUnavailable):  # the item says so when it runs
                if (rec := self.ledger.record_for(item.id, item.input_hash)) is not None:
                    self.know(rec)


async def check_and_run(b: RunState, item: ManifestItem) -> ItemResult:
    """Check the item's image (plain threaded work, not a task run), then run it unless it is
    invalid or this is a dry run: submissions start as soon as the first rows are checked."""
    await b.ahead.acquire()
    released = False

    def started() -> None:  # the item has its slot, or is done: the next one may be checked
        nonlocal released
        if not released:
            released = True
            b.ahead.release()

    try:
        return await _check_and_run(b, item, started)
    finally:
        started()


async def _check_and_run(
    b: RunState, item: ManifestItem, started: Callable[[], None]
) -> ItemResult:
    async with b.checks:
        rt = b.rt
        v = await rt.blocking(
            lambda: preflight(
                item, settings=rt.settings, store=None if b.dry_run else rt.store,
                storage_options=rt.store.storage_options or None,
                output_is_local=rt.store.is_local,
            )
        )  # fmt: skip
    if not v.ok:
        rt.log("item %s invalid: %s", item.id, "; ".join(v.errors), level=logging.WARNING)
        return outcomes.invalid_image(v, b.run_id)
    if b.dry_run:
        # what a real run would pay: nothing for an item already stored or still in flight
        cost = b.planned_costs.get(item.row, b.unit_cost(item))
        b.would_cost_usd += cost
        b.would_submit += cost > 0
        return outcomes.not_submitted(item, b.run_id, DRY_RUN_REASON)
    return await run_item(b, v, started)


async def run_item(b: RunState, v: Preflight, started: Callable[[], None]) -> ItemResult:
    """Claim the item (`claim_or_wait`), run it, release the claim; never raises for the item's
    own troubles."""
    item = v.item
    try:
        owner = await claim_or_wait(b.ledger, item.id, b.rt.blocking)
    except LedgerUnavailable as exc:
        return outcomes.not_submitted(
            item, b.run_id, f"not submitted: the item could not be claimed: {exc}", ledger=True
        )
    if owner is not None:
        why = f"being processed by concurrent run {owner}; not touched by this run"
        return outcomes.not_submitted(item, b.run_id, why)
    try:
        return await _plan_and_live(b, v, started)
    except LedgerUnavailable as exc:
        why = f"not submitted: the ledger could not be read: {exc}"
        return outcomes.not_submitted(item, b.run_id, why, ledger=True)
    except Exception as exc:  # noqa: BLE001 - one item's bug must not lose every row's result
        b.rt.log("item %s: unexpected error: %r", item.id, exc, level=logging.ERROR)
        rec = None  # what the ledger knows: a task it may have paid for stays in the result
        with contextlib.suppress(Exception):
            rec = await b.rt.blocking(b.ledger.record_for, item.id, item.input_hash)
        return outcomes.internal_error(item, b.run_id, exc, b.rt.scrub, rec, b.unit_cost(item))
    finally:
        with contextlib.suppress(LedgerUnavailable):  # a stale claim expires with the lease
            await b.rt.blocking(b.ledger.release, item.id)


async def _plan_and_live(b: RunState, v: Preflight, started: Callable[[], None]) -> ItemResult:
    item, unit_cost = v.item, b.unit_cost(v.item)
    # the row's inputs may have changed: then `rec` is what these inputs left earlier, if any
    current, rec = await b.rt.blocking(b.ledger.records_for, item.id, item.input_hash)
    replaced = current is not None and current.input_hash != item.input_hash

    async def keep_replaced() -> None:
        """Before the first write of these inputs: keep the other inputs' record."""
        nonlocal replaced
        if replaced and current is not None:
            await b.rt.blocking(b.ledger.keep, current)
            replaced = False

    recovered = None
    if rec is not None and not replaced:  # a run whose ledger writes failed left its results
        recovered = await b.rt.blocking(b.task_behind, rec)
        if recovered is not None:
            rec = current = await b.rt.blocking(b.ledger.put, recovered)
    plan = b.plan(item, rec)
    parts_usd = b.parts_spend(rec, unit_cost)
    recovered_note = None
    if recovered is not None:
        recovered_note = f"task {recovered.task_id} recovered from run {recovered.run_id}'s results"
        plan = replace(plan, note="; ".join(n for n in (recovered_note, plan.note) if n))
    if (
        plan.action == "done"
        and rec is not None
        and not await b.rt.blocking(stored_intact, b.rt.store, rec)
    ):
        note = "stored video missing or damaged: fetching it again"
        plan = Plan("poll", note=note, attempts=rec.attempts, resubmits=plan.resubmits)
        taken = await b.rt.blocking(b.rt.store.exists, stored_key(rec))
        rec = rec.model_copy(update={"video_key": refetch_key(rec, current, taken=taken)})
    elif plan.action in ("poll", "submit") and rec is not None:
        found = await b.rt.blocking(stored_unrecorded, b.rt.store, rec, item.input_hash)
        if found is not None:  # stored before a crash could record it: nothing to pay or fetch
            await keep_replaced()
            rec = await b.rt.blocking(b.ledger.put, found)
            note = f"video of task {rec.task_id} found stored at {rec.video}; recorded"
            note = "; ".join(n for n in (recovered_note, note) if n)
            plan = Plan("done", note=note, attempts=rec.attempts, resubmits=rec.resubmits)
    done = outcomes.planned_result(item, rec, plan, unit_cost, b.run_id, b.rt.scrub)
    if done is not None:
        return outcomes.with_spend(done, parts_usd)
    assert v.request is not None  # only valid items get here
    await b.rt.recorder.wait_ready()  # the Prefect server keeps up with this run's records
    async with b.slots.slot() as slot, _provider_slot(b):
        # again with the slot: items that queued for a slot passed the check before it closed
        await b.rt.recorder.wait_ready()
        if b.parts.claim is not None:  # a part run: is the part still this run's?
            holder = await b.rt.blocking(b.ledger.part_owner, b.parts.claim)
            if holder != b.run_id:
                why = f"part {b.parts.claim} was taken over by run {holder or 'nobody'}"
                return outcomes.not_submitted(item, b.run_id, f"{why}: not touched")
            batch = b.parts.batch_run
            if batch is not None and not await b.rt.blocking(b.ledger.lease_alive, batch):
                why = (
                    f"the batch run {batch} is over (cancelled, or it stopped): not started; "
                    "run the batch again to finish it"
                )
                return outcomes.not_submitted(item, b.run_id, why)
        started()
        await keep_replaced()
        out = await live_item(
            outcomes.start_record(item, rec, plan),
            v.request,
            unit_cost=unit_cost,
            budget=b.budget,
            fx=FlowEffects(b, item, expected=current, slot=slot),
            policy=LifePolicy(
                failcode_overrides=dict(b.rt.settings.failcode_policy),
                max_resubmits=b.rt.settings.transient_max_resubmits,
                rate_limit_patience_s=b.rt.settings.rate_limit_patience_s,
            ),
            resumed=plan.action == "poll",
            sweep=plan.action == "poll",
            refusals=b.refusals,
        )
    result = outcomes.from_outcome(item, out, plan, unit_cost, b.run_id, b.rt.scrub)
    return outcomes.with_spend(result, parts_usd)


class FlowEffects:
    """The effects of `live_item` for one item: Prefect tasks, the ledger, the store."""

    def __init__(
        self, b: RunState, item: ManifestItem, expected: LedgerRecord | None, slot: Slot
    ) -> None:
        self.b, self.item = b, item
        self.expected = expected  # the record as this run last saw or wrote it
        self.slot = slot  # this item's place among the submissions the provider accepts
        self.sent_at: float | None = None  # when the last POST was sent

    async def save(self, rec: LedgerRecord) -> LedgerRecord:
        if rec.fail_msg:  # a provider's message may echo a signed URL or a token
            rec = rec.model_copy(update={"fail_msg": self.b.rt.scrub(rec.fail_msg)})
        saved = await self.b.rt.blocking(self.b.ledger.put, rec)
        self.expected = saved
        return saved

    async def still_ours(self, expected: LedgerRecord | None) -> str | None:
        return await self.b.rt.blocking(self.b.ledger.still_ours, self.item.id, self.expected)

    async def submit(self, request: GenerateRequest) -> str:
        if not self.b.ledger.lease_fresh():  # the `submitting` write may have taken a while
            raise LeaseLapsed("this run's lease lapsed before the POST: not sent")
        lease_fresh = self.b.ledger.lease_fresh
        sub = await submit_item(self.item, request, may_retry=lease_fresh)
        self.b.rt.recorder.task_finished()
        if sub.error is not None and retried_refusal(sub.error) and not lease_fresh():
            # a refusal proves nothing was created, and the `submitting` record may be another
            # run's by now: the lease lapsed while the POST was answered or retried
            raise LeaseLapsed(f"this run's lease lapsed while the POST was retried: {sub.error}")
        task_id = _or_raise(sub.task_id, sub.error)
        self.slot.accepted()
        self.sent_at = sub.sent_at
        if other := self.b.owners.claim_task(task_id, self.item.id):
            raise TaskIdReused(
                f"the provider answered the POST with task {task_id}, which is item {other}'s: "
                "this item's own task is unknown, and may have been charged"
            )
        return task_id

    async def poll(self, task_id: str, *, immediate: bool) -> TaskStatus:
        sent_at = None if immediate else self.sent_at
        polled = await poll_item(self.item, task_id, immediate=immediate, sent_at=sent_at)
        self.b.rt.recorder.task_finished()
        return _or_raise(polled.status, polled.error)

    async def store(self, url: str, key: str, *, sweep: bool) -> StoredObject:
        if other := self.b.owners.claim_result(url, self.item.id):
            raise ResultOfAnotherItem(
                f"the provider's result for task {self.expected and self.expected.task_id} "
                f"is the one item {other}'s task gave (item {other} keeps it: one of the two "
                "may hold the other's video, check both)"
            )
        out = await store_video(self.item, url, key, sweep=sweep)
        return _or_raise(out.stored, out.error)

    async def choose_key(self, rec: LedgerRecord) -> str:
        store = self.b.rt.store
        choose = partial(choose_video_key, rec.id, rec.input_hash, store.exists)
        return await self.b.rt.blocking(with_retries, choose, f"choosing a key for {rec.id}")

    async def rate_limited(self, wait_s: float) -> None:
        """Give the slot up and wait for one again: the run's in-flight target comes down to
        what the provider accepts, and this item goes ahead of items not yet refused."""
        self.b.rt.log("item %s: rate limited (429), waiting for a slot", self.item.id)
        await self.slot.rate_limited(wait_s)


def _or_raise(value: T | None, error: Exception | None) -> T:
    """A task's typed outcome back into the value or the error `live_item` expects."""
    if value is None:
        raise error or RuntimeError("a task returned neither a value nor an error")
    return value


@contextlib.asynccontextmanager
async def _provider_slot(b: RunState) -> AsyncIterator[None]:
    """A slot of the Prefect global concurrency limit `apixo`, only when it exists: acquiring
    costs a server request per item (see README, Benchmarks)."""
    if not b.use_global_limit:
        yield
        return
    async with global_concurrency(GLOBAL_LIMIT, occupy=1, strict=False):
        yield
