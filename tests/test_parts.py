"""Parts: a large batch in child runs, finished without any item started twice."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hailuo_batch.apixo import Mode, Provider
from hailuo_batch.budget import Budget
from hailuo_batch.ledger import LedgerRecord, LedgerState
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.parts import (
    Parts,
    Placement,
    cap_left,
    item_key,
    part_concurrency,
    part_items,
    part_share,
    place_parts,
    spent_at_most,
    watch_child,
)
from hailuo_batch.results import ItemResult, ItemStatus


def item(row: int) -> ManifestItem:
    return ManifestItem(
        id=f"i{row}", row=row, image_url="https://x.example/a.jpg", prompt="p",
        mode=Mode.STANDARD, duration=6, provider=Provider.AUTO,
    )  # fmt: skip


def failed(i: ManifestItem, exc: Exception) -> ItemResult:
    return ItemResult(id=i.id, row=i.row, status=ItemStatus.FAILED, fail_code="INTERNAL_ERROR")


class Boom(Exception):
    """A child run's machinery failing (not an item's own trouble)."""


def test_every_item_runs_once_and_results_come_in_manifest_order() -> None:
    seen: list[int] = []

    async def one(i: ManifestItem) -> ItemResult:
        await asyncio.sleep(0.001 * (7 - i.row % 7))  # finish out of order
        seen.append(i.row)
        return ItemResult(id=i.id, row=i.row, status=ItemStatus.SUCCEEDED)

    async def main() -> list[ItemResult]:
        parts = Parts([item(r) for r in range(1, 11)], 4, one, failed)
        assert [len(p) for p in parts.parts] == [4, 4, 2]
        assert await asyncio.gather(*(parts.run_left(k) for k in range(3))) == [4, 4, 2]
        assert [await parts.run_left(k) for k in range(3)] == [0, 0, 0]  # nothing left
        return await parts.in_order()

    results = asyncio.run(main())
    assert [r.row for r in results] == list(range(1, 11)) and sorted(seen) == list(range(1, 11))
    with pytest.raises(ValueError):
        Parts([], 0, one, failed)


@settings(max_examples=100, deadline=None)
@given(
    crash_at=st.lists(st.integers(0, 11), max_size=4),
    child_fails=st.lists(st.booleans(), max_size=8),
    size=st.integers(1, 12),
)
def test_failed_child_runs_and_failing_items_never_start_an_item_twice(
    crash_at: list[int], child_fails: list[bool], size: int
) -> None:
    """Child runs fail at random (after starting some of their items, which go on); items'
    runners raise at random after they started. Every item ends with exactly one result, a
    raising one as INTERNAL_ERROR, and no item is ever started twice (a second start could
    POST it twice)."""
    starts: list[int] = []

    async def one(i: ManifestItem) -> ItemResult:
        n = len(starts)
        starts.append(i.row)
        await asyncio.sleep(0.001 * (i.row % 3))
        if n in crash_at:
            raise Boom
        return ItemResult(id=i.id, row=i.row, status=ItemStatus.SUCCEEDED)

    async def child(parts: Parts, k: int, fail: bool) -> None:
        run = asyncio.ensure_future(parts.run_left(k))
        if fail:  # the child run dies; what it started goes on, orphaned
            await asyncio.sleep(0)
            return
        await run

    async def main() -> list[ItemResult]:
        parts = Parts([item(r) for r in range(12)], size, one, failed)
        fails = iter(child_fails)
        await asyncio.gather(
            *(child(parts, k, next(fails, False)) for k in range(len(parts.parts)))
        )
        return await parts.in_order()

    results = asyncio.run(main())
    assert [r.row for r in results] == list(range(12))
    assert sorted(starts) == list(range(12))  # each started exactly once
    crashed = {starts[n] for n in crash_at if n < len(starts)}
    assert {r.row for r in results if r.status == ItemStatus.FAILED} == crashed


# --- parts on the work pool's workers ------------------------------------------------------------


def place(n: int = 3, **kw: object) -> Placement:
    given = {"deployment": "generate-videos-part/generate-videos-part", "deployed": True,
             "found": True, "local_paths": []}  # fmt: skip
    return place_parts(n, **{**given, **kw})  # type: ignore[arg-type]


def test_parts_go_to_the_workers_only_when_every_worker_can_reach_the_run() -> None:
    assert place().on_workers
    assert "on the workers of 'generate-videos-part/generate-videos-part'" in place().why
    for kw, said in [
        ({"deployment": ""}, "HAILUO_PART_DEPLOYMENT is empty"),
        ({"deployed": False}, "not started from a deployment"),
        ({"found": False}, "no deployment 'generate-videos-part/generate-videos-part'"),
        ({"local_paths": ["/data/m.csv"]}, "local paths other workers may not see: /data/m.csv"),
        ({"dry_run": True}, "a dry run submits nothing"),
    ]:
        p = place(**kw)
        assert not p.on_workers and said in p.why and "in this run's process" in p.why
    assert not place(1).on_workers


def test_a_part_gets_what_is_free_of_the_cap_up_to_its_cost() -> None:
    """$1 over parts of $0.50 items: the first part may buy two, as an unsplit run would, not
    each part a third of a dollar that buys nothing."""
    assert part_share(1.0, 1.0) == 1.0 and part_share(1.0, 0.0) == 0.0
    assert part_share(0.5, 1.7) == 0.5 and part_share(2.0, 1.2) == 1.2
    assert part_share(3.0, None) is None and part_share(1.0, -0.5) == 0.0


def test_a_part_has_room_for_resubmissions_that_leaves_the_later_parts_their_cost() -> None:
    """A $100 cap over a $0.19 part: the part may resubmit its item twice, as an unsplit run
    would (its share was $0.19: one POST, and a transient failure ended the item failed). A
    tight cap still gives every later part its own cost first."""
    assert part_share(0.19, 100.0, later_cost=5.0, resubmits=2) == pytest.approx(0.57)
    assert part_share(1.0, 3.0, later_cost=2.0, resubmits=2) == 1.0  # tight: its cost only
    assert part_share(1.0, 3.5, later_cost=2.0, resubmits=2) == 1.5  # what the others leave
    assert part_share(1.0, 0.5, later_cost=2.0, resubmits=2) == 0.5


@given(
    cost=st.floats(0, 50, allow_nan=False), free=st.floats(-5, 200, allow_nan=False),
    later=st.floats(0, 100, allow_nan=False), resubmits=st.integers(0, 10),
)  # fmt: skip
def test_a_share_never_passes_what_is_free_nor_falls_below_what_the_part_costs(
    cost: float, free: float, later: float, resubmits: int
) -> None:
    share = part_share(cost, free, later_cost=later, resubmits=resubmits)
    assert share is not None
    assert share <= max(0.0, free) + 1e-9
    assert share >= min(cost, max(0.0, free)) - 1e-9
    assert share <= cost * (1 + resubmits) + 1e-9
    if free - later >= cost:  # the later parts' costs are still free after this one
        assert free - share >= later - 1e-9


@given(concurrency=st.integers(1, 500), n=st.integers(1, 60))
def test_child_runs_together_never_have_more_in_flight_than_the_run(
    concurrency: int, n: int
) -> None:
    each, at_once = part_concurrency(concurrency, n)
    assert each >= 1 and 1 <= at_once <= n
    assert each * at_once <= concurrency
    if concurrency >= n:  # enough slots: every part at once, the slots shared
        assert at_once == n and each == concurrency // n


def rec(run_id: str, attempts: int) -> LedgerRecord:
    return LedgerRecord(
        id="x", input_hash="h", state=LedgerState.SUBMITTED, attempts=attempts, run_id=run_id
    )


def test_what_a_failed_child_may_have_spent_is_bounded_from_above() -> None:
    records = [
        (rec("R-part-2", 2), 0.3),  # written last by the child: every POST recorded
        (rec("R-part-1", 5), 0.3),  # another part's: not this child's
        (None, 0.3),  # never touched
        (OSError("unreadable"), 0.5),  # unknown: the most a run may POST
    ]
    assert spent_at_most(records, "R-part-2", max_posts=3) == pytest.approx(0.6 + 1.5)
    assert cap_left(2.0, 2.1) == 0.0 and cap_left(2.0, 0.5) == 1.5 and cap_left(None, 9) is None


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), cap=st.floats(0, 20, allow_nan=False))
def test_children_and_the_parent_finishing_their_parts_never_spend_past_the_cap(
    data: st.DataObject, n: int, cap: float
) -> None:
    """Parts start in order, each handed what is free of the cap up to its cost; a child
    spends within its share (its own Budget; its POSTs go to the ledger, whose attempts may
    include earlier runs'), then either reports (what it reserved comes back, less its spend)
    or crashes without results (the parent takes back the share less what the ledger says it
    may have spent). The parent then finishes the crashed parts, submitting while its budget
    allows. Whatever the order, the total never passes the run's cap."""
    unit = st.sampled_from([0.19, 0.32, 0.45])
    parent = Budget(cap_usd=cap)
    total = 0.0
    costs = [sum(data.draw(st.lists(unit, min_size=1, max_size=8))) for _ in range(n)]
    resubmits = data.draw(st.integers(0, 3))
    for k, cost in enumerate(costs):
        free = parent.cap_usd - parent.spent_usd
        share = part_share(cost, free, later_cost=sum(costs[k + 1 :]), resubmits=resubmits)
        parent.spent_usd += share or 0.0
        child = Budget(cap_usd=share)
        records = []
        for price in [data.draw(unit) for _ in range(data.draw(st.integers(0, 10)))]:
            if child.reserve(price) is None:
                total += price
                earlier = data.draw(st.integers(0, 2))  # POSTs of earlier runs on the item
                records.append((rec(f"R-part-{k + 1}", 1 + earlier), price))
        if data.draw(st.booleans()):  # reported: its summary's spent_usd
            parent.refund(cap_left(share, child.spent_usd) or 0.0)
        else:  # crashed without results: the parent takes over from the ledger
            spent = spent_at_most(records, f"R-part-{k + 1}", max_posts=3)
            parent.refund(cap_left(share, spent) or 0.0)
    for price in data.draw(st.lists(unit, max_size=40)):  # the parent finishing parts
        if parent.reserve(price) is None:
            total += price
    assert total <= cap + 1e-6


def test_results_from_a_child_run_elsewhere_count_as_started() -> None:
    async def one(i: ManifestItem) -> ItemResult:
        raise AssertionError(f"row {i.row} ran again")

    async def main() -> list[ItemResult]:
        parts = Parts([item(r) for r in range(6)], 3, one, failed)
        done = [ItemResult(id=f"i{r}", row=r, status=ItemStatus.SUCCEEDED) for r in range(6)]
        parts.take(0, done)  # part 0's rows only (0-2)
        assert parts.left(0) == [] and [i.row for i in parts.left(1)] == [3, 4, 5]
        wrong_id = ItemResult(id="other", row=3, status=ItemStatus.SUCCEEDED)
        taken = parts.take(1, [wrong_id, *done[4:], done[0]])  # row 3 under another id is
        assert [r.row for r in taken] == [4, 5]  # not row 3's result; row 0 is not part 1's
        assert [i.row for i in parts.left(1)] == [3]
        parts.take(1, done[3:4])
        return await parts.in_order()

    assert [r.row for r in asyncio.run(main())] == list(range(6))


def watch(state: str | None, **kw: float | bool) -> str:
    given: dict[str, float | bool] = {
        "ever_running": False, "waited_s": 0.0, "running_for_s": 0.0, "lease_alive": True,
        "start_timeout_s": 180.0, "lease_ttl_s": 120.0,
    }  # fmt: skip
    return watch_child(state, **{**given, **kw})  # type: ignore[arg-type]


def test_the_parent_waits_for_a_child_run_and_notices_one_that_never_started_or_died() -> None:
    for final in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert watch(final, waited_s=999, running_for_s=999, lease_alive=False) == "ended"
    # never running in time (no worker, or infrastructure that never came up): taken over
    for waiting in (None, "SCHEDULED", "PENDING"):
        assert watch(waiting, waited_s=179) == "wait"
        assert watch(waiting, waited_s=181) == "cancel"
    # once seen running, never cancelled: cancelling, paused, awaiting a retry, or running
    for later in ("CANCELLING", "PAUSED", "SCHEDULED", "PENDING"):
        assert watch(later, ever_running=True, waited_s=9999) == "wait"
    running = {"ever_running": True, "waited_s": 9999}
    assert watch("RUNNING", **running, running_for_s=3600, lease_alive=True) == "wait"
    # its process is gone without a word: no live lease long after it started running
    assert watch("RUNNING", **running, running_for_s=239, lease_alive=False) == "wait"
    assert watch("RUNNING", **running, running_for_s=241, lease_alive=False) == "dead"
    # so is one stuck cancelling or paused whose process is gone
    assert watch("CANCELLING", **running, running_for_s=241, lease_alive=False) == "dead"
    assert watch("PAUSED", **running, running_for_s=241, lease_alive=True) == "wait"


def test_a_child_runs_exactly_the_rows_the_parent_read() -> None:
    items = [item(r) for r in range(5)]
    keys = [item_key(i) for i in items]
    assert part_items(items, [1, 3], [keys[1], keys[3]]) == [items[1], items[3]]
    changed = [*items[:3], items[3].model_copy(update={"prompt": "edited"}), items[4]]
    with pytest.raises(ValueError, match=r"rows \[3\] changed"):
        part_items(changed, [1, 3], [keys[1], keys[3]])
    with pytest.raises(ValueError, match=r"rows \[7\] changed"):  # gone
        part_items(items, [7], ["i7#0"])


def test_a_part_runs_results_are_found_from_the_run_id_its_records_carry() -> None:
    from hailuo_batch.parts import part_folder, part_run_id, results_folder

    assert results_folder("20261125T1Z-ab") == "20261125T1Z-ab"
    for k in (0, 1, 11):
        assert results_folder(part_run_id("20261125T1Z-ab", k)) == part_folder("20261125T1Z-ab", k)
    assert results_folder("x-part-0") == "x-part-0" and results_folder("-part-3") == "-part-3"
    assert results_folder("x-part-two") == "x-part-two"
