"""One item in a run: claim it, plan it from the ledger, live it, release it.

The decisions live in the library (`ledger.plan_item`, `steps`, `lifecycle.live_item`); this
module only supplies the effects, as Prefect tasks, and turns the outcome into a result line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prefect.concurrency.asyncio import concurrency as global_concurrency

from flows.tasks import Runtime, poll_item, store_video, submit_item
from hailuo_batch.apixo import GenerateRequest, Mode, TaskStatus
from hailuo_batch.apixo.models import PRO_DURATION_S
from hailuo_batch.budget import Budget
from hailuo_batch.ledger import (
    Ledger,
    LedgerRecord,
    LedgerState,
    LedgerUnavailable,
    Plan,
    plan_item,
    stored_key,
)
from hailuo_batch.lifecycle import LifePolicy, Outcome, live_item
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.pacing import AdaptiveSlots, Slot
from hailuo_batch.policy import Prices, estimate_cost
from hailuo_batch.results import ItemResult, ItemStatus
from hailuo_batch.steps import LEDGER_UNAVAILABLE, choose_video_key
from hailuo_batch.storage import StoredObject
from hailuo_batch.validation import Preflight
from hailuo_batch.video import VideoInfo, duration_warning

GLOBAL_LIMIT = "apixo"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def base_result(item: ManifestItem, run_id: str, **kw: Any) -> ItemResult:
    """An item's result line with its inputs filled in."""
    return ItemResult(
        id=item.id,
        row=item.row,
        image_url=item.image_url,
        prompt=item.prompt,
        mode=str(item.mode),
        duration=item.duration,
        provider=str(item.provider),
        input_hash=item.input_hash,
        run_id=run_id,
        finished_at=now_iso(),
        **kw,
    )


@dataclass
class Batch:
    """What the items of one run share: runtime, ledger, budget and the concurrency slots."""

    rt: Runtime
    ledger: Ledger
    run_id: str
    prices: Prices
    slots: AdaptiveSlots  # --concurrency is the ceiling; 429s bring the in-flight target down
    budget: Budget = field(default_factory=Budget)
    force: bool = False
    resubmit_lost: bool = False
    use_global_limit: bool = False  # the Prefect global concurrency limit `apixo` exists

    def plan(self, item: ManifestItem, rec: LedgerRecord | None) -> Plan:
        return plan_item(
            rec,
            item.input_hash,
            force=self.force,
            uncertain_policy=self.rt.settings.uncertain_policy,
            resubmit_lost=self.resubmit_lost,
        )

    def unit_cost(self, item: ManifestItem) -> float:
        return estimate_cost(str(item.mode), item.duration, self.prices)


