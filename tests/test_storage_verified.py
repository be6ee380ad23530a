"""Verified writes: a final video name never holds bytes that were not verified (issue 9).

Every refused write leaves the key as it was (absent, or the previous video, byte for byte) and
no temporary behind: no temp file, no spool file, no unfinished multipart upload.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mp4kit import encode_mp4
from PIL import Image

from hailuo_batch.storage import (
    TEMP_DIR,
    IncompleteWriteError,
    OutputStore,
    StoredObject,
    store_video_verified,
    video_key,
)
from hailuo_batch.video import NotAVideoError, VideoInfo, verify_mp4

KB = 1024


class Boom(RuntimeError):
    """The download broke mid-stream."""


@pytest.fixture(scope="module")
def mp4s(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("mp4")
    return [encode_mp4(root / f"{n}.mp4", shade=n * 60, seconds=1 + n) for n in range(3)]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320, 320), (9, 9, 9)).save(buf, "PNG")
    return buf.getvalue()


HTML = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"


def bad_bodies(video: bytes) -> dict[str, bytes]:
    """What a CDN can serve instead of a video, as a client would receive it."""
    return {
        "html": HTML,
        "empty": b"",
        "cut": video[: len(video) // 2],
        "png": _png(),
        "random": os.urandom(3000),
    }


def pieces(data: bytes, size: int = 700) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def broken(data: bytes, after: int) -> Iterator[bytes]:
    yield data[:after]
    raise Boom("connection reset")


@pytest.fixture
def local_store(tmp_path: Path) -> OutputStore:
    return OutputStore(str(tmp_path / "out"))


@pytest.fixture
def s3_store(s3_env: str, tmp_path: Path) -> OutputStore:
    return OutputStore(f"s3://{s3_env}/out", spool_dir=str(tmp_path / "spool"))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> OutputStore:
    return request.getfixturevalue(f"{request.param}_store")


def no_temporaries(store: OutputStore) -> None:
    """Nothing but final objects: no temp file, no spool file, no unfinished upload."""
    if store.is_local:
        temp = Path(store.root) / TEMP_DIR
        assert not temp.exists() or os.listdir(temp) == []
        return
    assert not os.path.exists(store.spool_dir) or os.listdir(store.spool_dir) == []
    bucket = store.root.split("/")[0]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert sorted(store.fs._strip_protocol(p) for p in store.fs.find(store.root)) == sorted(
        f"{store.root}/{k}" for k in store.list()
    )


# --- one write ----------------------------------------------------------------------------------


def test_a_video_is_stored_with_what_it_holds(store: OutputStore, mp4s: list[bytes]) -> None:
    key = video_key("clip")
    stored = store_video_verified(store, key, pieces(mp4s[1]), len(mp4s[1]))
    assert stored == StoredObject(
        url=store.url_for(key),
        size=len(mp4s[1]),
        sha256=hashlib.sha256(mp4s[1]).hexdigest(),
        info=VideoInfo(
            duration_s=2.0, width=96, height=64, codec="h264", frames_decoded=1, frames=8
        ),
    )
    assert store.read_bytes(key) == mp4s[1]
    no_temporaries(store)


def test_length_unknown_is_fine_for_a_complete_video(store: OutputStore, mp4s: list[bytes]) -> None:
    stored = store_video_verified(store, "videos/x.mp4", pieces(mp4s[0]), None)
    assert stored.info is not None and stored.info.frames == 4


@pytest.mark.parametrize("kind", ["html", "empty", "cut", "png", "random"])
def test_bad_bodies_are_refused_and_the_stored_video_stays(
    store: OutputStore, mp4s: list[bytes], kind: str
) -> None:
    key = video_key("clip")
    store_video_verified(store, key, pieces(mp4s[0]), len(mp4s[0]))
    body = bad_bodies(mp4s[1])[kind]
    with pytest.raises(NotAVideoError):  # no length sent: only the check can tell
        store_video_verified(store, key, pieces(body), None)
    with pytest.raises(NotAVideoError):  # a length that matches the bad body changes nothing
        store_video_verified(store, key, pieces(body), len(body))
    assert store.read_bytes(key) == mp4s[0]
    assert store.list() == [key]
    no_temporaries(store)


@pytest.mark.parametrize("kind", ["html", "empty", "cut"])
def test_a_refused_first_write_leaves_no_video(
    store: OutputStore, mp4s: list[bytes], kind: str
) -> None:
    with pytest.raises(NotAVideoError):
        store_video_verified(store, "videos/new.mp4", pieces(bad_bodies(mp4s[0])[kind]), None)
    assert not store.exists("videos/new.mp4")
    assert store.list() == []
    no_temporaries(store)


def test_a_short_body_with_a_length_is_refused_before_the_check(
    store: OutputStore, mp4s: list[bytes]
) -> None:
    calls: list[str] = []

    def verify(path: str) -> VideoInfo:
        calls.append(path)
        return verify_mp4(path)

    body = mp4s[0][:-10]
    with pytest.raises(IncompleteWriteError, match=f"got {len(body)} bytes but {len(mp4s[0])}"):
        store.write_stream_atomic(
            "videos/a.mp4", pieces(body), expected_size=len(mp4s[0]), verify=verify
        )
    assert calls == [] and not store.exists("videos/a.mp4")
    no_temporaries(store)


def test_the_check_sees_the_complete_bytes_before_anyone_else(
    store: OutputStore, mp4s: list[bytes]
) -> None:
    """`verify` gets a local file holding exactly the bytes, while the key is still absent."""
    seen: list[bytes] = []

    def verify(path: str) -> VideoInfo:
        assert not store.exists("videos/a.mp4")
        seen.append(Path(path).read_bytes())
        return verify_mp4(path)

    store.write_stream_atomic("videos/a.mp4", pieces(mp4s[2]), expected_size=None, verify=verify)
    assert seen == [mp4s[2]] and store.read_bytes("videos/a.mp4") == mp4s[2]


def test_any_error_of_the_check_refuses_the_write(store: OutputStore, mp4s: list[bytes]) -> None:
    def verify(path: str) -> VideoInfo:
        raise Boom("checker crashed")

    with pytest.raises(Boom):
        store.write_stream_atomic("videos/a.mp4", [mp4s[0]], expected_size=None, verify=verify)
    assert not store.exists("videos/a.mp4")
    no_temporaries(store)


def test_a_broken_stream_is_refused(store: OutputStore, mp4s: list[bytes]) -> None:
    store_video_verified(store, "videos/a.mp4", [mp4s[0]], None)
    with pytest.raises(Boom):
        store_video_verified(store, "videos/a.mp4", broken(mp4s[1], 1000), None)
    assert store.read_bytes("videos/a.mp4") == mp4s[0]
    no_temporaries(store)


# --- exclusive: a paid video is never replaced --------------------------------------------------


def test_exclusive_write_never_replaces_a_video(store: OutputStore, mp4s: list[bytes]) -> None:
    key = video_key("clip")
    store_video_verified(store, key, [mp4s[0]], None, exclusive=True)
    with pytest.raises(FileExistsError):
        store_video_verified(store, key, [mp4s[1]], None, exclusive=True)
    assert store.read_bytes(key) == mp4s[0]
    no_temporaries(store)
    store_video_verified(store, key, [mp4s[1]], None)  # without it, a replacement is allowed
    assert store.read_bytes(key) == mp4s[1]


def test_exclusive_multipart_upload_never_replaces_an_object(s3_store: OutputStore) -> None:
    """Large enough for a multipart upload (> 2 blocks): the completion is refused too."""
    big = os.urandom(17 * 1024 * KB)
    s3_store.write_bytes_atomic("inputs/big.bin", b"first")
    with pytest.raises(FileExistsError):
        s3_store.write_stream_atomic(
            "inputs/big.bin", pieces(big, 1024 * KB), expected_size=len(big), exclusive=True
        )
    assert s3_store.read_bytes("inputs/big.bin") == b"first"
    no_temporaries(s3_store)
    s3_store.write_stream_atomic(
        "inputs/new.bin", pieces(big, 1024 * KB), expected_size=None, exclusive=True
    )
    assert s3_store.read_bytes("inputs/new.bin") == big


def test_s3_videos_are_served_as_video_mp4(s3_store: OutputStore, mp4s: list[bytes]) -> None:
    """A presigned link (the review page) plays in a browser only with the right type."""
    store_video_verified(s3_store, "videos/a.mp4", [mp4s[0]], None)
    big = os.urandom(17 * 1024 * KB)  # a multipart upload carries it too
    s3_store.write_stream_atomic("videos/big.mp4", pieces(big, 1024 * KB), expected_size=None)
    for key in ("videos/a.mp4", "videos/big.mp4"):
        assert s3_store.fs.info(s3_store.root + "/" + key)["ContentType"] == "video/mp4"


def test_other_object_stores_get_the_same_guarantees(tmp_path: Path, mp4s: list[bytes]) -> None:
    store = OutputStore(f"memory://verified-{uuid.uuid4().hex}", spool_dir=str(tmp_path / "sp"))
    assert not store.is_local
    with pytest.raises(NotAVideoError):
        store_video_verified(store, "videos/a.mp4", [HTML], None)
    assert not store.exists("videos/a.mp4")
    store_video_verified(store, "videos/a.mp4", [mp4s[0]], None, exclusive=True)
    with pytest.raises(FileExistsError):
        store_video_verified(store, "videos/a.mp4", [mp4s[1]], None, exclusive=True)
    assert store.read_bytes("videos/a.mp4") == mp4s[0]
    assert os.listdir(tmp_path / "sp") == []


# --- the invariant, over random sequences of writes ---------------------------------------------

OPS = ["good", "bad", "cut_stream", "short_length", "broken", "checker_crash"]
ops = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=7
)
KEYS = [video_key("a"), video_key("a.mp4.part-x"), video_key("a", "0123456789ab")]


def apply(store: OutputStore, op: str, key: str, video: bytes) -> bool:
    """One write; True if it was a verified write that must now be under `key`."""
    try:
        if op == "good":
            store_video_verified(store, key, pieces(video), len(video))
            return True
        if op == "bad":
            store_video_verified(store, key, pieces(HTML), None)
        elif op == "cut_stream":  # a body cut short, no length to tell
            store_video_verified(store, key, pieces(video[: len(video) * 2 // 3]), None)
        elif op == "short_length":
            store_video_verified(store, key, pieces(video[:-1]), len(video))
        elif op == "broken":
            store_video_verified(store, key, broken(video, len(video) // 3), None)
        else:

            def crash(path: str) -> VideoInfo:
                raise Boom("checker crashed")

            store.write_stream_atomic(key, [video], expected_size=None, verify=crash)
    except (NotAVideoError, IncompleteWriteError, Boom):
        return False
    raise AssertionError(f"{op} was not refused")


def check_invariant(store: OutputStore, model: dict[str, bytes]) -> None:
    assert store.list() == sorted(model)
    for key, expected in model.items():
        data = store.read_bytes(key)
        assert data == expected  # the last verified write, byte for byte
        verify_mp4(io.BytesIO(data))  # and it decodes
    no_temporaries(store)


def run_sequence(store: OutputStore, steps: list[tuple[str, int, int]], mp4s: list[bytes]) -> None:
    model: dict[str, bytes] = {}
    for op, key_n, video_n in steps:
        key, video = KEYS[key_n], mp4s[video_n]
        if apply(store, op, key, video):
            model[key] = video
        check_invariant(store, model)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=ops)
def test_final_names_hold_only_verified_videos_local(
    mp4s: list[bytes], steps: list[tuple[str, int, int]]
) -> None:
    with tempfile.TemporaryDirectory() as root:
        run_sequence(OutputStore(root), steps, mp4s)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=ops)
def test_final_names_hold_only_verified_videos_s3(
    mp4s: list[bytes], steps: list[tuple[str, int, int]], s3_env: str, tmp_path: Path
) -> None:
    prefix = uuid.uuid4().hex[:8]
    spool = tmp_path / prefix
    run_sequence(OutputStore(f"s3://{s3_env}/{prefix}", spool_dir=str(spool)), steps, mp4s)
