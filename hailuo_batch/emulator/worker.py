"""The provider's back end: fetch the input image, encode the video, deliver callbacks.

One asyncio task per submitted task runs on the server's event loop: it sleeps until the task
starts processing, fetches and checks the image, gets the video from the cache (encoding in a
thread when needed), records the outcome, and, in callback mode, delivers the result.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

import httpx

from hailuo_batch.emulator.contract import MODE_PRO, fail_message
from hailuo_batch.emulator.state import EmulatorState, Outcome, Task
from hailuo_batch.emulator.video import (
    ImageInfo,
    ImageRejected,
    VideoCache,
    inspect_image,
    output_size,
)

log = logging.getLogger(__name__)

_FETCH_CONCURRENCY = 8
_INSPECT_CACHE_SIZE = 256


class _FetchFailed(Exception):
    pass


async def _sleep_until(mono: float) -> None:
    delay = mono - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class Worker:
    """Runs tasks and callbacks in the background; owns the outgoing HTTP client."""

    def __init__(self, state: EmulatorState, cache: VideoCache) -> None:
        self.state = state
        self.cache = cache
        self.config = state.config
        self._client: httpx.AsyncClient | None = None
        self._fetch_slots: asyncio.Semaphore | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._inspected: dict[str, ImageInfo | ImageRejected] = {}

    async def start(self) -> None:
        self._client = httpx.AsyncClient(follow_redirects=True, trust_env=False)
        self._fetch_slots = asyncio.Semaphore(_FETCH_CONCURRENCY)

    async def stop(self) -> None:
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        self.cache.close()

    def submit(self, task: Task) -> None:
        """Schedule a freshly created task (call on the event loop)."""
        job = asyncio.create_task(self._run(task), name=task.task_id)
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _run(self, task: Task) -> None:
        try:
            await _sleep_until(task.start_at)
            await self._process(task)
            if task.request.request_type == "callback":
                assert task.outcome is not None
                await _sleep_until(task.outcome.at)
                await self._deliver(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("emulator task %s crashed", task.task_id)
            if task.outcome is None:
                self.state.fail_now(task, "GENERATION_FAILED")

    async def _process(self, task: Task) -> None:
        if task.planned_fail is not None:
            code = task.planned_fail
            self.state.finish(task, Outcome("failed", task.end_at, code, fail_message(code)))
            return
        try:
            data = await self._fetch(task.request.image_url)
        except _FetchFailed as exc:
            self.state.fail_now(task, "IMAGE_DOWNLOAD_FAILED", str(exc))
            return
        except ImageRejected as exc:
            self.state.fail_now(task, exc.code, str(exc))
            return
        try:
            info = self._inspect(data)
        except ImageRejected as exc:
            self.state.fail_now(task, exc.code, str(exc))
            return
        height = 1080 if task.request.mode == MODE_PRO else 768
        width, height = output_size(info, height)
        video = await self.cache.get(
            data, info, width, height, task.request.duration, self.config.fps
        )
        at = max(task.end_at, time.monotonic())
        self.state.finish(task, Outcome("success", at, video=video))

    def _inspect(self, data: bytes) -> ImageInfo:
        """inspect_image, remembered by content hash (a benchmark sends one image 1,000 times)."""
        digest = hashlib.sha256(data).hexdigest()
        verdict = self._inspected.get(digest)
        if verdict is None:
            try:
                verdict = inspect_image(data, self.config.max_image_bytes)
            except ImageRejected as exc:
                verdict = exc
            if len(self._inspected) >= _INSPECT_CACHE_SIZE:
                self._inspected.clear()
            self._inspected[digest] = verdict
        if isinstance(verdict, ImageRejected):
            raise ImageRejected(verdict.code, str(verdict))
        return verdict

    async def _fetch(self, url: str) -> bytes:
        assert self._client is not None and self._fetch_slots is not None
        self.state.count_fetch()
        limit = self.config.max_image_bytes
        async with self._fetch_slots:
            try:
                async with self._client.stream(
                    "GET", url, timeout=self.config.fetch_timeout_s
                ) as resp:
                    if resp.status_code != 200:
                        raise _FetchFailed(f"image fetch answered HTTP {resp.status_code}")
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise ImageRejected("IMAGE_TOO_LARGE", f"image exceeds {limit} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.HTTPError as exc:
                raise _FetchFailed(f"image fetch failed: {type(exc).__name__}") from None

    async def _deliver(self, task: Task) -> None:
        """POST the status envelope; retry after the scaled delays; then abandon."""
        assert self._client is not None
        c = self.config
        url = task.request.callback_url
        assert url is not None
        rng = self.state.callback_rng
        delays = (0.0, *(c.scaled(d) for d in c.callback_retry_s))
        timeout = max(1.0, c.scaled(c.callback_timeout_s))
        for delay in delays:
            if delay:
                await asyncio.sleep(delay)
            if rng.random() < c.callback_loss_rate:
                self.state.count("callbacks", "lost")
                return  # the provider believes it delivered: nothing more happens
            if await self._post(url, task, timeout):
                self.state.count("callbacks", "delivered")
                if rng.random() < c.callback_duplicate_rate:
                    self.state.count("callbacks", "duplicates")
                    await self._post(url, task, timeout)
                return
        self.state.count("callbacks", "failed")

    async def _post(self, url: str, task: Task, timeout: float) -> bool:
        assert self._client is not None
        with self.state.lock:
            envelope = {"code": 200, "message": "success", "data": self.state.status_data(task)}
        self.state.count("callbacks", "attempts")
        try:
            resp = await self._client.post(url, json=envelope, timeout=timeout)
        except httpx.HTTPError as exc:
            log.info("callback for %s failed: %s", task.task_id, type(exc).__name__)
            return False
        if resp.status_code != 200:
            return False
        self.state.note_callback_delivered(task)
        return True
