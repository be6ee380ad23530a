"""A large batch cut into parts, each run as a child flow run, without any item run twice.

No Prefect here: the flow starts the child runs; this keeps which items were started, so a part
whose child run failed (the Prefect server refusing it under load, say) is finished by starting
only the items never started. An item's runner that raises gets `on_error`'s result: it is never
started again in the same run (a second start could POST it twice).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from hailuo_batch.ledger import LedgerRecord
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.options import BatchOptions
from hailuo_batch.results import ItemResult

ItemRunner = Callable[[ManifestItem], Awaitable[ItemResult]]


class Parts:
    """`items` in parts of at most `size`, run with `one`; results kept by manifest row."""

    def __init__(
        self,
        items: list[ManifestItem],
        size: int,
        one: ItemRunner,
        on_error: Callable[[ManifestItem, Exception], ItemResult],
    ) -> None:
        if size < 1:
            raise ValueError("a part holds at least one item")
        self.parts = [items[k : k + size] for k in range(0, len(items), size)]
        self._one, self._on_error = one, on_error
        self.results: dict[int, ItemResult] = {}
        self.started: set[int] = set()
        self._going = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def left(self, part: int) -> list[ManifestItem]:
        """The items of `part` never started."""
        return [i for i in self.parts[part] if i.row not in self.started]

    async def _run(self, item: ManifestItem) -> None:
        self.started.add(item.row)
        self._going += 1
        self._idle.clear()
        try:
            self.results[item.row] = await self._one(item)
        except Exception as exc:  # noqa: BLE001 - recorded as the item's result, never rerun
            self.results[item.row] = self._on_error(item, exc)
        finally:
            self._going -= 1
            if not self._going:
                self._idle.set()

    def take(self, part: int, results: list[ItemResult]) -> list[ItemResult]:
        """Results of `part` a child run elsewhere produced: their items count as started here
        (a result for a row outside the part, for another id, or for a row already started, is
        not taken); returns those taken."""
        ids = {i.row: i.id for i in self.parts[part]}
        taken = []
        for r in results:
            if ids.get(r.row) == r.id and r.row not in self.started:
                self.started.add(r.row)
                self.results[r.row] = r
                taken.append(r)
        return taken

    async def run_left(self, part: int) -> int:
        """Start what was never started of `part` and wait for it; returns how many items."""
        todo = self.left(part)
        await asyncio.gather(*(self._run(i) for i in todo))
        return len(todo)

    async def in_order(self) -> list[ItemResult]:
        """Every item's result in manifest order, once no item is under way any more (items a
        failed child run never started are started here)."""
        for part in range(len(self.parts)):
            await self.run_left(part)
        await self._idle.wait()
        return [self.results[i.row] for part in self.parts for i in part]


# --- parts on the work pool's workers ------------------------------------------------------------


class PartJob(BaseModel):
    """What a child run on a worker needs to run its part of a large batch by itself: the
    manifest (read again there), the rows that are its part, its options (with its share of
    the run's cap and concurrency), and the run's force and resubmit_lost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: str
    options: BatchOptions
    rows: list[int] = []
    # each row's `item_key` as the parent read it: the child runs a row only if it reads the same
    row_keys: list[str] = []
    force: bool = False
    resubmit_lost: bool = False
    rerun: bool = False  # the batch is a rerun that chose its items (`RunState.chosen`)


def item_key(item: ManifestItem) -> str:
    """A row as the parent read it: its id and a digest of its inputs."""
    return f"{item.id}#{item.input_hash[:16]}"


def part_items(items: list[ManifestItem], rows: list[int], keys: list[str]) -> list[ManifestItem]:
    """The items of a part, from a fresh read of the manifest: exactly `rows`, each read as the
    parent read it; ValueError naming the first rows that changed or are gone."""
    by_row = {i.row: i for i in items}
    changed = [
        r for r, k in zip(rows, keys, strict=True) if r not in by_row or item_key(by_row[r]) != k
    ]
    if changed or len(rows) != len(keys):
        raise ValueError(f"rows {changed[:10]} changed since the batch read the manifest")
    return [by_row[r] for r in rows]


def part_run_id(run_id: str, part: int) -> str:
    """The run id (ledger records, lease) of part `part` (from 0) of run `run_id`."""
    return f"{run_id}-part-{part + 1}"


def part_folder(run_id: str, part: int) -> str:
    """Where, under `runs/`, a part run on a worker leaves its results for the parent."""
    return f"{run_id}/parts/{part + 1}"


def results_folder(run_id: str) -> str:
    """Where, under `runs/`, the run that wrote a ledger record as `run_id` left its results:
    its own folder, or a part's folder under its batch run (`part_run_id`)."""
    batch, sep, number = run_id.rpartition("-part-")
    if sep and batch and number.isdigit() and int(number) > 0:
        return part_folder(batch, int(number) - 1)
    return run_id


@dataclass(frozen=True)
class Placement:
    """Where a large run's parts go: `on_workers` (child runs of the part deployment, started
    by the work pool's workers) or in the run's own process; `why` says which and why."""

    on_workers: bool
    why: str


def place_parts(
    n_parts: int,
    *,
    deployment: str,
    deployed: bool,
    found: bool,
    local_paths: list[str],
    dry_run: bool = False,
) -> Placement:
    """Child runs go to the workers only when every one of them can reach what the run reads
    and writes: the run came from a deployment (so a work pool exists), the part deployment
    exists, and neither the manifest nor the output is a local path (on another machine a
    local output would be another ledger: items paid twice)."""
    here = "in this run's process"
    if n_parts < 2:
        return Placement(False, "one part")
    if dry_run:
        return Placement(False, f"{n_parts} parts {here} (a dry run submits nothing)")
    if not deployment:
        return Placement(False, f"{n_parts} parts {here} (HAILUO_PART_DEPLOYMENT is empty)")
    if not deployed:
        return Placement(
            False, f"{n_parts} parts {here} (this run was not started from a deployment)"
        )
    if not found:
        return Placement(False, f"{n_parts} parts {here} (no deployment {deployment!r})")
    if local_paths:
        listed = ", ".join(local_paths)
        return Placement(
            False, f"{n_parts} parts {here} (local paths other workers may not see: {listed})"
        )
    return Placement(True, f"{n_parts} parts on the workers of {deployment!r}")


def part_share(
    cost: float, free: float | None, *, later_cost: float = 0.0, resubmits: int = 0
) -> float | None:
    """A part's spending cap when it starts (None: no cap): what is free of the run's cap, up
    to the part's estimated cost; and beyond it, room for the transient resubmissions an
    unsplit run may pay from its cap (`resubmits` more POSTs per item), out of what the later
    parts' own estimates (`later_cost`) leave free. Parts start in manifest order, so the cap
    goes to them as an unsplit run spends it on its items; what a child did not spend comes
    back before later parts start."""
    if free is None:
        return None
    base = max(0.0, min(cost, free))
    return max(base, min(cost * (1 + resubmits), free - later_cost))


def cap_left(share: float | None, spent_at_most: float) -> float | None:
    """What is left of a part's cap once its child run ended without results: the share less
    an upper bound of what the child may have spent (never below 0)."""
    return None if share is None else max(0.0, share - spent_at_most)


def spent_at_most(
    records: Iterable[tuple[LedgerRecord | Exception | None, float]],
    child_id: str,
    *,
    max_posts: int,
) -> float:
    """An upper bound of what the child run `child_id` spent, from the ledger records of its
    part's items (each with its unit price) read once it ended: every POST recorded for an item
    it wrote last (any run's: more, never less), and `max_posts` POSTs for a record that could
    not be read."""
    spent = 0.0
    for rec, unit in records:
        if isinstance(rec, Exception):
            spent += unit * max_posts
        elif rec is not None and rec.run_id == child_id:
            spent += unit * rec.attempts
    return spent


ChildStep = Literal["wait", "ended", "cancel", "dead"]
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def watch_child(
    state: str | None,
    *,
    ever_running: bool,
    waited_s: float,
    running_for_s: float,
    lease_alive: bool,
    start_timeout_s: float,
    lease_ttl_s: float,
) -> ChildStep:
    """What the parent does about a child run on a worker, from its state type: "ended" (a
    final state), "cancel" (never seen running after `start_timeout_s`: no worker took it, or
    its infrastructure never came up), "dead" (running for twice a lease's life and holding no
    live lease: its process is gone and nobody said so), else "wait". Past "cancel" or "dead"
    the parent finishes the part only once it holds the part's claim (`Ledger.claim_part`),
    which a child that starts late, or still lives, keeps from it."""
    if state in FINAL_STATES:
        return "ended"
    if not ever_running:
        return "cancel" if waited_s > start_timeout_s else "wait"
    # seen running: running, or cancelling, paused, awaiting a retry; never cancelled by us
    if running_for_s > 2 * lease_ttl_s and not lease_alive:
        return "dead"
    return "wait"


def part_concurrency(concurrency: int, n_parts: int) -> tuple[int, int]:
    """(each child run's `concurrency`, how many child runs at once): the run's bound shared, so
    that the children together never have more items in flight than the run was allowed (with
    fewer slots than parts, the parts run a few at a time)."""
    at_once = max(1, min(n_parts, concurrency))
    return max(1, concurrency // at_once), at_once
