"""A run's progress: counts of finished items, pushed to the run's progress artifact, its item
table and in-process listeners (the CLI shows a bar while the flow runs in the same process)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hailuo_batch.results import ItemResult

Listener = Callable[["ProgressState"], None]
_listeners: list[Listener] = []


@dataclass
class ProgressState:
    total: int
    done: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    run_id: str | None = None

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else self.done / self.total

    def line(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.by_status.items()))
        return f"{self.done}/{self.total} items done ({counts or 'none yet'})"


def add_listener(fn: Listener) -> None:
    _listeners.append(fn)


def remove_listener(fn: Listener) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def notify(state: ProgressState) -> None:
    for fn in list(_listeners):
        fn(state)


class Progress:
    """Counts finished items; pushes the share done (at most every 2 s, and at the end), logs
    every tenth, tells the listeners and, every `table_every_s` seconds and 5% of the items
    while items finish, hands the results so far (by row) to `table`, so a person sees reasons
    during a long run."""

    def __init__(
        self,
        total: int,
        run_id: str,
        *,
        push: Callable[[float], Awaitable[object]] | None = None,
        table: Callable[[list[ItemResult]], Awaitable[object]] | None = None,
        table_every_s: float = 10.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.state = ProgressState(total=total, run_id=run_id)
        self.results: list[ItemResult] = []
        self._push, self._table, self._log = push, table, log
        self._table_every_s = table_every_s
        self._last_push = 0.0
        self._last_table = time.monotonic()
        self._table_done = 0
        notify(self.state)

    async def finished(self, result: ItemResult) -> None:
        state = self.state
        state.done += 1
        state.by_status[str(result.status)] += 1
        self.results.append(result)
        notify(state)
        now = time.monotonic()
        if self._push and (now - self._last_push > 2 or state.done == state.total):
            self._last_push = now
            await self._push(100.0 * state.fraction)
        if self._log and state.done % max(1, state.total // 10) == 0:
            self._log(f"progress: {state.line()}")
        # at most 20 versions while the run goes, each after another 5% of the items: every
        # version holds every row so far, so a version per time tick alone would cost
        # O(items^2) over a long batch (and flood the Prefect server); the final table comes
        # with the report
        if (
            self._table
            and now - self._last_table > self._table_every_s
            and state.done - self._table_done >= max(1, state.total // 20)
            and state.done < state.total
        ):
            self._last_table, self._table_done = now, state.done
            await self._table(sorted(self.results, key=lambda r: r.row))
