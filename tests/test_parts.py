"""Parts: a large batch in child runs, finished without any item started twice."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hailuo_batch.apixo import Mode, Provider
from hailuo_batch.manifest import ManifestItem
from hailuo_batch.parts import Parts
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
