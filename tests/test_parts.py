"""Parts: a large batch in child runs, finished without any item running twice at once."""

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


class Boom(Exception):
    """A child run's machinery failing (not an item's own trouble)."""


def test_every_item_runs_once_and_results_come_in_manifest_order() -> None:
    seen: list[int] = []

    async def one(i: ManifestItem) -> ItemResult:
        await asyncio.sleep(0.001 * (7 - i.row % 7))  # finish out of order
        seen.append(i.row)
        return ItemResult(id=i.id, row=i.row, status=ItemStatus.SUCCEEDED)

    async def main() -> list[ItemResult]:
        parts = Parts([item(r) for r in range(1, 11)], 4, one)
        assert [len(p) for p in parts.parts] == [4, 4, 2]
        assert await asyncio.gather(*(parts.run_left(k) for k in range(3))) == [4, 4, 2]
        assert [await parts.run_left(k) for k in range(3)] == [0, 0, 0]  # nothing left
        return await parts.in_order()

    results = asyncio.run(main())
    assert [r.row for r in results] == list(range(1, 11)) and sorted(seen) == list(range(1, 11))
    with pytest.raises(ValueError):
        Parts([], 0, one)


@settings(max_examples=100, deadline=None)
@given(crash_at=st.lists(st.integers(0, 11), min_size=1, max_size=4), size=st.integers(1, 12))
def test_a_failed_part_is_finished_without_running_an_item_twice_at_once(
    crash_at: list[int], size: int
) -> None:
    """A child run fails after some items started (its other items go on, orphaned); the part
    is run again until nothing is left: every item ends with one result, and no item is ever
    started while an earlier start of it is still going."""
    going: set[int] = set()
    starts: list[int] = []
    crashes = list(crash_at)

    async def one(i: ManifestItem) -> ItemResult:
        assert i.row not in going, f"item {i.row} started twice at once"
        going.add(i.row)
        starts.append(i.row)
        try:
            if crashes and len(starts) - 1 == crashes[0]:
                crashes.pop(0)
                raise Boom
            await asyncio.sleep(0.001 * (i.row % 3))
            return ItemResult(id=i.id, row=i.row, status=ItemStatus.SUCCEEDED)
        finally:
            going.discard(i.row)

    async def main() -> list[ItemResult]:
        parts = Parts([item(r) for r in range(12)], size, one)
        for k in range(len(parts.parts)):
            while True:
                try:
                    await parts.run_left(k)
                    if not parts.left(k):
                        break
                except Boom:
                    pass
                await asyncio.sleep(0.001)  # the orphaned items of a failed attempt go on
        while True:  # an orphan that failed too is run again at the end
            try:
                return await parts.in_order()
            except Boom:
                await asyncio.sleep(0.001)

    results = asyncio.run(main())
    assert [r.row for r in results] == list(range(12))
