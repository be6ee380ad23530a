"""Fetching a finished task's video into the store: streamed, verified, retried, never partial.

Blocking (the sync apixo client and fsspec): the flow runs `fetch_video` in a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hailuo_batch.apixo import ApixoClient
from hailuo_batch.storage import OutputStore, StoredObject
from hailuo_batch.video import verify_mp4


@dataclass
class Stored:
    """A verified video in the store, or why not (`steps.on_store_error` maps it)."""

    stored: StoredObject | None
    error: Exception | None = None
    attempts: int = 1


def fetch_video(
    client: ApixoClient,
    store: OutputStore,
    url: str,
    key: str,
    *,
    sweep: bool,
    retry_delays: Sequence[float],
    log: Callable[[str], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Stored:
    """Stream `url` into `key`: verified length, a real MP4 that decodes, nothing unverified
    ever visible under `key`.

    `sweep` (an item resumed from an earlier run) first removes the temporaries a killed writer
    left for this key (only this key's own). The client retries opening the download; a stream
    that breaks half-way, bytes that are not a video or a store that fails are tried again from
    the start after each of `retry_delays`. An expected fate is returned, not raised.
    """
    if sweep and store.remove_temp_files(key):
        log(f"removed a partial download of {key} left by a crash")
    error: Exception | None = None
    tries = len(retry_delays) + 1
    for attempt, pause in enumerate([*retry_delays, None], start=1):
        try:
            with client.stream_download(url) as download:
                stored = store.write_stream_atomic(
                    key,
                    download.iter_bytes(),
                    expected_size=download.content_length,
                    verify=verify_mp4,
                )
            return Stored(stored, attempts=attempt)
        except Exception as exc:  # noqa: BLE001 - download, verification and store failures alike
            error = exc
            log(f"video for {key} not stored (attempt {attempt} of {tries}): {exc}")
            if pause is not None:
                sleep(pause)
    return Stored(None, error, attempts=tries)
