"""The durable per-item ledger that makes runs crash-safe and resumable. No Prefect.

Layout in the output store:

- `ledger/{id}.json`: the item's latest state (`LedgerRecord`), rewritten atomically at every
  transition: `submitting` is written *before* the POST, `submitted` (with the taskId) right
  after it answers, then `succeeded` / `stored` / `failed` / `skipped`.
- `ledger/earlier/{id}/{input_hash}.json`: the record of the item's earlier inputs, kept when a
  run of other inputs (an edited row, a rerun with another duration) replaces it, so that going
  back to those inputs pays for nothing they already have.
- `claims/{id}.json`: created exclusively (local `O_EXCL`, S3 `If-None-Match: *`) by the run
  working on the item, deleted when it is done, so two runs never submit the same item at once.
- `leases/{run_id}.json`: a run's heartbeat, with the TTL it was written under. A claim whose
  run has not beaten for that TTL (or the reader's own, whichever is longer) belongs to a dead
  run and may be taken over.

The only window the ledger cannot close is a crash between the provider accepting a POST and
the `submitted` record being written: the record then still says `submitting`, and the next
run reports the item as uncertain (and resubmits it or holds it, per `HAILUO_UNCERTAIN_POLICY`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel

from hailuo_batch.storage import OutputStore, video_key

if TYPE_CHECKING:
    from hailuo_batch.manifest import ManifestItem

UncertainPolicy = Literal["resubmit", "hold"]
T = TypeVar("T")


class LedgerState(StrEnum):
    SUBMITTING = "submitting"  # a POST may be under way: no taskId known yet
    NOT_SUBMITTED = "not_submitted"  # the POST was refused: no task exists
    SUBMITTED = "submitted"  # the provider accepted it: taskId known
    SUCCEEDED = "succeeded"  # the task succeeded; the video is not stored yet
    STORED = "stored"  # the video is in the store
    FAILED = "failed"
    SKIPPED = "skipped"
    UNCERTAIN = "uncertain"  # the POST's outcome is unknown
    LOST = "lost"  # the provider no longer knows the task (404) or never ended it (timeout)


TERMINAL = {LedgerState.FAILED, LedgerState.SKIPPED}
#: states in which a task exists (or existed) that may have been paid for and whose video is
#: not stored
PAID_NOT_STORED = {LedgerState.SUBMITTED, LedgerState.SUCCEEDED, LedgerState.LOST}


class LedgerRecord(BaseModel):
    id: str
    input_hash: str
    state: LedgerState
    task_id: str | None = None
    task_ids: list[str] = []
    attempts: int = 0  # POSTs that may have cost money, over every run (the results' cost)
    # resubmissions after a transient failCode since the item's last forced run: what
    # HAILUO_TRANSIENT_MAX_RESUBMITS bounds. POSTs of unknown outcome are not counted here (each
    # is reported uncertain by its run), so they never use up the resubmission a failure needs
    resubmits: int = 0
    # a POST was sent while an earlier one's outcome was unknown: the item may have been paid
    # for twice, and every later run that reports on it says so
    possible_duplicate: bool = False
    fail_code: str | None = None
    fail_msg: str | None = None
    video: str | None = None
    video_key: str | None = None  # where this record's video is (or goes) in the store
    bytes: int | None = None
    sha256: str | None = None
    # what the stored video is, and what in it is not the clip paid for (a resumed run's
    # results keep them)
    result: str | None = None  # what names the stored video's source (`steps.result_identity`)
    video_duration_s: float | None = None
    video_resolution: str | None = None
    warning: str | None = None
    cost_time_ms: int | None = None
    run_id: str | None = None
    updated_at: str | None = None


def stored_key(record: LedgerRecord) -> str:
    """The store key of a record's video (records written before `video_key` existed used the
    item's plain key)."""
    return record.video_key or video_key(record.id)


