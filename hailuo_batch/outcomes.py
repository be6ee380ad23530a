"""An item's result line, from its inputs, its ledger record or what this run did with it.

Plain functions, no Prefect, no I/O: the flow (`flows/item.py`) calls them with what it found.
`scrub` removes secrets (the API key, the callback token, signed URLs) from provider messages.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from hailuo_batch.ledger import LedgerRecord, LedgerState, Plan
from hailuo_batch.lifecycle import Outcome
from hailuo_batch.manifest import ManifestItem, RowError
from hailuo_batch.results import ItemResult, ItemStatus
from hailuo_batch.steps import LEDGER_UNAVAILABLE
from hailuo_batch.storage import StoredObject
from hailuo_batch.validation import Preflight
from hailuo_batch.video import paid_for_facts

Scrub = Callable[[str], str]


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


def invalid_rows(errors: list[RowError], run_id: str) -> list[ItemResult]:
    """One `invalid` result per bad manifest row, with every field and reason of that row."""
    by_row: dict[int, list[RowError]] = {}
    for e in errors:
        by_row.setdefault(e.row, []).append(e)
    return [
        ItemResult(
            # the row's own id when it had a readable one; else a name no valid id can take
            id=next((e.id for e in errs if getattr(e, "id", None)), None) or f"row#{row}",
            row=row,
            status=ItemStatus.INVALID,
            field=errs[0].field,
            errors=[str(e) for e in errs],
            fail_msg="; ".join(str(e) for e in errs),
            run_id=run_id,
            finished_at=now_iso(),
        )
        for row, errs in sorted(by_row.items())
    ]


def invalid_image(v: Preflight, run_id: str) -> ItemResult:
    """A row whose image (or request) broke the contract's rules."""
    return base_result(
        v.item, run_id, status=ItemStatus.INVALID, field=v.field, errors=v.errors,
        fail_msg="; ".join(v.errors),
    )  # fmt: skip


def not_submitted(item: ManifestItem, run_id: str, why: str, *, ledger: bool = False) -> ItemResult:
    """An item this run left alone; `ledger`: because the ledger could not be reached."""
    code = LEDGER_UNAVAILABLE if ledger else None
    return base_result(item, run_id, status=ItemStatus.NOT_SUBMITTED, fail_code=code, fail_msg=why)


def internal_error(
    item: ManifestItem,
    run_id: str,
    exc: Exception,
    scrub: Scrub,
    rec: LedgerRecord | None = None,
    unit_usd: float = 0.0,
) -> ItemResult:
    """An item whose run hit a bug: failed, and resumed by the next run from its ledger record
    (`rec`, when it could be read: its task and POSTs stay in the result)."""
    known: dict[str, Any] = {}
    if rec is not None and rec.input_hash == item.input_hash:
        known = {"task_id": rec.task_id, "attempts": rec.attempts,
                 "cost_usd": round(rec.attempts * unit_usd, 4)}  # fmt: skip
    return base_result(
        item, run_id, status=ItemStatus.FAILED, fail_code="INTERNAL_ERROR",
        fail_msg=scrub(f"{type(exc).__name__}: {exc}; its ledger record says where it "
                       "stopped, and the next run resumes it"), **known,
    )  # fmt: skip


def planned_result(
    item: ManifestItem,
    rec: LedgerRecord | None,
    plan: Plan,
    unit_usd: float,
    run_id: str,
    scrub: Scrub,
) -> ItemResult | None:
    """The result of an item its plan says this run does not live (`done` with its video
    intact, `cached` failed or skipped, `hold` uncertain); None when it must be lived."""
    extra: dict[str, Any] = {"note": plan.note, "uncertain": plan.uncertain}
    if plan.action == "done" and rec is not None:
        return from_record(item, rec, ItemStatus.SUCCEEDED, unit_usd, run_id, scrub, **extra)
    if plan.action == "cached" and rec is not None:
        status = ItemStatus.SKIPPED if rec.state == LedgerState.SKIPPED else ItemStatus.FAILED
        return from_record(item, rec, status, unit_usd, run_id, scrub, **extra)
    if plan.action == "hold":
        return base_result(
            item, run_id, status=ItemStatus.UNCERTAIN, attempts=plan.attempts,
            cost_usd=round(plan.attempts * unit_usd, 4), fail_msg=plan.note, **extra,
        )  # fmt: skip
    return None


