"""Results built from an item's outcome, plan or ledger record (`hailuo_batch.outcomes`)."""

from __future__ import annotations

from hailuo_batch.apixo import Mode, Provider
from hailuo_batch.ledger import LedgerRecord, LedgerState
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.outcomes import internal_error

ITEM = ManifestItem(
    id="a", row=3, image_url="https://example.com/a.jpg", prompt="p",
    mode=Mode.STANDARD, duration=6, provider=Provider.AUTO,
)  # fmt: skip


def test_an_internal_error_keeps_the_task_its_ledger_record_knows() -> None:
    """A bug after the POST must not erase the payment from the results: the task id, the
    POSTs and their cost come from the ledger record when it can be read."""
    rec = LedgerRecord(
        id="a", input_hash=ITEM.input_hash, state=LedgerState.SUBMITTED, task_id="t1",
        task_ids=["t1"], attempts=1,
    )  # fmt: skip
    r = internal_error(ITEM, "r1", OSError("boom"), str, rec, 0.19)
    assert (r.status, r.fail_code, r.task_id, r.attempts, r.cost_usd) == (
        "failed", "INTERNAL_ERROR", "t1", 1, 0.19,
    )  # fmt: skip
    assert "OSError: boom" in (r.fail_msg or "")
    # a record of other inputs is not this row's
    other = rec.model_copy(update={"input_hash": "other"})
    assert internal_error(ITEM, "r1", OSError("boom"), str, other, 0.19).task_id is None
    assert internal_error(ITEM, "r1", OSError("boom"), str).attempts == 0
