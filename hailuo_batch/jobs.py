"""How a run does its waiting work: blocking calls in worker threads, background jobs in an anyio
task group. No Prefect."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.to_thread

T = TypeVar("T")


async def blocking(
    fn: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None
) -> T:
    """Run a blocking call (the sync apixo client, fsspec) in a worker thread."""
    return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)


@asynccontextmanager
async def running(*jobs: Callable[[], Coroutine[Any, Any, Any]]) -> AsyncIterator[None]:
    """Run `jobs` in an anyio task group while the body runs, cancelled when it ends; a job's
    failure ends the body too, and a single error comes out unwrapped."""
    try:
        async with anyio.create_task_group() as group:
            for job in jobs:
                group.start_soon(job)
            try:
                yield
            finally:
                group.cancel_scope.cancel()
    except BaseExceptionGroup as errors:
        if len(errors.exceptions) == 1:
            raise errors.exceptions[0] from None
        raise
