"""Fetching a finished task's video into the store: streamed, verified, retried, never partial.

Each attempt is blocking (the sync apixo client and fsspec) and runs in a worker thread; the
waits between attempts are on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hailuo_batch.apixo import ApixoClient, DownloadTooLargeError
from hailuo_batch.review import poster_key
from hailuo_batch.storage import OutputStore, StoredObject
from hailuo_batch.video import POSTER_AT_S, VideoInfo, verify_mp4

logger = logging.getLogger(__name__)


@dataclass
class Stored:
    """A verified video in the store, or why not (`steps.on_store_error` maps it)."""

    stored: StoredObject | None
    error: Exception | None = None
    attempts: int = 1


def fetch_once(
    client: ApixoClient, store: OutputStore, url: str, key: str, poster: bool = False
) -> StoredObject:
    """One blocking attempt: stream `url` into `key`, verified (length, an MP4 that decodes);
    with `poster`, then the poster the same decoding pass made, beside it (`review.poster_key`),
    so the review page need not read the video back from the store and decode it again."""
    with client.stream_download(url) as download:
        stored = store.write_stream_atomic(
            key,
            download.iter_bytes(),
            expected_size=download.content_length,
            verify=_with_poster if poster else verify_mp4,
        )
    return _poster_stored(store, key, stored)


def _with_poster(path: str) -> VideoInfo:
    return verify_mp4(path, poster_at_s=POSTER_AT_S)


def _poster_stored(store: OutputStore, key: str, stored: StoredObject) -> StoredObject:
    """Write the poster in `stored.info` beside the video, and return `stored` without its
    bytes. A poster is optional: one that cannot be written, for whatever reason, is left for
    the review page to make (logged), and never fails the stored video."""
    info = stored.info
    if info is None or info.poster is None:
        return stored
    try:
        store.write_bytes_atomic(poster_key(key), info.poster)
    except Exception as exc:  # noqa: BLE001 - s3fs lets botocore's own errors through too
        logger.warning("poster of %s not stored (the review page makes it): %s", key, exc)
    return replace(stored, info=replace(info, poster=None))


async def fetch_video(
    client: ApixoClient,
    store: OutputStore,
    url: str,
    key: str,
    *,
    sweep: bool,
    retry_delays: Sequence[float],
    log: Callable[[str], None],
    blocking: Callable[..., Awaitable[Any]],
    poster: bool = False,
) -> Stored:
    """Stream `url` into `key`: verified length, a real MP4 that decodes, nothing unverified
    ever visible under `key`.

    `sweep` (an item resumed from an earlier run) first removes the temporaries a killed writer
    left for this key and its poster (only theirs). `poster`: store the video's poster beside
    it (`fetch_once`). The client retries opening the download; a stream
    that breaks half-way, bytes that are not a video or a store that fails are tried again from
    the start after each of `retry_delays`, waiting on the event loop (a thread is held only
    while bytes move). Each attempt runs through `blocking`. An expected fate is returned.
    """
    if sweep:
        if await blocking(store.remove_temp_files, key):
            log(f"removed a partial download of {key} left by a crash")
        await blocking(store.remove_temp_files, poster_key(key))
    error: Exception | None = None
    tries = len(retry_delays) + 1
    for attempt, pause in enumerate([*retry_delays, None], start=1):
        try:
            stored = await blocking(fetch_once, client, store, url, key, poster)
            return Stored(stored, attempts=attempt)
        except DownloadTooLargeError as exc:  # the same body again next time: no retry
            log(f"video for {key} not stored: {exc}")
            return Stored(None, exc, attempts=attempt)
        except Exception as exc:  # noqa: BLE001 - download, verification and store failures alike
            error = exc
            log(f"video for {key} not stored (attempt {attempt} of {tries}): {exc}")
            if pause is not None:
                await asyncio.sleep(pause)
    return Stored(None, error, attempts=tries)
