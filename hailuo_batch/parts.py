"""A large batch cut into parts, each run as a child flow run, without any item run twice.

No Prefect here: the flow starts the child runs; this keeps which items ended and which are
under way, so a part whose child run failed (the Prefect server refusing it under load, say) is
finished by running only the items that neither ended nor are still going.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hailuo_batch.manifest import ManifestItem
from hailuo_batch.results import ItemResult

ItemRunner = Callable[[ManifestItem], Awaitable[ItemResult]]


class Parts:
    """`items` in parts of at most `size`, run with `one`; results kept by manifest row."""

    def __init__(self, items: list[ManifestItem], size: int, one: ItemRunner) -> None:
        if size < 1:
            raise ValueError("a part holds at least one item")
        self.parts = [items[k : k + size] for k in range(0, len(items), size)]
        self._one = one
        self.results: dict[int, ItemResult] = {}
        self.going: set[int] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def left(self, part: int) -> list[ManifestItem]:
        """The items of `part` that have not ended and are not under way."""
        return [
            i for i in self.parts[part] if i.row not in self.results and i.row not in self.going
        ]

    async def _run(self, item: ManifestItem) -> ItemResult:
        self.going.add(item.row)
        self._idle.clear()
        try:
            result = self.results[item.row] = await self._one(item)
            return result
        finally:
            self.going.discard(item.row)
            if not self.going:
                self._idle.set()

    async def run_left(self, part: int) -> int:
        """Run what is left of `part`; returns how many items that was."""
        todo = self.left(part)
        await asyncio.gather(*(self._run(i) for i in todo))
        return len(todo)

    async def in_order(self) -> list[ItemResult]:
        """Every item's result in manifest order, once no item is under way any more (an item
        whose run failed outside its own troubles, in a failed child run, is run again)."""
        while True:
            await self._idle.wait()
            missing = [i for part in self.parts for i in part if i.row not in self.results]
            if not missing:
                return [self.results[i.row] for part in self.parts for i in part]
            await asyncio.gather(*(self._run(i) for i in missing if i.row not in self.going))
