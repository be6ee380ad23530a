"""A large batch cut into parts, each run as a child flow run, without any item run twice.

No Prefect here: the flow starts the child runs; this keeps which items were started, so a part
whose child run failed (the Prefect server refusing it under load, say) is finished by starting
only the items never started. An item's runner that raises gets `on_error`'s result: it is never
started again in the same run (a second start could POST it twice).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hailuo_batch.manifest import ManifestItem
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
