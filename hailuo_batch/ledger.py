"""The durable per-item ledger that makes runs crash-safe and resumable. No Prefect.

Layout in the output store:

- `ledger/{id}.json`: the item's latest state (`LedgerRecord`), rewritten atomically at every
  transition: `submitting` is written *before* the POST, `submitted` (with the taskId) right
  after it answers, then `succeeded` / `stored` / `failed` / `skipped`.
- `claims/{id}.json`: created exclusively (local `O_EXCL`, S3 `If-None-Match: *`) by the run
  working on the item, deleted when it is done, so two runs never submit the same item at once.
- `leases/{run_id}.json`: a run's heartbeat. A claim whose run has not beaten for
  `lease_ttl_s` belongs to a dead run and may be taken over.

The only window the ledger cannot close is a crash between the provider accepting a POST and
the `submitted` record being written: the record then still says `submitting`, and the next
run reports the item as uncertain (and resubmits it or holds it, per `HAILUO_UNCERTAIN_POLICY`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel

from hailuo_batch.storage import OutputStore

UncertainPolicy = Literal["resubmit", "hold"]


class LedgerState(StrEnum):
    SUBMITTING = "submitting"  # a POST may be under way: no taskId known yet
    NOT_SUBMITTED = "not_submitted"  # the POST was refused: no task exists
    SUBMITTED = "submitted"  # the provider accepted it: taskId known
    SUCCEEDED = "succeeded"  # the task succeeded; the video is not stored yet
    STORED = "stored"  # the video is in the store
    FAILED = "failed"
    SKIPPED = "skipped"
    UNCERTAIN = "uncertain"  # the POST's outcome is unknown


TERMINAL = {LedgerState.FAILED, LedgerState.SKIPPED}


class LedgerRecord(BaseModel):
    id: str
    input_hash: str
    state: LedgerState
    task_id: str | None = None
    task_ids: list[str] = []
    attempts: int = 0
    fail_code: str | None = None
    fail_msg: str | None = None
    video: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    cost_time_ms: int | None = None
    run_id: str | None = None
    updated_at: str | None = None


@dataclass(frozen=True)
class Plan:
    """What a run does with an item, given its ledger record.

    action: "submit" (never submitted, changed, forced or uncertain-resubmit), "poll" (a taskId
    is known: poll it, never resubmit), "done" (stored: verify, do not download again),
    "cached" (a final failure from an earlier run), "hold" (uncertain, left for a person).
    """

    action: Literal["submit", "poll", "done", "cached", "hold"]
    note: str | None = None
    uncertain: bool = False
    attempts: int = 0


def plan_item(
    record: LedgerRecord | None,
    input_hash: str,
    *,
    force: bool = False,
    uncertain_policy: UncertainPolicy = "resubmit",
) -> Plan:
    """Decide how to resume one item. A plain function: every branch is unit-tested."""
    if record is None:
        return Plan("submit")
    if record.input_hash != input_hash:
        return Plan(
            "submit",
            note=f"inputs changed since run {record.run_id} (was {record.input_hash[:12]}); "
            "treated as a new item",
        )
    prior = record.attempts
    if record.state == LedgerState.STORED:
        return Plan("done", note=f"already stored by run {record.run_id}", attempts=prior)
    if record.state in (LedgerState.SUBMITTED, LedgerState.SUCCEEDED):
        return Plan(
            "poll", note=f"resumed task {record.task_id} of run {record.run_id}", attempts=prior
        )
    if record.state in (LedgerState.SUBMITTING, LedgerState.UNCERTAIN):
        note = (
            f"run {record.run_id} may have submitted it without recording a taskId "
            "(possible duplicate charge)"
        )
        if force or uncertain_policy == "resubmit":
            return Plan("submit", note=note + "; resubmitted", uncertain=True, attempts=prior)
        return Plan(
            "hold",
            note=note + "; held (HAILUO_UNCERTAIN_POLICY=hold)",
            uncertain=True,
            attempts=prior,
        )
    if record.state in TERMINAL:
        if force:
            return Plan("submit", note=f"rerun of {record.state} item", attempts=prior)
        return Plan("cached", note=f"final in run {record.run_id}", attempts=prior)
    return Plan("submit", attempts=prior)  # NOT_SUBMITTED: nothing was created


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Ledger:
    """Per-item records, claims and run leases in an `OutputStore`."""

    def __init__(self, store: OutputStore, run_id: str, *, lease_ttl_s: float = 120.0) -> None:
        self.store = store
        self.run_id = run_id
        self.lease_ttl_s = lease_ttl_s

    # --- records ---------------------------------------------------------------------------
    def get(self, item_id: str) -> LedgerRecord | None:
        key = f"ledger/{item_id}.json"
        try:
            return LedgerRecord.model_validate_json(self.store.read_text(key))
        except FileNotFoundError:
            return None

    def put(self, record: LedgerRecord) -> LedgerRecord:
        record = record.model_copy(update={"run_id": self.run_id, "updated_at": _now()})
        self.store.write_text_atomic(f"ledger/{record.id}.json", record.model_dump_json())
        return record

    # --- leases ----------------------------------------------------------------------------
    def heartbeat(self) -> None:
        body = json.dumps({"run_id": self.run_id, "beat": time.time()})
        self.store.write_text_atomic(f"leases/{self.run_id}.json", body)

    def end_lease(self) -> None:
        self.store.delete(f"leases/{self.run_id}.json")

    def lease_alive(self, run_id: str) -> bool:
        try:
            beat = json.loads(self.store.read_text(f"leases/{run_id}.json"))["beat"]
        except (FileNotFoundError, ValueError, KeyError):
            return False
        return time.time() - float(beat) < self.lease_ttl_s

    # --- claims ----------------------------------------------------------------------------
    def claim(self, item_id: str) -> str | None:
        """Claim the item for this run. Returns None when claimed, else the live owner's run id.

        A claim left by a run whose lease has expired (a crashed run) is taken over.
        """
        key = f"claims/{item_id}.json"
        body = json.dumps({"run_id": self.run_id, "at": _now()})
        for _ in range(3):
            if self.store.create_exclusive(key, body.encode()):
                return None
            try:
                owner = json.loads(self.store.read_text(key))["run_id"]
            except FileNotFoundError:
                continue  # released in between: try again
            except (ValueError, KeyError):
                owner = None
            if owner == self.run_id:
                return None
            if owner is not None and self.lease_alive(owner):
                return str(owner)
            # stale: the owner is gone. Remove and race for it again through create_exclusive.
            self.store.delete(key)
        return "unknown (claim contended)"

    def release(self, item_id: str) -> None:
        self.store.delete(f"claims/{item_id}.json")
