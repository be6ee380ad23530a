"""fetch_video: each attempt in a thread, retries waiting on the event loop, expected fates
returned (never raised)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from botocore.exceptions import EndpointConnectionError, NoCredentialsError

from hailuo_batch.fetch import fetch_video
from hailuo_batch.review import POSTER_SUFFIX, extract_poster, poster_key, store_poster
from hailuo_batch.storage import OutputStore, StoredObject
from tests.mp4kit import encode_mp4
from tests.test_storage_names import temp_name


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


def fetch(
    client: Client, store: Store, *, sweep: bool = False, poster: bool = False
) -> tuple[Any, list[str]]:
    logged: list[str] = []

    async def main() -> Any:
        return await fetch_video(
            client, store, "https://r/v.mp4", "videos/a.mp4",  # type: ignore[arg-type]
            sweep=sweep, retry_delays=(0.001, 0.001), log=logged.append,
            blocking=anyio.to_thread.run_sync, poster=poster,
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
    assert store.swept == ["videos/a.mp4", "videos/a~poster.jpg"] and out.attempts == 1
    assert logged == ["removed a partial download of videos/a.mp4 left by a crash"]


# --- the poster beside a stored video ------------------------------------------------------------


class VideoClient:
    """Serves `data` as every download, in two chunks."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @contextlib.contextmanager
    def stream_download(self, url: str) -> Iterator[Any]:
        class _Download:
            content_length = len(self.data)

            def iter_bytes(_self) -> Iterator[bytes]:
                yield self.data[:1000]
                yield self.data[1000:]

        yield _Download()


class PostersRefused(OutputStore):
    """A store that takes videos but fails every poster write with `error` (a store fault at
    the edge)."""

    def __init__(self, url: str, error: Exception) -> None:
        super().__init__(url)
        self.error = error

    def write_bytes_atomic(self, key: str, data: bytes) -> StoredObject:
        if key.endswith(POSTER_SUFFIX):
            raise self.error
        return super().write_bytes_atomic(key, data)


#: what a store can raise for a write: an OSError, and what s3fs lets through unwrapped
STORE_ERRORS = [
    OSError("the store is gone for a moment"),
    EndpointConnectionError(endpoint_url="http://s3.invalid"),
    NoCredentialsError(),
    TimeoutError("write timed out"),
]


@pytest.fixture
def video(tmp_path: Path) -> bytes:
    return encode_mp4(tmp_path / "v.mp4", seconds=2, fps=4)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_stored_video_gets_the_poster_the_check_made_beside_it(
    where: str, video: bytes, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if where == "local":
        store = OutputStore(str(tmp_path / "out"))
    else:
        bucket = request.getfixturevalue("s3_env")
        store = OutputStore(f"s3://{bucket}/out", spool_dir=str(tmp_path / "spool"))
    out, logged = fetch(VideoClient(video), store, poster=True)  # type: ignore[arg-type]
    assert out.stored is not None and logged == []
    assert store.read_bytes("videos/a.mp4") == video
    assert store.read_bytes(poster_key("videos/a.mp4")) == extract_poster(video)
    assert out.stored.info is not None and out.stored.info.poster is None  # not kept in memory


@pytest.mark.parametrize("error", STORE_ERRORS, ids=lambda e: type(e).__name__)
def test_a_poster_the_store_refuses_leaves_the_video_stored_and_says_so(
    error: Exception, video: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostersRefused(str(tmp_path / "out"), error)
    out, logged = fetch(VideoClient(video), store, poster=True)  # type: ignore[arg-type]
    assert out.stored is not None and out.attempts == 1 and logged == []
    assert store.read_bytes("videos/a.mp4") == video
    assert not store.exists(poster_key("videos/a.mp4"))
    assert "poster of videos/a.mp4 not stored (the review page makes it)" in caplog.text


def test_without_a_poster_asked_only_the_video_is_stored(video: bytes, tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "out"))
    out, _ = fetch(VideoClient(video), store)  # type: ignore[arg-type]
    assert out.stored is not None and store.read_bytes("videos/a.mp4") == video
    assert not store.exists(poster_key("videos/a.mp4"))


def _left_by_a_kill(store: OutputStore, key: str) -> Path:
    """A temporary as a writer of `key` killed half-way leaves it in the store's tmp/."""
    tmp = Path(store._temp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / temp_name(key, "killed00")
    path.write_bytes(b"half a JPEG")
    return path


def test_a_resumed_download_sweeps_what_a_kill_left_of_its_poster_too(
    video: bytes, tmp_path: Path
) -> None:
    store = OutputStore(str(tmp_path / "out"))
    mine = _left_by_a_kill(store, poster_key("videos/a.mp4"))
    other = _left_by_a_kill(store, poster_key("videos/b.mp4"))
    out, _ = fetch(VideoClient(video), store, sweep=True, poster=True)  # type: ignore[arg-type]
    assert out.stored is not None and store.exists(poster_key("videos/a.mp4"))
    assert not mine.exists() and other.exists()  # only its own


def test_a_poster_the_review_page_makes_sweeps_what_a_kill_left_of_it(
    video: bytes, tmp_path: Path
) -> None:
    # the video was stored, the run killed while writing its poster: a resume does not fetch
    # the video again, the review page makes the poster and clears the half-written one
    store = OutputStore(str(tmp_path / "out"))
    store.write_bytes_atomic("videos/a.mp4", video)
    mine = _left_by_a_kill(store, poster_key("videos/a.mp4"))
    assert store_poster(store, "videos/a.mp4") == poster_key("videos/a.mp4")
    assert not mine.exists()


def test_a_video_past_the_size_limit_leaves_nothing_in_the_store(tmp_path: Path) -> None:
    """An endless or inflating result body stops at HAILUO_MAX_VIDEO_BYTES on every attempt:
    the item's fate is the error, and the output's disk holds no final name and no temporary."""
    import gzip

    from hailuo_batch.apixo import ApixoClient, DownloadTooLargeError, RetryPolicy
    from tests.apixo.loopback import Answer, loopback

    bomb = Answer(200, gzip.compress(b"\x00" * 5_000_000), {"Content-Encoding": "gzip"})
    store = OutputStore(str(tmp_path / "out"))
    with (
        loopback(default=bomb) as server,
        ApixoClient("k", server.url, max_download_bytes=100_000, retry=RetryPolicy(1, 5)) as client,
    ):
        logged: list[str] = []
        out = asyncio.run(
            fetch_video(
                client, store, f"{server.url}/v.mp4", "videos/a.mp4", sweep=False,
                retry_delays=(0.001, 0.001), log=logged.append,
                blocking=anyio.to_thread.run_sync, poster=True,
            )
        )  # fmt: skip
    assert isinstance(out.error, DownloadTooLargeError) and out.stored is None
    assert len(logged) == 1 and "larger than the limit" in logged[0]  # not tried again
    assert out.attempts == 1
    left = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert left == []