async def run_item(b: Batch, v: Preflight) -> ItemResult:
    """Claim the item, run it, release the claim. Never raises for the item's own troubles.

    An item claimed by another run is waited for up to one lease period (a crashed run's
    claim goes stale in that time and is taken over); if its owner is still alive after
    that, the item is left to it.
    """
    item = v.item
    try:
        owner = await _claim(b, item)
    except LedgerUnavailable as exc:
        return base_result(
            item, b.run_id, status=ItemStatus.NOT_SUBMITTED, fail_code=LEDGER_UNAVAILABLE,
            fail_msg=f"not submitted: the item could not be claimed: {exc}",
        )  # fmt: skip
    if owner is not None:
        return base_result(
            item,
            b.run_id,
            status=ItemStatus.NOT_SUBMITTED,
            fail_msg=f"being processed by concurrent run {owner}; not touched by this run",
        )
    try:
        return await _plan_and_live(b, v)
    except LedgerUnavailable as exc:
        return base_result(
            item, b.run_id, status=ItemStatus.NOT_SUBMITTED, fail_code=LEDGER_UNAVAILABLE,
            fail_msg=f"not submitted: the ledger could not be read: {exc}",
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - one item's bug must not lose every row's result
        b.rt.log("item %s: unexpected error: %r", item.id, exc, level=logging.ERROR)
        return base_result(
            item, b.run_id, status=ItemStatus.FAILED, fail_code="INTERNAL_ERROR",
            fail_msg=b.rt.scrub(f"{type(exc).__name__}: {exc}; its ledger record says where "
                                "it stopped, and the next run resumes it"),
        )  # fmt: skip
    finally:
        with contextlib.suppress(LedgerUnavailable):  # a stale claim expires with the lease
            await b.rt.blocking(b.ledger.release, item.id)


async def _claim(b: Batch, item: ManifestItem) -> str | None:
    ttl = b.ledger.lease_ttl_s
    deadline = time.monotonic() + ttl + 1
    owner = await b.rt.blocking(b.ledger.claim, item.id)
    while owner is not None and time.monotonic() < deadline:
        await asyncio.sleep(min(2.0, ttl / 4))
        owner = await b.rt.blocking(b.ledger.claim, item.id)
    return owner


async def _plan_and_live(b: Batch, v: Preflight) -> ItemResult:
    item = v.item
    unit_cost = b.unit_cost(item)
    rec = await b.rt.blocking(b.ledger.get, item.id)
    plan = b.plan(item, rec)
    extra: dict[str, Any] = {"note": plan.note, "uncertain": plan.uncertain}
    earlier = round(plan.attempts * unit_cost, 4)  # what earlier runs may have spent on it
    if plan.action == "done" and rec is not None:
        if await b.rt.blocking(_stored_intact, b, rec):
            return _from_record(b, item, rec, ItemStatus.SUCCEEDED, unit_cost, **extra)
        plan = Plan(
            "poll", note="stored video missing or damaged: fetching it again", attempts=rec.attempts
        )
        extra["note"] = plan.note
    if plan.action == "cached" and rec is not None:
        status = ItemStatus.SKIPPED if rec.state == LedgerState.SKIPPED else ItemStatus.FAILED
        return _from_record(b, item, rec, status, unit_cost, **extra)
    if plan.action == "hold":
        return base_result(
            item, b.run_id, status=ItemStatus.UNCERTAIN, attempts=plan.attempts,
            cost_usd=earlier, fail_msg=plan.note, **extra,
        )  # fmt: skip
    if plan.action == "poll" and rec is not None:
        start = rec
    else:
        start = LedgerRecord(
            id=item.id,
            input_hash=item.input_hash,
            # an earlier possible charge stays on record until a POST is accepted
            state=LedgerState.UNCERTAIN if plan.uncertain else LedgerState.NOT_SUBMITTED,
            attempts=plan.attempts,
            # every task this id ever had stays on record, the earlier inputs' ones included
            task_ids=rec.task_ids if rec is not None else [],
        )
    assert v.request is not None  # only valid items get here
    async with b.slots.slot() as slot, _provider_slot(b):
        fx = FlowEffects(b, item, v.request, expected=rec, slot=slot)
        out = await live_item(
            start,
            v.request,
            unit_cost=unit_cost,
            budget=b.budget,
            fx=fx,
            policy=LifePolicy(
                failcode_overrides=dict(b.rt.settings.failcode_policy),
                max_resubmits=b.rt.settings.transient_max_resubmits,
            ),
            resumed=plan.action == "poll",
            sweep=plan.action == "poll",
        )
    return _from_outcome(b, item, out, unit_cost, extra)


class FlowEffects:
    """The effects of `live_item` for one item: Prefect tasks, the ledger, the store."""

    def __init__(
        self,
        b: Batch,
        item: ManifestItem,
        request: GenerateRequest,
        expected: LedgerRecord | None,
        slot: Slot,
    ) -> None:
        self.b, self.item, self.request = b, item, request
        self.expected = expected  # the record as this run last saw or wrote it
        self.slot = slot  # this item's place among the submissions the provider accepts

    async def save(self, rec: LedgerRecord) -> LedgerRecord:
        if rec.fail_msg:  # a provider's message may echo a signed URL or a token
            rec = rec.model_copy(update={"fail_msg": self.b.rt.scrub(rec.fail_msg)})
        saved = await self.b.rt.blocking(self.b.ledger.put, rec)
        self.expected = saved
        return saved

    async def still_ours(self, expected: LedgerRecord | None) -> str | None:
        return await self.b.rt.blocking(self.b.ledger.still_ours, self.item.id, self.expected)

    async def submit(self, request: GenerateRequest) -> str:
        sub = await submit_item(self.b.rt, self.item, request)
        if sub.task_id is None:
            assert sub.error is not None
            raise sub.error
        self.slot.accepted()
        return sub.task_id

    async def poll(self, task_id: str, *, immediate: bool) -> TaskStatus:
        polled = await poll_item(self.b.rt, self.item, task_id, immediate=immediate)
        if polled.status is None:
            assert polled.error is not None
            raise polled.error
        return polled.status

    async def store(self, url: str, key: str, *, sweep: bool) -> StoredObject:
        out = await store_video(self.b.rt, self.item, url, key, sweep=sweep)
        if out.stored is None:
            assert out.error is not None
            raise out.error
        return out.stored

    async def choose_key(self, rec: LedgerRecord) -> str:
        store = self.b.rt.store
        return await self.b.rt.blocking(choose_video_key, rec.id, rec.input_hash, store.exists)

    async def rate_limited(self, wait_s: float) -> None:
        """Give the slot up and wait for one again: the run's in-flight target comes down to
        what the provider accepts, and this item goes ahead of items not yet refused."""
        self.b.rt.log("item %s: rate limited (429), waiting for a slot", self.item.id)
        await self.slot.rate_limited(wait_s)


@contextlib.asynccontextmanager
async def _provider_slot(b: Batch) -> AsyncIterator[None]:
    """A slot of the Prefect global concurrency limit `apixo`, when that limit exists.

    Acquiring goes through the Prefect server for every item, one request at a time per
    process, so it is skipped entirely when no limit is configured (see README, Benchmarks).
    """
    if not b.use_global_limit:
        yield
        return
    async with global_concurrency(GLOBAL_LIMIT, occupy=1, strict=False):
        yield


def _stored_intact(b: Batch, rec: LedgerRecord) -> bool:
    """The stored video is there with the bytes the ledger recorded (size, then sha256)."""
    key = stored_key(rec)
    store = b.rt.store
    if not store.exists(key) or store.size(key) != rec.bytes:
        return False
    return rec.sha256 is None or hashlib.sha256(store.read_bytes(key)).hexdigest() == rec.sha256


def _from_record(
    b: Batch, item: ManifestItem, rec: LedgerRecord, status: ItemStatus, unit: float, **kw: Any
) -> ItemResult:
    """The result of an item this run did not touch: nothing spent by this run."""
    scrub = b.rt.scrub
    if kw.get("note"):
        kw["note"] = scrub(kw["note"])
    return base_result(
        item, b.run_id, status=status, task_id=rec.task_id, attempts=rec.attempts,
        cost_usd=round(rec.attempts * unit, 4), run_cost_usd=0.0, video=rec.video,
        bytes=rec.bytes, sha256=rec.sha256, cost_time_ms=rec.cost_time_ms,
        fail_code=rec.fail_code, fail_msg=scrub(rec.fail_msg) if rec.fail_msg else None, **kw,
    )  # fmt: skip


def _from_outcome(
    b: Batch, item: ManifestItem, out: Outcome, unit: float, extra: dict[str, Any]
) -> ItemResult:
    rec = out.rec
    notes = [n for n in (extra.get("note"), *out.notes) if n]
    stored = out.stored
    return base_result(
        item,
        b.run_id,
        status=out.status,
        task_id=rec.task_id,
        attempts=rec.attempts,
        cost_usd=round(rec.attempts * unit, 4),
        run_cost_usd=round(out.run_posts * unit, 4),
        fail_code=out.fail_code,
        fail_msg=b.rt.scrub(out.fail_msg) if out.fail_msg else None,
        cost_time_ms=out.cost_time_ms,
        video=stored.url if stored else None,
        bytes=stored.size if stored else None,
        sha256=stored.sha256 if stored else None,
        note=b.rt.scrub("; ".join(notes)) or None,
        uncertain=bool(extra.get("uncertain")) or out.uncertain,
        **_video_facts(item, stored),
    )


def _video_facts(item: ManifestItem, stored: StoredObject | None) -> dict[str, Any]:
    """Duration and resolution of a verified video, and a warning if it is not what was paid."""
    info = stored.info if stored is not None else None
    if not isinstance(info, VideoInfo):
        return {}
    requested = PRO_DURATION_S if item.mode == Mode.PRO else item.duration
    return {
        "video_duration_s": None if info.duration_s is None else round(info.duration_s, 2),
        "video_resolution": f"{info.width}x{info.height}",
        "warning": duration_warning(info, requested),
    }
