"""What the tasks of one flow run share: the `Runtime`, opened once per run, reached through a
context variable (Prefect walks every task parameter; the runtime holds clients)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from prefect import get_run_logger
from prefect.states import Completed, Failed

from blocks.apixo import open_client, open_store
from hailuo_batch.apixo import ApixoClient, RequestType
from hailuo_batch.callbacks import CallbackWaiter, callback_mode
from hailuo_batch.jobs import blocking
from hailuo_batch.options import RunOptions
from hailuo_batch.pacing import RecorderLag, StatsBoard
from hailuo_batch.policy import PollSchedule
from hailuo_batch.polling import load_stats, stats_board
from hailuo_batch.review import MAX_CARDS
from hailuo_batch.settings import Settings
from hailuo_batch.storage import OutputStore

T = TypeVar("T")
_CURRENT: ContextVar[Runtime] = ContextVar("hailuo_batch_runtime")


@dataclass
class Runtime:
    """Settings, client, store and the thread limiter of one flow run."""

    settings: Settings
    client: ApixoClient
    store: OutputStore
    limiter: anyio.CapacityLimiter
    board: StatsBoard  # generation times seen so far: they plan the status reads
    recorder: RecorderLag  # how far the Prefect server's records are behind this run
    # callback mode: the secret callback URL (never a parameter, log line or result) and the
    # waiter that reads deliveries and wakes the items
    callback_url: str | None = None
    waiter: CallbackWaiter | None = None
    # videos still to get their poster as they are downloaded: as many as the review page shows
    # (its posters then need no second read of the video); the page makes any it still lacks
    posters_left: int = MAX_CARDS

    def take_poster(self) -> bool:
        """Whether the video about to be downloaded gets its poster in the same pass."""
        if self.posters_left <= 0:
            return False
        self.posters_left -= 1
        return True

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await blocking(fn, *args, limiter=self.limiter)

    def scrub(self, text: str) -> str:
        """`text` without the API key, the callback token or any signed URL's signature."""
        scrub = getattr(self.client, "scrub", None)
        return scrub(text) if callable(scrub) else text

    def log(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        """A run log line, scrubbed of secrets."""
        get_run_logger().log(level, self.scrub(msg % args if args else msg))

    def warn(self, msg: str) -> None:
        self.log(msg, level=logging.WARNING)


#: what a run's state message adds for something a person must see even when every item
#: made it (the balance fell by more than the run estimated)
WARNING_MARK = "; WARNING: "


def end_state(completed: bool, name: str | None, message: str | None, data: Any) -> Any:
    """A flow's return: `data` itself when all went well and nothing is to be said, else a
    state named `name` with its message."""
    # a plain value comes back to the caller as is; a returned State's data can be dropped when
    # the server answers the state proposal with its own state
    if completed and name == "Completed" and WARNING_MARK not in (message or ""):
        return data
    return (Completed if completed else Failed)(name=name, message=message, data=data)


def runtime() -> Runtime:
    """The runtime of the flow run this task belongs to."""
    return _CURRENT.get()


@asynccontextmanager
async def open_runtime(options: RunOptions, settings: Settings) -> AsyncIterator[Runtime]:
    """The run's runtime, current for its tasks until the run ends; a missing key or a bad
    output fails here, before anything is paid."""
    client = await open_client(options.credentials_block, settings)
    try:
        store = await open_store(options.output, options.storage_block, settings)
        # threads for blocking calls: one per item in flight plus a few for checks and reports
        limiter = anyio.CapacityLimiter(options.concurrency + 4)
        earlier = await blocking(load_stats, store, limiter=limiter)
        board = stats_board(earlier, PollSchedule.from_settings(settings))
        rt = Runtime(settings, client, store, limiter, board, RecorderLag(settings.max_record_lag))
        if options.request_type == RequestType.CALLBACK:
            rt.callback_url, rt.waiter = callback_mode(
                settings, add_secret=client.add_secret, blocking=rt.blocking, warn=rt.warn
            )
            get_run_logger().info(
                "callback mode: deliveries read from %s; backstop status poll every %.0f s",
                rt.waiter.store.url,
                settings.callback_backstop_s,
            )
        token = _CURRENT.set(rt)
        try:
            yield rt
        finally:
            _CURRENT.reset(token)
    finally:
        client.close()