def start_record(item: ManifestItem, rec: LedgerRecord | None, plan: Plan) -> LedgerRecord:
    """Where an item's life starts: its record when a task is to be polled, else a new one."""
    if plan.action == "poll" and rec is not None:
        return rec.model_copy(update={"resubmits": plan.resubmits})  # 0 in a forced run
    return LedgerRecord(
        id=item.id,
        input_hash=item.input_hash,
        # an earlier possible charge stays on record until a POST is accepted
        state=LedgerState.UNCERTAIN if plan.uncertain else LedgerState.NOT_SUBMITTED,
        attempts=plan.attempts,
        resubmits=plan.resubmits,
        # every task this id ever had stays on record, the earlier inputs' ones included
        task_ids=rec.task_ids if rec is not None else [],
    )


def from_record(
    item: ManifestItem,
    rec: LedgerRecord,
    status: ItemStatus,
    unit_usd: float,
    run_id: str,
    scrub: Scrub,
    **kw: Any,
) -> ItemResult:
    """The result of an item this run did not touch: nothing spent by this run."""
    if kw.get("note"):
        kw["note"] = scrub(kw["note"])
    return base_result(
        item, run_id, status=status, task_id=rec.task_id, attempts=rec.attempts,
        cost_usd=round(rec.attempts * unit_usd, 4), run_cost_usd=0.0, video=rec.video,
        bytes=rec.bytes, sha256=rec.sha256, cost_time_ms=rec.cost_time_ms,
        fail_code=rec.fail_code, fail_msg=scrub(rec.fail_msg) if rec.fail_msg else None,
        video_duration_s=rec.video_duration_s, video_resolution=rec.video_resolution,
        warning=rec.warning, **kw,
    )  # fmt: skip


def from_outcome(
    item: ManifestItem, out: Outcome, plan: Plan, unit_usd: float, run_id: str, scrub: Scrub
) -> ItemResult:
    """The result of an item this run lived (`lifecycle.live_item`'s outcome)."""
    rec, stored = out.rec, out.stored
    notes = [n for n in (plan.note, *out.notes) if n]
    return base_result(
        item,
        run_id,
        status=out.status,
        task_id=rec.task_id,
        attempts=rec.attempts,
        cost_usd=round(rec.attempts * unit_usd, 4),
        run_cost_usd=round(out.run_posts * unit_usd, 4),
        fail_code=out.fail_code,
        fail_msg=scrub(out.fail_msg) if out.fail_msg else None,
        cost_time_ms=out.cost_time_ms,
        video=stored.url if stored else None,
        bytes=stored.size if stored else None,
        sha256=stored.sha256 if stored else None,
        note=scrub("; ".join(notes)) or None,
        uncertain=plan.uncertain or out.uncertain,
        ledger_behind=out.ledger_behind,
        **video_facts(item, stored),
    )


def with_spend(result: ItemResult, usd: float) -> ItemResult:
    """`result` with `usd` more spent by this run (POSTs a part of it made)."""
    if usd <= 0:
        return result
    return result.model_copy(update={"run_cost_usd": round(result.run_cost_usd + usd, 4)})


def video_facts(item: ManifestItem, stored: StoredObject | None) -> dict[str, Any]:
    """Duration and resolution of a verified video, and a warning if it is not what was paid."""
    info = stored.info if stored is not None else None
    return paid_for_facts(info, str(item.mode), item.duration)
