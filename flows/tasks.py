"""The Prefect tasks of an item's life and the run's API calls, named after their functions.

Tasks return typed outcomes (`Submitted`, `Polled`, `Stored`, `Balance`, a `ManifestError`)
instead of raising for expected fates: a refused POST or a video that is not an MP4 is not a
crash, and Prefect prints a traceback for every task that raises. They take only small
parameters (items, ids, URLs) and reach the run's client and store through `runtime()`.
Blocking calls run in worker threads (`Runtime.blocking`), so the flow's event loop keeps many
items in flight without a thread per wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

import anyio
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import Runtime, runtime
from hailuo_batch.apixo import (
    ApixoError,
    AuthenticationError,
    GenerateRequest,
    NotFoundError,
    RequestType,
    TaskState,
    TaskStatus,
)
from hailuo_batch.apixo.errors import (
    ApixoTransportError,
    NotAnEnvelopeError,
    UnexpectedResponseError,
)
from hailuo_batch.manifest import ItemDefaults, Manifest, ManifestError, ManifestItem, load_manifest
from hailuo_batch.policy import PollSchedule
from hailuo_batch.steps import POLL_TIMEOUT, TASK_NOT_FOUND, TaskLost
from hailuo_batch.storage import StoredObject
from hailuo_batch.video import verify_mp4


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
    rt.log(
        "manifest %s: %d rows, %d valid, %d row errors",
        url,
        manifest.total_rows,
        len(manifest.items),
        len(manifest.errors),
    )
    return manifest


@dataclass
class Submitted:
    task_id: str | None
    error: ApixoError | None = None


@task(task_run_name="submit-{item.id}", cache_policy=NO_CACHE)
async def submit_item(item: ManifestItem, request: GenerateRequest) -> Submitted:
    """POST one generation task. Exactly one POST per call; the client retries only what it
    can prove was not created, and reports an ambiguous outcome instead of paying twice."""
    rt = runtime()
    if rt.callback_url is not None:
        request = request.model_copy(
            update={"request_type": RequestType.CALLBACK, "callback_url": rt.callback_url}
        )
    try:
        task_id = await rt.blocking(rt.client.submit, request)
    except ApixoError as exc:
        rt.log("item %s not submitted: %s", item.id, exc, level=logging.WARNING)
        return Submitted(None, exc)
    get_run_logger().info("item %s submitted as %s", item.id, task_id)
    return Submitted(task_id)


@dataclass
class Polled:
    """A terminal status, or the error that ended the reads (`steps.on_poll_error` maps it)."""

    status: TaskStatus | None
    reads: int
    error: Exception | None = None


@task(task_run_name="poll-{item.id}-{task_id}", cache_policy=NO_CACHE)
async def poll_item(item: ManifestItem, task_id: str, immediate: bool = False) -> Polled:
    """Read the task's status on the provider's schedule until it ends or the deadline passes.

    `immediate` (a resumed task, already under way) reads at once instead of after the
    initial wait.

    One task run per item with its own loop (not a Prefect retry per read), so a long batch
    does not flood Prefect's event stream with a state change for every status read.
    """
    rt = runtime()
    s = rt.settings
    schedule = PollSchedule.from_settings(s)
    if rt.callbacks is not None:
        # callback mode: a delivery wakes us; a slow status poll is the backstop for lost ones
        schedule = dataclasses.replace(
            schedule,
            initial_s=max(schedule.initial_s, s.callback_backstop_s),
            interval_s=s.callback_backstop_s,
            max_interval_s=s.callback_backstop_s,
            backoff=1.0,
        )
    if immediate:
        schedule = dataclasses.replace(schedule, initial_s=0.0)
    started = time.monotonic()
    reads = 0
    wake = rt.events.setdefault(task_id, asyncio.Event()) if rt.callbacks is not None else None
    if wake is not None and task_id in rt.delivered:
        wake.set()  # delivered before we started waiting
    delays = schedule.delays()
    try:
        while (delay := next(delays, None)) is not None:
            woken = False
            if wake is not None:
                with anyio.move_on_after(delay):
                    await wake.wait()
                woken = wake.is_set()
                wake.clear()
            else:
                await asyncio.sleep(delay)
            reads += 1
            try:
                # never trust a callback: a status read confirms it (and gives a fresh URL)
                status = await rt.blocking(rt.client.get_status, task_id)
            except AuthenticationError as exc:
                return Polled(None, reads, exc)
            except NotFoundError as exc:
                if time.monotonic() - started < s.not_found_grace_s + schedule.initial_s:
                    continue
                return Polled(None, reads, TaskLost(TASK_NOT_FOUND, rt.scrub(str(exc))))
            except NotAnEnvelopeError as exc:
                # a proxy's page instead of an answer, past the read retries: likely transient
                rt.log("status read for %s: %s", task_id, exc, level=logging.WARNING)
                continue
            except UnexpectedResponseError as exc:
                # malformed or foreign: fail the item now; its ledger keeps the taskId
                return Polled(None, reads, exc)
            except ApixoError as exc:
                # the client already retried this read within its budget; try again next tick
                rt.log("status read for %s failed: %s", task_id, exc, level=logging.WARNING)
                continue
            if status.state in (TaskState.SUCCESS, TaskState.FAILED):
                return Polled(status, reads)
            if woken:
                # a callback the provider's own status does not confirm (forged, or early):
                # the genuine one may now be dropped as a duplicate, so poll this task normally
                get_run_logger().warning(
                    "task %s: callback not confirmed (state %s); polling it instead",
                    task_id,
                    status.state,
                )
                remaining = schedule.timeout_s - (time.monotonic() - started)
                delays = PollSchedule(
                    initial_s=s.poll_interval_s,
                    interval_s=s.poll_interval_s,
                    backoff=s.poll_backoff,
                    max_interval_s=s.poll_max_interval_s,
                    timeout_s=max(0.0, remaining),
                ).delays()
                wake = None
    finally:
        rt.events.pop(task_id, None)
        rt.delivered.pop(task_id, None)
    return Polled(
        None,
        reads,
        TaskLost(POLL_TIMEOUT, f"no final state after {schedule.timeout_s:.0f} s"),
    )


async def watch_callbacks(rt: Runtime) -> None:
    """Callback mode: look for new deliveries every few seconds and wake their pollers.

    One listing per tick for the whole run (not a read per item); deliveries for tasks this
    run does not wait on are ignored.
    """
    assert rt.callbacks is not None
    known: set[str] = set()
    while True:
        try:
            new = await rt.blocking(rt.callbacks.poll_new, known)
        except (OSError, ValueError) as exc:
            get_run_logger().warning("cannot read callback deliveries: %s", exc)
            new = {}
        for task_id, status in new.items():
            if status.is_terminal:
                known.add(task_id)
                rt.delivered[task_id] = status
                if task_id in rt.events:
                    rt.events[task_id].set()
        await asyncio.sleep(rt.settings.callback_check_s)


@dataclass
class Stored:
    """A verified video in the store, or why not (`steps.on_store_error` maps it)."""

    stored: StoredObject | None
    error: Exception | None = None
    attempts: int = 1


@task(task_run_name="store-{item.id}", cache_policy=NO_CACHE)
async def store_video(item: ManifestItem, result_url: str, key: str, sweep: bool = False) -> Stored:
    """Stream the result into `key`: verified length, a real MP4 that decodes, never partial.

    `sweep` (an item resumed from an earlier run) first removes the temporaries a killed
    writer left for this key (only this key's own). The client retries opening the download;
    a stream that breaks half-way, bytes that are not a video or a store that fails are
    retried here from the start, twice, after `store_retry_delay_s` and 5x that (nothing
    unverified is ever visible under `key`). An expected fate is returned, not raised: the
    item's result says why, without a traceback in the log.
    """
    rt = runtime()

    def _copy() -> StoredObject:
        if sweep and rt.store.remove_temp_files(key):  # a killed run's half-written temp file
            rt.log("item %s: removed a partial download left by a crash", item.id)
        with rt.client.stream_download(result_url) as download:
            return rt.store.write_stream_atomic(
                key, download.iter_bytes(), expected_size=download.content_length, verify=verify_mp4
            )

    d = rt.settings.store_retry_delay_s
    error: Exception | None = None
    for attempt, pause in enumerate((d, 5 * d, None), start=1):
        try:
            stored = await rt.blocking(_copy)
        except Exception as exc:  # noqa: BLE001 - download, verification and store failures alike
            error = exc
            rt.log(
                "item %s: video not stored (attempt %d of 3): %s",
                item.id,
                attempt,
                exc,
                level=logging.WARNING,
            )
            if pause is not None:
                await asyncio.sleep(pause)
            continue
        rt.log("item %s stored at %s (%d bytes)", item.id, stored.url, stored.size)
        return Stored(stored, attempts=attempt)
    return Stored(None, error, attempts=3)


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
        rt.log("balance not available: %s", exc, level=logging.WARNING)
        return Balance(None)
