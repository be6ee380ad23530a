"""In-process progress listeners: the CLI shows a bar while the flow runs in the same process."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

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