@dataclass(frozen=True)
class Plan:
    """What a run does with an item, given its ledger record.

    action: "submit" (never submitted, changed, forced or uncertain-resubmit), "poll" (a taskId
    is known: poll it, never resubmit), "done" (stored: verify, do not download again),
    "cached" (a final failure from an earlier run), "hold" (uncertain, left for a person).
    keep_video: the key of a paid video of *other* inputs under this id: never overwrite it.
    resubmits: the transient resubmissions the item has already used (`policy.after_failure`):
    the record's count, or 0 in a forced run: a rerun is the user's decision to pay again for
    the item, and it gets the whole budget, as a first run does.
    """

    action: Literal["submit", "poll", "done", "cached", "hold"]
    note: str | None = None
    uncertain: bool = False
    attempts: int = 0
    keep_video: str | None = None
    resubmits: int = 0


def plan_item(
    record: LedgerRecord | None,
    input_hash: str,
    *,
    force: bool = False,
    uncertain_policy: UncertainPolicy = "resubmit",
    resubmit_lost: bool = False,
    not_forced: Callable[[str | None], str | None] | None = None,
) -> Plan:
    """Decide how to resume one item. A plain function: every branch is unit-tested.

    `not_forced(fail_code)`, when given, says why `force` must not resubmit a failed or
    skipped item (`policy.not_forced_again`); a rerun that chose its items itself leaves it
    out."""
    if record is None:
        return Plan("submit")
    if record.input_hash != input_hash:
        kept = stored_key(record) if record.state == LedgerState.STORED else None
        note = (
            f"inputs changed since run {record.run_id} (was {record.input_hash[:12]}); "
            "treated as a new item"
        )
        if kept:
            note += f"; the earlier video stays at {record.video or kept}"
        elif record.state in PAID_NOT_STORED and record.task_ids:
            # never forget a task that was (or may have been) paid for: say so, loudly
            note += (
                f"; the earlier inputs' task(s) {', '.join(record.task_ids)} ended "
                f"{record.state} without a stored video and may have been paid for: their ids "
                "stay in the ledger's task_ids"
            )
        elif record.state in (LedgerState.SUBMITTING, LedgerState.UNCERTAIN):
            note += (
                f"; run {record.run_id} may have paid for the earlier inputs without recording "
                "a taskId (possible charge)"
            )
        return Plan("submit", note=note, keep_video=kept)
    plan = _plan_same_inputs(
        record, force=force, uncertain_policy=uncertain_policy, resubmit_lost=resubmit_lost,
        not_forced=not_forced,
    )  # fmt: skip
    if record.possible_duplicate and not plan.uncertain:  # said by every run, not only one
        note = "; ".join(
            n for n in (plan.note, "resubmitted once while an earlier POST's outcome was "
                        "unknown (possible duplicate charge)") if n
        )  # fmt: skip
        plan = replace(plan, uncertain=True, note=note)
    return replace(plan, attempts=record.attempts, resubmits=0 if force else record.resubmits)


def plan_in_batch(
    record: LedgerRecord | None,
    input_hash: str,
    *,
    part_runs: Collection[str],
    force: bool = False,
    uncertain_policy: UncertainPolicy = "resubmit",
    resubmit_lost: bool = False,
    not_forced: Callable[[str | None], str | None] | None = None,
) -> Plan:
    """`plan_item` for a run finishing the parts its child runs left (`part_runs`: their run
    ids). A record one of them wrote is this batch's own decision and stands: no forced rerun of
    what it failed or skipped, no resubmission of what it may have paid for (held and reported
    uncertain), no new task for a task it lost. What it never submitted is submitted."""
    if record is None or record.run_id not in part_runs:
        return plan_item(
            record, input_hash, force=force, uncertain_policy=uncertain_policy,
            resubmit_lost=resubmit_lost, not_forced=not_forced,
        )  # fmt: skip
    plan = plan_item(record, input_hash, uncertain_policy="hold")
    if plan.action == "submit" and record.state != LedgerState.NOT_SUBMITTED:
        note = f"part run {record.run_id} left it {record.state} with other inputs; held"
        return replace(plan, action="hold", note=note, uncertain=True)
    return plan


