"""Shrink the Prefect server's in-memory event queues, for tests only.

Put this directory on PYTHONPATH of a `prefect server start` process with
HAILUO_TEST_BROKER_QUEUE=N in its environment: every subscription of the server's in-memory
messaging (`prefect.server.utilities.messaging.memory.Subscription`) then gets a queue of N
messages instead of 10,000, and past N the server drops messages ("Subscription queue is full")
exactly as it does past 10,000 in production. A test can then reach, with a few hundred items,
the overload a 5,000-item batch used to cause.

The patch is applied when the module is first imported (an import hook, so nothing of Prefect is
imported at interpreter start-up). Without the variable this file does nothing. The server
prints "hailuo test broker: subscription queues of N messages" once the patch is applied, and
"hailuo test broker: events/TaskRunRecorder queue peak D" each time a subscription's queue
reaches a new tenth of N ("... queue full: dropping" the first time it drops a message).
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

TARGET = "prefect.server.utilities.messaging.memory"


def _consumer_name() -> str:
    """Which service is subscribing: the class of the nearest caller that has a `self` from the
    server's services (TaskRunRecorder, EventPersister, ...), else 'other'."""
    frame = sys._getframe(2)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and ".services." in type(owner).__module__:
            return type(owner).__name__
        frame = frame.f_back
    return "other"


def _patch(module: ModuleType, size: int) -> None:
    cls = module.Subscription
    original_init, original_deliver = cls.__init__, cls.deliver
    step = max(1, size // 10)
    peaks: dict[str, int] = {}

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._queue = asyncio.Queue(maxsize=size)
        self._hailuo_label = f"{self.topic.name}/{_consumer_name()}"

    async def deliver(self: Any, message: Any) -> None:
        label = self._hailuo_label
        if self._queue.full() and peaks.get(label, 0) <= size:
            peaks[label] = size + 1  # said once per subscription
            print(f"hailuo test broker: {label} queue full: dropping", file=sys.stderr, flush=True)
        await original_deliver(self, message)
        depth = self._queue.qsize()
        if depth // step > min(peaks.get(label, 0), size) // step:  # a new tenth of the queue
            print(f"hailuo test broker: {label} queue peak {depth}", file=sys.stderr, flush=True)
        peaks[label] = max(peaks.get(label, 0), depth)

    cls.__init__ = __init__
    cls.deliver = deliver
    print(
        f"hailuo test broker: subscription queues of {size} messages", file=sys.stderr, flush=True
    )


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, size: int) -> None:
        self.inner, self.size = inner, size

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _patch(module, self.size)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, size: int) -> None:
        self.size = size

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once, and let the normal finders find the module
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self.size)
        return spec


def _install() -> None:
    raw = os.environ.get("HAILUO_TEST_BROKER_QUEUE", "").strip()
    if not raw:
        return
    size = int(raw)
    if size < 1:
        raise ValueError(f"HAILUO_TEST_BROKER_QUEUE must be at least 1, not {raw!r}")
    sys.meta_path.insert(0, _Finder(size))


_install()
