"""Fetching a finished task's video into the store: streamed, verified, retried, never partial.

Each attempt is blocking (the sync apixo client and fsspec) and runs in a worker thread; the
waits between attempts are on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hailuo_batch.apixo import ApixoClient
from hailuo_batch.storage import OutputStore, StoredObject
from hailuo_batch.video import verify_mp4


@dataclass
class Stored:
    """A verified video in the store, or why not (`steps.on_store_error` maps it)."""

    stored: StoredObject | None
    error: Exception | None = None
    attempts: int = 1


def fetch_once(client: ApixoClient, store: OutputStore, url: str, key: str) -> StoredObject:
    """One blocking attempt: stream `url` into `key`, verified (length, an MP4 that decodes)."""
    with client.stream_download(url) as download:
        return store.write_stream_atomic(
            key, download.iter_bytes(), expected_size=download.content_length, verify=verify_mp4
        )


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
) -> Stored:
    """Stream `url` into `key`: verified length, a real MP4 that decodes, nothing unverified
    ever visible under `key`.

    `sweep` (an item resumed from an earlier run) first removes the temporaries a killed writer
    left for this key (only this key's own). The client retries opening the download; a stream
    that breaks half-way, bytes that are not a video or a store that fails are tried again from
    the start after each of `retry_delays`, waiting on the event loop (a thread is held only
    while bytes move). Each attempt runs through `blocking`. An expected fate is returned.
    """
    if sweep and await blocking(store.remove_temp_files, key):
        log(f"removed a partial download of {key} left by a crash")
    error: Exception | None = None
    tries = len(retry_delays) + 1
    for attempt, pause in enumerate([*retry_delays, None], start=1):
        try:
            return Stored(await blocking(fetch_once, client, store, url, key), attempts=attempt)
        except Exception as exc:  # noqa: BLE001 - download, verification and store failures alike
            error = exc
            log(f"video for {key} not stored (attempt {attempt} of {tries}): {exc}")
            if pause is not None:
                await asyncio.sleep(pause)
    return Stored(None, error, attempts=tries)
