"""fetch_video: each attempt in a thread, retries waiting on the event loop, expected fates
returned (never raised)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import anyio.to_thread

from hailuo_batch.fetch import fetch_video
from hailuo_batch.storage import StoredObject


class Download:
    content_length = 3

    def iter_bytes(self) -> Iterator[bytes]:
        yield b"abc"


class Client:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.opened = 0

    @contextlib.contextmanager
    def stream_download(self, url: str) -> Iterator[Download]:
        self.opened += 1
        if self.opened <= self.failures:
            raise ConnectionError(f"cut {self.opened}")
        yield Download()


class Store:
    def __init__(self) -> None:
        self.swept: list[str] = []

    def remove_temp_files(self, key: str) -> int:
        self.swept.append(key)
        return 1

    def write_stream_atomic(self, key: str, chunks: Any, **kw: Any) -> StoredObject:
        data = b"".join(chunks)
        return StoredObject(url=f"/out/{key}", size=len(data), sha256="x")


def fetch(client: Client, store: Store, *, sweep: bool = False) -> tuple[Any, list[str]]:
    logged: list[str] = []

    async def main() -> Any:
        return await fetch_video(
            client, store, "https://r/v.mp4", "videos/a.mp4",  # type: ignore[arg-type]
            sweep=sweep, retry_delays=(0.001, 0.001), log=logged.append,
            blocking=anyio.to_thread.run_sync,
        )  # fmt: skip

    return asyncio.run(main()), logged


def test_a_download_cut_twice_is_stored_on_the_third_attempt() -> None:
    out, logged = fetch(Client(failures=2), Store())
    assert out.stored is not None and out.stored.size == 3 and out.attempts == 3
    assert [m.split(":")[0] for m in logged] == [
        "video for videos/a.mp4 not stored (attempt 1 of 3)",
        "video for videos/a.mp4 not stored (attempt 2 of 3)",
    ]


def test_a_download_that_never_works_is_returned_as_its_error_not_raised() -> None:
    out, logged = fetch(Client(failures=5), Store())
    assert out.stored is None and isinstance(out.error, ConnectionError) and out.attempts == 3
    assert len(logged) == 3


def test_a_resumed_item_sweeps_its_own_temporaries_first() -> None:
    store = Store()
    out, logged = fetch(Client(failures=0), store, sweep=True)
    assert store.swept == ["videos/a.mp4"] and out.attempts == 1
    assert logged == ["removed a partial download of videos/a.mp4 left by a crash"]
