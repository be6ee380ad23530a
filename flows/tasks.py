"""The Prefect tasks of an item's life and the run's API calls. They return typed outcomes
instead of raising for expected fates (Prefect prints a traceback for every task that raises),
take small parameters and reach the run's client and store through `runtime()`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import runtime
from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    ApixoError,
    AuthenticationError,
    GenerateRequest,
    NotFoundError,
    RequestType,
)
from hailuo_batch.apixo.errors import ApixoTransportError
from hailuo_batch.fetch import Stored, fetch_video
from hailuo_batch.manifest import ItemDefaults, Manifest, ManifestError, ManifestItem, load_manifest
from hailuo_batch.polling import PollResult, ticker_for, watch_task


@task(cache_policy=NO_CACHE)
async def read_manifest(url: str, defaults: ItemDefaults) -> Manifest | ManifestError:
    """Read and parse the manifest; bad rows come back as errors, a bad file as its
    `ManifestError` (returned, not raised: the run ends with that one clean message)."""
    rt = runtime()
    try:
        manifest = await rt.blocking(load_manifest, url, defaults, rt.store.storage_options or None)
    except ManifestError as exc:
        rt.log("manifest %s refused: %s", url, exc, level=logging.ERROR)
        return exc
    counts = (manifest.total_rows, len(manifest.items), len(manifest.errors))
    rt.log("manifest %s: %d rows, %d valid, %d row errors", url, *counts)
    return manifest


@dataclass
class Submitted:
    task_id: str | None
    error: ApixoError | None = None
    sent_at: float = 0.0  # the clock just before the POST: a task's generation starts there


@task(task_run_name="submit-{item.id}", cache_policy=NO_CACHE)
async def submit_item(
    item: ManifestItem, request: GenerateRequest, may_retry: Callable[[], bool] | None = None
) -> Submitted:
    """POST one generation task. Exactly one POST per call; the client retries only what it
    can prove was not created, and reports an ambiguous outcome instead of paying twice. A retry
    is sent only while `may_retry()` holds (the run's lease is fresh)."""
    rt = runtime()
    if rt.callback_url is not None:
        request = request.model_copy(
            update={"request_type": RequestType.CALLBACK, "callback_url": rt.callback_url}
        )
    sent_at = time.monotonic()
    try:
        task_id = await rt.blocking(partial(rt.client.submit, request, may_retry=may_retry))
    except AmbiguousSubmitError as exc:  # not "not submitted": the task may exist, and cost
        rt.log("item %s may have been submitted (and billed): %s", item.id, exc,
               level=logging.WARNING)  # fmt: skip
        return Submitted(None, exc, sent_at)
    except ApixoError as exc:
        rt.log("item %s not submitted: %s", item.id, exc, level=logging.WARNING)
        return Submitted(None, exc, sent_at)
    get_run_logger().info("item %s submitted as %s", item.id, task_id)
    return Submitted(task_id, sent_at=sent_at)


@task(task_run_name="poll-{item.id}-{task_id}", cache_policy=NO_CACHE)
async def poll_item(
    item: ManifestItem, task_id: str, immediate: bool = False, sent_at: float | None = None
) -> PollResult:
    """Wait for the task's end (`polling.watch_task`): reads planned from the generation times
    seen so far, or woken by a callback. One task run per item, not a Prefect retry per read."""
    rt = runtime()
    return await watch_task(
        task_id,
        lambda t: rt.blocking(rt.client.get_status, t),
        ticker_for(
            task_id, rt.board, rt.waiter, rt.settings.callback_backstop_s, sent_at, immediate
        ),
        not_found_grace_s=rt.settings.not_found_grace_s,
        warn=partial(rt.log, level=logging.WARNING),
        scrub=rt.scrub,
    )


async def store_video(item: ManifestItem, result_url: str, key: str, sweep: bool = False) -> Stored:
    """Fetch the result into `key`, verified (`fetch.fetch_video`), retried after
    `store_retry_delay_s` and 5x that. Not a task run: an item's submit and poll are."""
    rt = runtime()
    d = rt.settings.store_retry_delay_s

    def log(msg: str) -> None:
        rt.log("item %s: %s", item.id, msg, level=logging.WARNING)

    out = await fetch_video(
        rt.client, rt.store, result_url, key,
        sweep=sweep, retry_delays=(d, 5 * d), log=log, blocking=rt.blocking,
        poster=rt.take_poster(),
    )  # fmt: skip
    if out.stored is not None:
        rt.log("item %s stored at %s (%d bytes)", item.id, out.stored.url, out.stored.size)
    return out


@dataclass
class Balance:
    """The account balance in USD (None when the endpoint answers without one), or the error
    that stops the run (401, or no answer at all)."""

    usd: float | None
    error: ApixoError | None = None


@task(cache_policy=NO_CACHE)
async def read_balance() -> Balance:
    """Read the account balance; other API errors leave it unknown, with a warning."""
    rt = runtime()
    try:
        return Balance(await rt.blocking(rt.client.get_balance))
    except (AuthenticationError, ApixoTransportError) as exc:
        return Balance(None, exc)
    except ApixoError as exc:
        hint = ""
        if isinstance(exc, NotFoundError):
            hint = "; check APIXO_BASE_URL (the API's root, such as https://api.apixo.ai)"
        rt.log("balance not available: %s%s", exc, hint, level=logging.WARNING)
        return Balance(None)
