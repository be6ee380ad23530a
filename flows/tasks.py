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
    events: dict[str, asyncio.Event] = field(default_factory=dict)

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
async def validate_item(
    rt: Runtime,
    item: ManifestItem,
    request_type: RequestType = RequestType.ASYNC,
    callback_url: str | None = None,
) -> Preflight:
    """Check the image's bytes against the contract's rules, stage it, build the request."""
    return await rt.blocking(
        lambda: preflight(
            item,
            settings=rt.settings,
            store=rt.store,
            storage_options=rt.storage_options or None,
            request_type=request_type,
            callback_url=callback_url,
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
    schedule = PollSchedule.from_settings(rt.settings)
    if immediate:
        schedule = dataclasses.replace(schedule, initial_s=0.0)
    started = time.monotonic()
    reads = 0
    wake = rt.events.get(task_id)
    for delay in schedule.delays():
        if wake is not None:
            # callback mode: a delivery wakes us early; the read below confirms it
            with anyio.move_on_after(delay):
                await wake.wait()
        else:
            await asyncio.sleep(delay)
        reads += 1
        try:
            status = await rt.blocking(rt.client.get_status, task_id)
        except AuthenticationError as exc:
            return Polled(None, reads, str(exc), fatal=exc)
        except NotFoundError as exc:
            if time.monotonic() - started < rt.settings.not_found_grace_s + schedule.initial_s:
                continue
            return Polled(None, reads, f"TASK_NOT_FOUND: {exc}")
        except ApixoError as exc:
            # the client already retried this read within its budget; try again next tick
            get_run_logger().warning("status read for %s failed: %s", task_id, exc)
            continue
        if status.state in (TaskState.SUCCESS, TaskState.FAILED):
            return Polled(status, reads)
    return Polled(None, reads, f"POLL_TIMEOUT: no final state after {schedule.timeout_s:.0f} s")


@task(
    name="store_video",
    task_run_name="store-{item.id}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 10],
)
async def store_video(rt: Runtime, item: ManifestItem, result_url: str) -> StoredObject:
    """Stream the result into `{output}/videos/{id}.mp4`: verified length, sha256, never partial.

    The client retries opening the download; a stream that breaks half-way is retried here, a
    bounded number of times, from the start (the partial object is never visible).
    """

    def _copy() -> StoredObject:
        key = video_key(item.id)
        if rt.store.remove_temp_files(key):  # a killed run's half-written temp file
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
