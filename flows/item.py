"""One item's life in a run: claim, resume from the ledger, submit, poll, store.

Every transition is written to the ledger in the output store before the next step, so a run
killed at any point can be resumed without paying twice or losing a finished video.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger
from prefect.concurrency.asyncio import concurrency as global_concurrency

from flows.tasks import Runtime, poll_item, store_video, submit_item
from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    AuthenticationError,
    InsufficientCreditsError,
    InvalidRequestError,
    TaskState,
)
from hailuo_batch.ledger import Ledger, LedgerRecord, LedgerState, Plan, plan_item
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.policy import Prices, after_failure, classify_fail_code, estimate_cost
from hailuo_batch.results import ItemResult, ItemStatus
from hailuo_batch.storage import video_key
from hailuo_batch.validation import Preflight

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
    """What the items of one run share: runtime, ledger, stops and the money guard."""

    rt: Runtime
    ledger: Ledger
    run_id: str
    prices: Prices
    slots: asyncio.Semaphore
    force: bool = False
    max_cost_usd: float | None = None
    spent_usd: float = 0.0  # estimated spend of this run's submissions
    abort: str | None = None  # HTTP 401: nothing can work
    stop_submitting: str | None = None  # HTTP 402 / INSUFFICIENT_CREDITS
    cost_capped: int = 0  # items left unsubmitted by max_cost_usd
    use_global_limit: bool = False  # the Prefect global concurrency limit `apixo` exists

    def reserve(self, unit_cost: float) -> str | None:
        """Reserve the spend of one submission, or say why not to submit.

        Called with no await between check and update, so concurrent items on the event loop
        cannot overshoot the cap.
        """
        if self.abort:
            return self.abort
        if self.stop_submitting:
            return self.stop_submitting
        if self.max_cost_usd is not None and self.spent_usd + unit_cost > self.max_cost_usd + 1e-9:
            self.cost_capped += 1
            return (
                f"max cost reached: ${self.spent_usd:.2f} of ${self.max_cost_usd:.2f} reserved, "
                f"this item would add ${unit_cost:.2f}"
            )
        self.spent_usd += unit_cost
        return None


async def run_item(b: Batch, v: Preflight) -> ItemResult:
    """Claim the item, run it, release the claim.

    An item claimed by another run is waited for up to one lease period (a crashed run's
    claim goes stale in that time and is taken over); if its owner is still alive after
    that, the item is left to it.
    """
    item = v.item
    ttl = b.ledger.lease_ttl_s
    deadline = time.monotonic() + ttl + 1
    owner = await b.rt.blocking(b.ledger.claim, item.id)
    while owner is not None and time.monotonic() < deadline:
        await asyncio.sleep(min(2.0, ttl / 4))
        owner = await b.rt.blocking(b.ledger.claim, item.id)
    if owner is not None:
        return base_result(
            item,
            b.run_id,
            status=ItemStatus.NOT_SUBMITTED,
            fail_msg=f"being processed by concurrent run {owner}; not touched by this run",
        )
    try:
        return await _resume(b, v)
    finally:
        await b.rt.blocking(b.ledger.release, item.id)


async def _resume(b: Batch, v: Preflight) -> ItemResult:
    item = v.item
    unit_cost = estimate_cost(str(item.mode), item.duration, b.prices)
    rec = await b.rt.blocking(b.ledger.get, item.id)
    plan = plan_item(
        rec, item.input_hash, force=b.force, uncertain_policy=b.rt.settings.uncertain_policy
    )
    extra: dict[str, Any] = {"note": plan.note, "uncertain": plan.uncertain}
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
            item,
            b.run_id,
            status=ItemStatus.UNCERTAIN,
            attempts=plan.attempts,
            cost_usd=round(plan.attempts * unit_cost, 4),
            fail_msg=plan.note,
            **extra,
        )
    if plan.action == "poll" and rec is not None:
        start = rec
    else:
        keep = rec is not None and rec.input_hash == item.input_hash
        start = LedgerRecord(
            id=item.id,
            input_hash=item.input_hash,
            state=LedgerState.NOT_SUBMITTED,
            attempts=plan.attempts,
            task_ids=rec.task_ids if (rec is not None and keep) else [],
        )
    async with b.slots, _provider_slot(b):
        return await _drive(b, v, start, unit_cost, resumed=plan.action == "poll", extra=extra)


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
    key = video_key(rec.id)
    return b.rt.store.exists(key) and b.rt.store.size(key) == rec.bytes


def _from_record(
    b: Batch, item: ManifestItem, rec: LedgerRecord, status: ItemStatus, unit: float, **kw: Any
) -> ItemResult:
    return base_result(
        item, b.run_id, status=status, task_id=rec.task_id, attempts=rec.attempts,
        cost_usd=round(rec.attempts * unit, 4), video=rec.video, bytes=rec.bytes,
        sha256=rec.sha256, cost_time_ms=rec.cost_time_ms, fail_code=rec.fail_code,
        fail_msg=rec.fail_msg, **kw,
    )  # fmt: skip


async def _drive(
    b: Batch,
    v: Preflight,
    rec: LedgerRecord,
    unit_cost: float,
    *,
    resumed: bool,
    extra: dict[str, Any],
) -> ItemResult:
    """Submit (unless a taskId is known), poll, store; resubmit transient failures."""
    item, rt, ledger = v.item, b.rt, b.ledger
    assert v.request is not None  # only valid items get here
    was_resumed = resumed  # an earlier run may have left a half-written download

    async def save(**changes: Any) -> LedgerRecord:
        return await rt.blocking(ledger.put, rec.model_copy(update=changes))

    def result(status: ItemStatus, **kw: Any) -> ItemResult:
        kw.setdefault("task_id", rec.task_id)
        return base_result(
            item,
            b.run_id,
            status=status,
            attempts=rec.attempts,
            cost_usd=round(rec.attempts * unit_cost, 4),
            **{**extra, **kw},
        )

    while True:
        if rec.task_id is None or rec.state == LedgerState.NOT_SUBMITTED:
            why_not = b.reserve(unit_cost)
            if why_not:
                status = ItemStatus.NOT_SUBMITTED if rec.attempts == 0 else ItemStatus.FAILED
                return result(status, fail_code=rec.fail_code, fail_msg=why_not)
            # durable BEFORE the POST: a crash from here on leaves a visible `submitting` record
            rec = await save(state=LedgerState.SUBMITTING, task_id=None, attempts=rec.attempts + 1)
            sub = await submit_item(rt, item, v.request)
            if sub.task_id is None:
                err = sub.error
                if isinstance(err, AmbiguousSubmitError):  # may have been charged: keep reserved
                    rec = await save(state=LedgerState.UNCERTAIN, fail_msg=str(err))
                    return result(
                        ItemStatus.UNCERTAIN,
                        uncertain=True,
                        fail_code="AMBIGUOUS_SUBMIT",
                        fail_msg=str(err),
                    )
                b.spent_usd -= unit_cost  # the refusal proves nothing was created
                rec = await save(state=LedgerState.NOT_SUBMITTED, attempts=rec.attempts - 1)
                code = getattr(err, "status_code", None)
                fail_code = f"HTTP_{code}" if code else "SUBMIT_ERROR"
                if isinstance(err, AuthenticationError):
                    b.abort = b.abort or f"authentication failed (HTTP 401): {err}"
                    return result(ItemStatus.NOT_SUBMITTED, fail_code=fail_code, fail_msg=b.abort)
                if isinstance(err, InsufficientCreditsError):
                    b.stop_submitting = (
                        b.stop_submitting or f"insufficient balance (HTTP 402): {err}"
                    )
                    return result(
                        ItemStatus.NOT_SUBMITTED, fail_code=fail_code, fail_msg=b.stop_submitting
                    )
                status = (
                    ItemStatus.INVALID
                    if isinstance(err, InvalidRequestError)
                    else (ItemStatus.NOT_SUBMITTED if rec.attempts == 0 else ItemStatus.FAILED)
                )
                return result(status, fail_code=fail_code, fail_msg=str(err))
            rec = await save(
                state=LedgerState.SUBMITTED,
                task_id=sub.task_id,
                task_ids=[*rec.task_ids, sub.task_id],
                fail_code=None,
                fail_msg=None,
            )
        assert rec.task_id is not None
        polled = await poll_item(rt, item, rec.task_id, immediate=resumed)
        resumed = False
        if polled.fatal is not None:
            b.abort = b.abort or f"authentication failed (HTTP 401): {polled.fatal}"
        st = polled.status
        if st is None:
            # no final state (timeout, 404, 401): the ledger keeps the taskId, a rerun polls it
            code, _, msg = (polled.error or "POLL_ERROR: unknown").partition(": ")
            return result(ItemStatus.FAILED, fail_code=code, fail_msg=msg)
        if st.state == TaskState.SUCCESS:
            if not st.result_urls:
                rec = await save(state=LedgerState.FAILED, fail_code="NO_RESULT_URL")
                return result(
                    ItemStatus.FAILED,
                    fail_code="NO_RESULT_URL",
                    fail_msg="success without resultUrls",
                )
            rec = await save(state=LedgerState.SUCCEEDED, cost_time_ms=st.cost_time_ms)
            try:
                d = rt.settings.store_retry_delay_s
                store = store_video.with_options(retry_delay_seconds=[d, 5 * d])
                stored = await store(rt, item, st.result_urls[0], sweep=was_resumed)
            except Exception as exc:  # noqa: BLE001 - recorded loudly; a rerun polls and fetches again
                get_run_logger().error("item %s: video NOT stored: %s", item.id, exc)
                return result(
                    ItemStatus.FAILED,
                    fail_code="DOWNLOAD_FAILED",
                    fail_msg=str(exc),
                    cost_time_ms=st.cost_time_ms,
                )
            rec = await save(
                state=LedgerState.STORED, video=stored.url, bytes=stored.size, sha256=stored.sha256
            )
            return result(
                ItemStatus.SUCCEEDED,
                video=stored.url,
                bytes=stored.size,
                sha256=stored.sha256,
                cost_time_ms=st.cost_time_ms,
            )
        fail_class = classify_fail_code(st.fail_code, rt.settings.failcode_policy)
        action = after_failure(fail_class, rec.attempts, rt.settings.transient_max_resubmits)
        if action == "resubmit":
            get_run_logger().info(
                "item %s: transient %s, resubmitting (attempt %d)",
                item.id,
                st.fail_code,
                rec.attempts + 1,
            )
            rec = await save(
                state=LedgerState.NOT_SUBMITTED, fail_code=st.fail_code, fail_msg=st.fail_msg
            )
            continue
        if action == "stop_submitting":
            b.stop_submitting = b.stop_submitting or f"insufficient credits ({st.fail_code})"
        final = LedgerState.SKIPPED if action == "skip" else LedgerState.FAILED
        rec = await save(
            state=final, fail_code=st.fail_code, fail_msg=st.fail_msg, cost_time_ms=st.cost_time_ms
        )
        status = ItemStatus.SKIPPED if action == "skip" else ItemStatus.FAILED
        return result(
            status, fail_code=st.fail_code, fail_msg=st.fail_msg, cost_time_ms=st.cost_time_ms
        )