def _plan_same_inputs(
    record: LedgerRecord,
    *,
    force: bool,
    uncertain_policy: UncertainPolicy,
    resubmit_lost: bool,
    not_forced: Callable[[str | None], str | None] | None,
) -> Plan:
    """`plan_item` for a record of the same inputs (attempts and resubmits are set by it)."""
    if record.state == LedgerState.STORED:
        return Plan("done", note=f"already stored by run {record.run_id}")
    if record.state in (LedgerState.SUBMITTED, LedgerState.SUCCEEDED):
        return Plan("poll", note=f"resumed task {record.task_id} of run {record.run_id}")
    if record.state in (LedgerState.SUBMITTING, LedgerState.UNCERTAIN):
        note = (
            f"run {record.run_id} may have submitted it without recording a taskId "
            "(possible duplicate charge)"
        )
        if force or uncertain_policy == "resubmit":
            return Plan("submit", note=note + "; resubmitted", uncertain=True)
        return Plan("hold", note=note + "; held (HAILUO_UNCERTAIN_POLICY=hold)", uncertain=True)
    if record.state == LedgerState.LOST:
        if resubmit_lost:
            lost_how = (
                "did not end within the wait (it may still end and be billed)"
                if record.fail_code == "POLL_TIMEOUT"  # steps.POLL_TIMEOUT (steps imports this)
                else "is gone at the provider"
            )
            return Plan(
                "submit",
                note=f"task {record.task_id} {lost_how}; resubmitted (possible duplicate charge)",
                uncertain=True,
            )
        return Plan(
            "poll",
            note=f"task {record.task_id} was lost in run {record.run_id}: read again "
            "(--resubmit-lost pays for a new task)",
        )
    if record.state in TERMINAL:
        why = not_forced(record.fail_code) if force and not_forced is not None else None
        if force and why is None:
            return Plan("submit", note=f"rerun of {record.state} item")
        if why is not None:
            return Plan(
                "cached",
                note=f"final in run {record.run_id}: {why} (force leaves it; "
                "`hailuo-batch rerun --fail-code CODE` resubmits it once its input is fixed)",
            )
        return Plan("cached", note=f"final in run {record.run_id}")
    return Plan("submit")  # NOT_SUBMITTED: nothing was created


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class LedgerUnavailable(OSError):
    """The output store did not take a ledger, claim or lease write, even after retries."""


class LedgerCorrupt(LedgerUnavailable):
    """A ledger record exists but does not parse."""


#: pauses between attempts of one ledger/claim/lease call when the store fails (about 8 s in all)
STORE_RETRY_DELAYS_S: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 4.0)


def with_retries(
    fn: Callable[[], T],
    what: str,
    *,
    delays: Sequence[float] = STORE_RETRY_DELAYS_S,
    sleep: Callable[[float], None] = time.sleep,
    write: bool = False,
) -> T:
    """Call `fn`, retrying any storage failure after each of `delays`; then `LedgerUnavailable`.

    FileNotFoundError is an answer to a read ("no such record"), not a failure, and passes
    through at once; to a `write` it is a failure like any other (a bucket or folder that
    disappeared, perhaps for a moment).
    """
    last: Exception | None = None
    for pause in (*delays, None):
        try:
            return fn()
        except FileNotFoundError as exc:
            if not write:
                raise
            last = exc
        except Exception as exc:  # noqa: BLE001 - s3fs/botocore/OS errors of every kind
            last = exc
        if pause is None:
            break
        sleep(pause)
    raise LedgerUnavailable(
        f"{what} failed {len(delays) + 1} times: {type(last).__name__}: {last}"
    ) from last


