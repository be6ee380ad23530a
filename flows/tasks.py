"""Prefect tasks: each one verb-named step with one side effect.

Tasks return typed outcomes instead of raising for expected item fates (a content violation is
not a crash). Blocking library calls (the sync apixo client, fsspec) run in worker threads under a
capacity limiter, so the flow's event loop keeps many items in flight without a thread per wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from hailuo_batch.apixo import (
    ApixoClient,
    ApixoError,
    AuthenticationError,
    GenerateRequest,
    NotFoundError,
    RequestType,
    TaskState,
    TaskStatus,
)
from hailuo_batch.callbacks import CallbackStore
from hailuo_batch.manifest import Manifest, ManifestItem, load_manifest
from hailuo_batch.policy import PollSchedule
from hailuo_batch.settings import Settings
from hailuo_batch.storage import OutputStore, StoredObject, video_key
from hailuo_batch.validation import Preflight, preflight

T = TypeVar("T")


@dataclass
class Runtime:
    """What every task of one flow run shares: settings, client, store and the thread limiter."""

    settings: Settings
    client: ApixoClient
    store: OutputStore
    storage_options: dict[str, Any]
    limiter: anyio.CapacityLimiter
    # callback mode: the secret callback URL (never a parameter, log line or result), the
    # delivery store, and what the watcher has seen so far
    callback_url: str | None = None
    callbacks: CallbackStore | None = None
    events: dict[str, asyncio.Event] = field(default_factory=dict)
    delivered: dict[str, TaskStatus] = field(default_factory=dict)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.limiter)


@task(name="read_manifest", cache_policy=NO_CACHE)
async def read_manifest(rt: Runtime, url: str, defaults: Any) -> Manifest:
    """Read and parse the manifest; bad rows come back as errors, a bad file raises."""
    manifest = await rt.blocking(load_manifest, url, defaults, rt.storage_options or None)
    get_run_logger().info(
        "manifest %s: %d rows, %d valid, %d row errors",
        url,
        manifest.total_rows,
        len(manifest.items),
        len(manifest.errors),
    )
    return manifest


@task(name="validate_item", task_run_name="validate-{item.id}", cache_policy=NO_CACHE)
async def validate_item(rt: Runtime, item: ManifestItem) -> Preflight:
    """Check the image's bytes against the contract's rules, stage it, build the request."""
    return await rt.blocking(
        lambda: preflight(
            item, settings=rt.settings, store=rt.store, storage_options=rt.storage_options or None
        )
    )


@dataclass
class Submitted:
    task_id: str | None
    error: ApixoError | None = None


@task(name="submit_item", task_run_name="submit-{item.id}", cache_policy=NO_CACHE)
async def submit_item(rt: Runtime, item: ManifestItem, request: GenerateRequest) -> Submitted:
    """POST one generation task. Exactly one POST per call; the client retries only what it
    can prove was not created, and reports an ambiguous outcome instead of paying twice."""
    if rt.callback_url is not None:
        request = request.model_copy(
            update={"request_type": RequestType.CALLBACK, "callback_url": rt.callback_url}
        )
    try:
        task_id = await rt.blocking(rt.client.submit, request)
    except ApixoError as exc:
        get_run_logger().warning("item %s not submitted: %s", item.id, exc)
        return Submitted(None, exc)
    get_run_logger().info("item %s submitted as %s", item.id, task_id)
    return Submitted(task_id)


@dataclass
class Polled:
    status: TaskStatus | None
    reads: int
    error: str | None = None
    fatal: ApixoError | None = None


@task(name="poll_item", task_run_name="poll-{item.id}-{task_id}", cache_policy=NO_CACHE)
async def poll_item(
    rt: Runtime, item: ManifestItem, task_id: str, immediate: bool = False
) -> Polled:
    """Read the task's status on the provider's schedule until it ends or the deadline passes.

    `immediate` (a resumed task, already under way) reads at once instead of after the
    initial wait.

    One task run per item with its own loop (not a Prefect retry per read), so a long batch
    does not flood Prefect's event stream with a state change for every status read.
    """
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
                return Polled(None, reads, str(exc), fatal=exc)
            except NotFoundError as exc:
                if time.monotonic() - started < s.not_found_grace_s + schedule.initial_s:
                    continue
                return Polled(None, reads, f"TASK_NOT_FOUND: {exc}")
            except ApixoError as exc:
                # the client already retried this read within its budget; try again next tick
                get_run_logger().warning("status read for %s failed: %s", task_id, exc)
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
    return Polled(None, reads, f"POLL_TIMEOUT: no final state after {schedule.timeout_s:.0f} s")


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


@task(name="store_video", task_run_name="store-{item.id}", cache_policy=NO_CACHE, retries=2)
async def store_video(
    rt: Runtime, item: ManifestItem, result_url: str, sweep: bool = False
) -> StoredObject:
    """Stream the result into `{output}/videos/{id}.mp4`: verified length, sha256, never partial.

    `sweep` (an item resumed from an earlier run) first removes a temp file that a killed
    writer left for this key. The client retries opening the download; a stream that breaks
    half-way is retried here, a bounded number of times, from the start (the partial object
    is never visible).
    """

    def _copy() -> StoredObject:
        key = video_key(item.id)
        if sweep and rt.store.remove_temp_files(key):  # a killed run's half-written temp file
            get_run_logger().info("item %s: removed a partial download left by a crash", item.id)
        with rt.client.stream_download(result_url) as download:
            return rt.store.write_stream_atomic(
                key, download.iter_bytes(), expected_size=download.content_length
            )

    stored = await rt.blocking(_copy)
    get_run_logger().info("item %s stored at %s (%d bytes)", item.id, stored.url, stored.size)
    return stored


@task(name="read_balance", cache_policy=NO_CACHE)
async def read_balance(rt: Runtime) -> float | None:
    """The account balance in USD, or None when the endpoint does not answer. 401 raises."""
    try:
        return await rt.blocking(rt.client.get_balance)
    except AuthenticationError:
        raise
    except ApixoError as exc:
        get_run_logger().warning("balance not available: %s", exc)
        return None
