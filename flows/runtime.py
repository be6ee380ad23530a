"""What the tasks of one flow run share, and how they reach it.

The `Runtime` (settings, apixo client, output store, thread limiter) is opened once per run from
the options and the blocks they name, and handed to tasks through a context variable rather
than as a task parameter: Prefect walks every parameter of every task call, and the runtime
holds clients and growing dicts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from prefect import get_run_logger

from hailuo_batch.apixo import ApixoClient, TaskStatus
from hailuo_batch.callbacks import CallbackStore
from hailuo_batch.netguard import GuardedTransport
from hailuo_batch.options import RunOptions
from hailuo_batch.settings import Settings, check_output_url
from hailuo_batch.storage import OutputStore

T = TypeVar("T")
_CURRENT: ContextVar[Runtime] = ContextVar("hailuo_batch_runtime")


async def blocking(
    fn: Callable[..., T], *args: Any, limiter: anyio.CapacityLimiter | None = None
) -> T:
    """Run a blocking call (the sync apixo client, fsspec) in a worker thread."""
    return await anyio.to_thread.run_sync(fn, *args, limiter=limiter)


@dataclass
class Runtime:
    """Settings, client, store and the thread limiter of one flow run."""

    settings: Settings
    client: ApixoClient
    store: OutputStore
    limiter: anyio.CapacityLimiter
    # callback mode: the secret callback URL (never a parameter, log line or result), the
    # delivery store, and what the watcher has seen so far
    callback_url: str | None = None
    callbacks: CallbackStore | None = None
    events: dict[str, asyncio.Event] = field(default_factory=dict)
    delivered: dict[str, TaskStatus] = field(default_factory=dict)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await blocking(fn, *args, limiter=self.limiter)

    def scrub(self, text: str) -> str:
        """`text` without the API key, the callback token or any signed URL's signature."""
        scrub = getattr(self.client, "scrub", None)
        return scrub(text) if callable(scrub) else text

    def log(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        """A run log line, scrubbed of secrets."""
        get_run_logger().log(level, self.scrub(msg % args if args else msg))


def runtime() -> Runtime:
    """The runtime of the flow run this task belongs to."""
    return _CURRENT.get()


async def open_store(
    output: str | None, storage_block: str | None, settings: Settings
) -> OutputStore:
    """The output store: `output`, else the OutputStorage block's URL, else HAILUO_OUTPUT; with
    the block's S3 options whenever a block is named."""
    if not storage_block:
        return OutputStore(check_output_url(output or settings.output))
    from blocks.apixo import OutputStorage

    block: OutputStorage = await OutputStorage.aload(storage_block)  # type: ignore[assignment]
    return block.get_store(output)


async def open_client(credentials_block: str | None, settings: Settings) -> ApixoClient:
    """The run's apixo client: the ApixoCredentials block's key and URL, else the environment's.

    Result URLs may point anywhere, so downloads go through the same private-address guard as
    image checks; a submit's 429 reaches the run's limiter at once instead of being retried.
    """
    kwargs: dict[str, Any] = {
        "download_transport": GuardedTransport(allow_private=settings.allow_private_networks),
        "retry_rate_limited_submits": False,
    }
    if not credentials_block:
        return settings.apixo_client(**kwargs)
    from blocks.apixo import ApixoCredentials

    creds: ApixoCredentials = await ApixoCredentials.aload(credentials_block)  # type: ignore[assignment]
    return creds.get_client(settings, **kwargs)


@asynccontextmanager
async def open_runtime(options: RunOptions, settings: Settings) -> AsyncIterator[Runtime]:
    """The run's runtime, current for its tasks until the run ends; a missing key or a bad
    output fails here, before anything is paid."""
    client = await open_client(options.credentials_block, settings)
    try:
        store = await open_store(options.output, options.storage_block, settings)
        # threads for blocking calls: one per item in flight plus a few for checks and reports
        rt = Runtime(settings, client, store, anyio.CapacityLimiter(options.concurrency + 4))
        token = _CURRENT.set(rt)
        try:
            yield rt
        finally:
            _CURRENT.reset(token)
    finally:
        client.close()


@asynccontextmanager
async def running(*jobs: Callable[[], Coroutine[Any, Any, Any]]) -> AsyncIterator[None]:
    """Run `jobs` in the background while the body runs; they are cancelled when it ends.

    An anyio task group: a job that fails ends the body too, and nothing outlives the run. A
    single error comes out as itself, not wrapped in an exception group.
    """
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