class Ledger:
    """Per-item records, claims and run leases in an `OutputStore`.

    Every call retries storage failures (`STORE_RETRY_DELAYS_S`) and then raises
    `LedgerUnavailable`, so a storage blip costs a few seconds, not a run.
    """

    def __init__(
        self,
        store: OutputStore,
        run_id: str,
        *,
        lease_ttl_s: float = 120.0,
        retry_delays_s: Sequence[float] = STORE_RETRY_DELAYS_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.lease_ttl_s = lease_ttl_s
        self.retry_delays_s = tuple(retry_delays_s)
        self._sleep = sleep
        self.last_beat: float | None = None  # time.monotonic() of the last renewal that stuck

    def _retry(self, fn: Callable[[], T], what: str, *, write: bool = False) -> T:
        return with_retries(fn, what, delays=self.retry_delays_s, sleep=self._sleep, write=write)

    # --- records ---------------------------------------------------------------------------
    def get(self, item_id: str) -> LedgerRecord | None:
        """The item's record; None if it has none. A record that does not parse raises
        `LedgerCorrupt`: the item may have been paid for, so it is never taken as absent."""
        return self._read(f"ledger/{item_id}.json")

    def _read(self, key: str) -> LedgerRecord | None:
        try:
            text = self._retry(lambda: self.store.read_text(key), f"reading {key}")
        except FileNotFoundError:
            return None
        try:
            return LedgerRecord.model_validate_json(text)
        except ValueError as exc:
            raise LedgerCorrupt(
                f"{self.store.url_for(key)} is not a ledger record ({type(exc).__name__}); "
                "the item is left alone: check or delete that file, then run again"
            ) from None

    def earlier(self, item_id: str, input_hash: str) -> LedgerRecord | None:
        """The record the item's inputs `input_hash` left when its inputs changed (`keep`), or
        None. A record that does not parse raises `LedgerCorrupt`, as `get` does."""
        return self._read(f"ledger/earlier/{item_id}/{input_hash}.json")

    def records_for(
        self, item_id: str, input_hash: str
    ) -> tuple[LedgerRecord | None, LedgerRecord | None]:
        """The item's record, and the record to plan these inputs on: the same one, or, when
        it is of other inputs, the one these inputs left earlier (if any; else the other
        inputs' record, which `plan_item` reports as changed inputs). An earlier record whose
        video was never stored loses its `video_key`: that key was only reserved in the ledger,
        and the other inputs may have stored their video there since."""
        current = self.get(item_id)
        if current is None or current.input_hash == input_hash:
            return current, current
        rec = self.earlier(item_id, input_hash)
        if rec is None:
            return current, current
        if rec.state != LedgerState.STORED:
            rec = rec.model_copy(update={"video_key": None})
        return current, rec

    def record_for(self, item_id: str, input_hash: str) -> LedgerRecord | None:
        """The record to plan these inputs on (`records_for`)."""
        return self.records_for(item_id, input_hash)[1]

    def keep(self, record: LedgerRecord) -> None:
        """Keep `record`, about to be replaced by a record of the item's other inputs, under
        `ledger/earlier/{id}/{input_hash}.json`: when the manifest goes back to those inputs,
        what they were paid for and how they ended (stored, skipped for content, failed,
        uncertain) still stands, and nothing is paid again."""
        self._write(f"ledger/earlier/{record.id}/{record.input_hash}.json", record)

    def put(self, record: LedgerRecord) -> LedgerRecord:
        record = record.model_copy(update={"run_id": self.run_id, "updated_at": _now()})
        self._write(f"ledger/{record.id}.json", record)
        return record

    def _write(self, key: str, record: LedgerRecord) -> None:
        body = record.model_dump_json()
        self._retry(lambda: self.store.write_text_atomic(key, body), f"writing {key}", write=True)

    # --- leases ----------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Renew this run's lease (with retries); remember when it last stuck."""
        body = json.dumps({"run_id": self.run_id, "beat": time.time(), "ttl": self.lease_ttl_s})
        key = f"leases/{self.run_id}.json"
        self._retry(lambda: self.store.write_text_atomic(key, body), f"renewing {key}", write=True)
        self.last_beat = time.monotonic()

    def lease_fresh(self, now: float | None = None) -> bool:
        """Whether this run may still act as the owner of its claims: its last renewal is
        recent enough that no other run can have judged the lease expired (a quarter of the
        TTL is kept as a safety margin for clocks and slow writes)."""
        if self.last_beat is None:
            return False
        now = time.monotonic() if now is None else now
        return now - self.last_beat < self.lease_ttl_s * 0.75

    def end_lease(self) -> None:
        self._retry(lambda: self.store.delete(f"leases/{self.run_id}.json"), "ending lease")

    def lease_alive(self, run_id: str) -> bool:
        """Whether `run_id` renewed its lease within its TTL: the longer of the TTL it wrote
        into its lease and this run's own, so a run started with a shorter
        `HAILUO_LEASE_TTL_S` never takes the items of a live run that beats less often."""
        try:
            text = self._retry(
                lambda: self.store.read_text(f"leases/{run_id}.json"), "reading a lease"
            )
            lease = json.loads(text)
            beat = float(lease["beat"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False
        return time.time() - beat < max(self.lease_ttl_s, _written_ttl(lease))

    # --- claims ----------------------------------------------------------------------------
    def claim(self, item_id: str) -> str | None:
        """Claim the item for this run. Returns None when claimed, else the live owner's run id.

        A claim left by a run whose lease has expired (a crashed run) is taken over.
        """
        return self._claim(f"claims/{item_id}.json")

    def claim_part(self, name: str) -> str | None:
        """Claim a part of a large batch (`name`: `parts.part_run_id`) for this run, as `claim`
        does an item: the child run that runs it, or the parent that finishes it, never both.
        Kept when the run ends (its lease ends, so another run may take it over)."""
        return self._claim(f"claims/parts/{name}.json")

    def part_owner(self, name: str) -> str | None:
        """The run id in a part's claim (`claim_part`); "" when none, None when unreadable."""
        return self._owner(f"claims/parts/{name}.json")

    def _claim(self, key: str) -> str | None:
        body = json.dumps({"run_id": self.run_id, "at": _now()}).encode()
        for _ in range(3):
            create = partial(self.store.create_exclusive, key, body)
            if self._retry(create, f"claiming {key}", write=True):
                return None
            owner, seen = self._claim_of(key)
            if owner == "":
                continue  # released in between: try again
            if owner == self.run_id:
                return None
            if owner is not None and self.lease_alive(owner):
                return owner
            # stale: the owner is gone. Remove that very claim (not one another run put there
            # since: two runs taking over the same stale claim must not both win) and race for
            # the item again through create_exclusive.
            self._retry(partial(self.store.delete_if_unchanged, key, seen), f"removing stale {key}")
        return "unknown (claim contended)"

    def owner(self, item_id: str) -> str | None:
        """The run id in the item's claim; "" when there is no claim, None when unreadable."""
        return self._owner(f"claims/{item_id}.json")

    def _owner(self, key: str) -> str | None:
        return self._claim_of(key)[0]

    def _claim_of(self, key: str) -> tuple[str | None, bytes]:
        """The run id in the claim at `key` ("" when there is none, None when unreadable) and
        the claim's bytes."""
        try:
            data = self._retry(lambda: self.store.read_bytes(key), f"reading {key}")
        except FileNotFoundError:
            return "", b""
        try:
            owner = json.loads(data)["run_id"]
        except (ValueError, KeyError, TypeError):
            return None, data
        return (owner if isinstance(owner, str) else None), data

    def still_ours(self, item_id: str, expected: LedgerRecord | None) -> str | None:
        """Checked immediately before every POST: None when this run still owns the item and
        its ledger record is the one this run last saw, else why not to submit."""
        if not self.lease_fresh():
            return "this run's lease could not be renewed in time; another run may own the item"
        owner = self.owner(item_id)
        if owner != self.run_id:
            return f"the item's claim now belongs to {owner or 'nobody'}"
        current = self.get(item_id)
        if _fingerprint(current) != _fingerprint(expected):
            who = current.run_id if current is not None else "someone"
            return f"the item's ledger record was changed by run {who}"
        return None

    def release(self, item_id: str) -> None:
        """Drop this run's claim on the item; a claim another run took over is left alone."""
        if self.owner(item_id) != self.run_id:
            return
        self._retry(lambda: self.store.delete(f"claims/{item_id}.json"), "releasing a claim")


def _written_ttl(lease: dict[str, Any]) -> float:
    """The TTL a lease was written under; 0 when it has none (leases of earlier versions) or
    not a usable one."""
    ttl = lease.get("ttl")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        return 0.0
    return max(0.0, float(ttl))


def _fingerprint(rec: LedgerRecord | None) -> tuple[object, ...] | None:
    if rec is None:
        return None
    return (rec.state, rec.task_id, rec.attempts, rec.run_id, rec.updated_at)


Blocking = Callable[..., Awaitable[Any]]


async def keep_lease(
    ledger: Ledger,
    *,
    blocking: Blocking,
    warn: Callable[[str], None],
    lapsed: Callable[[str], None],
) -> None:
    """Renew the run's lease every eighth of its TTL until cancelled.

    A failed renewal is warned about and tried again on the next beat. Once the lease could
    have lapsed, `lapsed` is told why (the run stops submitting; other runs may take its items).
    """
    while True:
        await asyncio.sleep(max(0.5, ledger.lease_ttl_s / 8))
        try:
            await blocking(ledger.heartbeat)
        except Exception as exc:  # noqa: BLE001 - whatever the store says, the run goes on
            warn(f"lease renewal failed, trying again: {exc}")
        if not ledger.lease_fresh():
            lapsed(
                f"the run's lease could not be renewed for {ledger.lease_ttl_s * 0.75:.0f} s "
                "(output store unreachable?): stopped submitting so that no other run pays "
                "for the same items"
            )


async def claim_or_wait(ledger: Ledger, item_id: str, blocking: Blocking) -> str | None:
    """Claim the item; while another run holds it, try again for up to one lease period (a
    crashed run's claim goes stale in that time). None: claimed; else the live owner."""
    ttl = ledger.lease_ttl_s
    deadline = time.monotonic() + ttl + 1
    owner: str | None = await blocking(ledger.claim, item_id)
    while owner is not None and time.monotonic() < deadline:
        await asyncio.sleep(min(2.0, ttl / 4))
        owner = await blocking(ledger.claim, item_id)
    return owner


def stored_intact(store: OutputStore, rec: LedgerRecord) -> bool:
    """The stored video is there with the bytes the ledger recorded (size, then sha256)."""
    key = stored_key(rec)
    if not store.exists(key) or store.size(key) != rec.bytes:
        return False
    return rec.sha256 is None or store.sha256(key) == rec.sha256


def refetch_key(rec: LedgerRecord, current: LedgerRecord | None, *, taken: bool) -> str | None:
    """Where `rec`'s stored video, found missing or damaged, is fetched again: its own key,
    unless `rec` is an earlier record of other inputs than the item's `current` one and that
    key is now the current record's, or holds other bytes (`taken`: `stored_intact` failed);
    then None, and a free key is chosen. Its video was deleted, the other inputs stored theirs
    under the freed name since: fetching it there again would overwrite another paid video."""
    if current is None or current.input_hash == rec.input_hash:  # its own key: its own copy
        return rec.video_key
    return None if taken or stored_key(rec) == stored_key(current) else rec.video_key


def may_be_behind(rec: LedgerRecord) -> bool:
    """Whether `rec` may be behind what its run did after the POST: a POST was sent, and no
    task is recorded (`task_from_results` looks in that run's results)."""
    return rec.task_id is None and rec.state in (LedgerState.SUBMITTING, LedgerState.UNCERTAIN)


def task_from_results(
    rec: LedgerRecord, results: Iterable[Any], video_key_of: Callable[[str], str | None]
) -> LedgerRecord | None:
    """What the results file of the run that wrote `rec` knows and its ledger does not, or
    None. A run whose ledger writes failed after the POST (the store refused them) still wrote
    the task into its results (`ledger_behind`); the record stayed `submitting`, and the next
    run would pay again. Here that task comes back: `submitted` (poll it) or, when that run
    stored the video, `succeeded` with its key and bytes (adopted by `stored_unrecorded`, if
    intact). `video_key_of` turns a stored video's URL into a key of this store (None: not
    one of this store's)."""
    if not may_be_behind(rec):
        return None
    for r in results:
        if r.id != rec.id or r.input_hash != rec.input_hash or not r.task_id:
            continue
        update: dict[str, Any] = {
            "state": LedgerState.SUBMITTED,
            "task_id": r.task_id,
            "task_ids": [*rec.task_ids, r.task_id]
            if r.task_id not in rec.task_ids
            else rec.task_ids,
        }
        key = video_key_of(r.video) if r.video and r.sha256 else None
        if r.status == "succeeded" and key is not None:
            update.update(
                state=LedgerState.SUCCEEDED, video_key=key, sha256=r.sha256, bytes=r.bytes,
                video_duration_s=r.video_duration_s, video_resolution=r.video_resolution,
                warning=r.warning,
            )  # fmt: skip
        return rec.model_copy(update=update)
    return None


def stored_unrecorded(
    store: OutputStore, rec: LedgerRecord, input_hash: str
) -> LedgerRecord | None:
    """The `stored` record of a video the store already holds for `rec` although the record
    never said so, or None. A run killed (or a ledger write that kept failing) between
    publishing the verified video and writing `stored` leaves the record `succeeded` (and, once
    the provider forgets the task, `lost`) with its `video_key` chosen: only verified bytes are
    ever published under a final name, and that key was free for this record's own task, so
    the video there is the item's. Adopting it costs nothing; polling or resubmitting costs a
    task the provider may no longer know, or a second payment. A record that once stored its
    video (it knows the bytes' sha256) adopts only those very bytes, never a damaged copy."""
    if (
        rec.input_hash != input_hash
        or rec.state not in (LedgerState.SUCCEEDED, LedgerState.LOST)
        or rec.video_key is None
        or not store.exists(rec.video_key)
    ):
        return None
    key = rec.video_key
    if rec.sha256 is not None:  # stored once: only those very bytes, never a damaged copy
        if not stored_intact(store, rec):
            return None
        size, sha = rec.bytes, rec.sha256
    else:
        size, sha = store.size(key), store.sha256(key)
    return rec.model_copy(
        update={
            "state": LedgerState.STORED,
            "video": store.url_for(key),
            "bytes": size,
            "sha256": sha,
            "fail_code": None,
            "fail_msg": None,
        }
    )


def planned_costs(
    ledger: Ledger,
    items: Iterable[ManifestItem],
    plan: Callable[[ManifestItem, LedgerRecord | None], Plan],
    unit_cost: Callable[[ManifestItem], float],
    seen: Callable[[LedgerRecord], None] | None = None,
) -> dict[int, float]:
    """Each item's estimated cost of what a run still has to submit, by manifest row
    (resume-aware: 0 for what is stored, polled or final). An item whose record cannot be read
    costs 0 here: it says so when it runs, and is never submitted blind. `seen` is shown each
    record read."""
    costs: dict[int, float] = {}
    for item in items:
        try:
            rec = ledger.record_for(item.id, item.input_hash)
            if rec is not None and seen is not None:
                seen(rec)
            submit = plan(item, rec).action == "submit"
        except LedgerUnavailable:
            submit = False
        costs[item.row] = unit_cost(item) if submit else 0.0
    return costs
