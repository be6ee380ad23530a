"""End to end over real HTTP on loopback: whatever the emulator's result URL serves, a final
video name only ever receives a real, complete video (local folder and S3 through moto)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from emulator_helpers import submit, task_body, wait_done

from hailuo_batch.emulator import EmulatorHandle
from hailuo_batch.storage import (
    IncompleteWriteError,
    OutputStore,
    StoredObject,
    store_video_verified,
    video_key,
)
from hailuo_batch.video import NotAVideoError, duration_warning

pytestmark = pytest.mark.timeout(60)

REFUSED = (NotAVideoError, IncompleteWriteError, httpx.TransportError)


def download_into(store: OutputStore, key: str, url: str) -> StoredObject:
    """Stream `url` into `key` as the pipeline does: the length is checked when the body is
    sent as is; with a Content-Encoding the length counts the encoded bytes, so it is not."""
    with httpx.Client(timeout=10) as c, c.stream("GET", url) as resp:
        resp.raise_for_status()
        encoded = resp.headers.get("content-encoding", "identity").lower() != "identity"
        length = resp.headers.get("content-length")
        expected = None if encoded or length is None else int(length)
        return store_video_verified(store, key, resp.iter_bytes(), expected)


@pytest.fixture
def result_url(emu: EmulatorHandle, client: httpx.Client) -> str:
    data = wait_done(client, submit(client, task_body(emu.base_url, duration=6)))
    return str(json.loads(data["resultJson"])["resultUrls"][0])


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> OutputStore:
    if request.param == "local":
        return OutputStore(str(tmp_path / "out"))
    bucket = request.getfixturevalue("s3_env")
    return OutputStore(f"s3://{bucket}/out", spool_dir=str(tmp_path / "spool"))


@pytest.mark.parametrize("kind", ["html_body", "empty_body", "cut_body", "truncate"])
def test_a_bad_result_body_never_reaches_the_final_name(
    emu: EmulatorHandle, result_url: str, store: OutputStore, kind: str
) -> None:
    key = video_key("clip")
    emu.script_faults("download", kind)
    with pytest.raises(REFUSED):
        download_into(store, key, result_url)
    assert not store.exists(key) and store.list() == []
    # the next download is the real video: stored, and its bytes are what was served
    stored = download_into(store, key, result_url)
    served = httpx.get(result_url).content
    assert store.read_bytes(key) == served
    assert stored.sha256 == hashlib.sha256(served).hexdigest()


@pytest.mark.parametrize("kind", ["html_body", "empty_body", "cut_body"])
def test_a_bad_body_leaves_the_stored_video_as_it_was(
    emu: EmulatorHandle, result_url: str, store: OutputStore, kind: str
) -> None:
    key = video_key("clip")
    first = download_into(store, key, result_url)
    emu.script_faults("download", kind)
    with pytest.raises(REFUSED):
        download_into(store, key, result_url)
    assert hashlib.sha256(store.read_bytes(key)).hexdigest() == first.sha256


def test_a_gzip_encoded_video_is_stored_decoded(
    emu: EmulatorHandle, result_url: str, store: OutputStore
) -> None:
    served = httpx.get(result_url).content
    emu.script_faults("download", "gzip_body")
    stored = download_into(store, video_key("clip"), result_url)
    assert emu.stats()["faults"] == {"gzip_body": 1}
    assert store.read_bytes(video_key("clip")) == served
    assert stored.size == len(served)
    assert stored.info is not None and stored.info.codec == "h264"
    assert duration_warning(stored.info, 6) is None
    assert duration_warning(stored.info, 10) is not None
