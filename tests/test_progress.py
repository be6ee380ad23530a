"""A run's progress: what the progress artifact, the item table, the log and the CLI bar see."""

from __future__ import annotations

import asyncio

import pytest

from hailuo_batch.progress import Progress, ProgressState, add_listener, remove_listener
from hailuo_batch.results import ItemResult, ItemStatus


def result(row: int, status: ItemStatus = ItemStatus.SUCCEEDED) -> ItemResult:
    return ItemResult(id=f"i{row}", row=row, status=status)


@pytest.fixture
def seen():
    states: list[tuple[int, int]] = []

    def listener(state: ProgressState) -> None:
        states.append((state.done, state.total))

    add_listener(listener)
    yield states
    remove_listener(listener)


def test_a_run_reports_its_progress_while_items_finish(seen):
    pushed: list[float] = []
    tables: list[list[int]] = []
    logged: list[str] = []

    async def push(pct: float) -> None:
        pushed.append(pct)

    async def table(so_far: list[ItemResult]) -> None:
        tables.append([r.row for r in so_far])

    async def main() -> Progress:
        p = Progress(3, "run-1", push=push, table=table, table_every_s=0.0, log=logged.append)
        for row, status in ((3, ItemStatus.FAILED), (1, ItemStatus.SUCCEEDED), (2, "succeeded")):
            await asyncio.sleep(0.01)
            await p.finished(result(row, ItemStatus(status)))
        return p

    p = asyncio.run(main())
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]  # the CLI's bar: from the start to the end
    assert pushed[0] == pytest.approx(100 / 3) and pushed[-1] == 100.0
    assert tables == [[3], [1, 3]]  # by row while running; the last table comes with the report
    assert logged[-1] == "progress: 3/3 items done (failed 1, succeeded 2)"
    assert p.state.line() == logged[-1].removeprefix("progress: ")


def test_progress_pushes_at_most_every_two_seconds_but_always_at_the_end():
    pushed: list[float] = []

    async def push(pct: float) -> None:
        pushed.append(pct)

    async def main() -> None:
        p = Progress(50, "run-1", push=push)
        for row in range(50):
            await p.finished(result(row))

    asyncio.run(main())
    assert pushed == [2.0, 100.0]


def test_a_long_batch_publishes_at_most_twenty_partial_tables():
    """Each partial table holds every row so far: one per time tick would cost O(items^2) over
    a long batch; one per 5% of the items keeps the total rows published linear."""
    sizes: list[int] = []

    async def table(so_far: list[ItemResult]) -> None:
        sizes.append(len(so_far))

    async def main() -> None:
        p = Progress(1000, "run-1", table=table, table_every_s=0.0)
        for row in range(1000):
            await p.finished(result(row))

    asyncio.run(main())
    assert len(sizes) == 19 and sizes[0] == 50 and sizes[-1] == 950  # the last comes at the end
    assert sum(sizes) < 10 * 1000
