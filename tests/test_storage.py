from __future__ import annotations

import hashlib
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from hailuo_batch.settings import Settings
from hailuo_batch.storage import (
    IncompleteWriteError,
    OutputStore,
    PresignUnsupported,
    StagingError,
    StoredObject,
    run_key,
    stage_image,
    video_key,
)

MakeImage = Callable[..., Path]
MB = 1024 * 1024


class Boom(RuntimeError):
    pass


def failing_chunks(good: int, chunk: bytes = b"x" * MB) -> Iterator[bytes]:
    """`good` chunks, then the producer fails (as a download cut mid-stream would)."""
    for _ in range(good):
        yield chunk
    raise Boom("connection lost")


@pytest.fixture
def local_store(tmp_path: Path) -> OutputStore:
    return OutputStore(str(tmp_path / "out"))


@pytest.fixture
def s3_store(s3_env: str, tmp_path: Path) -> OutputStore:
    return OutputStore(f"s3://{s3_env}/prefix", spool_dir=str(tmp_path / "spool"))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> OutputStore:
    return request.getfixturevalue(f"{request.param}_store")


def test_key_names() -> None:
    assert video_key("clip-1") == "videos/clip-1.mp4"
    assert video_key("clip-1", "3fa9c0de12ab") == "videos/clip-1~3fa9c0de12ab.mp4"
    assert video_key("clip-1", "3fa9c0de12ab-2") == "videos/clip-1~3fa9c0de12ab-2.mp4"
    assert run_key("r42", "state.json") == "runs/r42/state.json"


@pytest.mark.parametrize("item_id", ["", "a/b", "a~b", "a b", "x" * 129, "é", "a\\b"])
def test_video_key_refuses_ids_outside_the_alphabet(item_id: str) -> None:
    with pytest.raises(ValueError, match="invalid item id"):
        video_key(item_id)


@pytest.mark.parametrize("variant", ["", "a.b", "a~b", "a/b", "x" * 65, "poster.jpg"])
def test_video_key_refuses_bad_variants(variant: str) -> None:
    with pytest.raises(ValueError, match="invalid video variant"):
        video_key("a", variant)


def test_no_key_can_live_among_the_temporaries(local_store: OutputStore) -> None:
    with pytest.raises(ValueError, match="temporary files only"):
        local_store.write_text_atomic("tmp/x.json", "{}")
    local_store.write_text_atomic("tmpx/a.json", "{}")  # only the folder itself is reserved
    assert local_store.list() == ["tmpx/a.json"]


def test_urls_of_keys(local_store: OutputStore, s3_store: OutputStore, tmp_path: Path) -> None:
    assert local_store.url_for("videos/a.mp4") == str(tmp_path / "out" / "videos" / "a.mp4")
    bucket = s3_store.root.split("/")[0]
    assert s3_store.url_for("videos/a.mp4") == f"s3://{bucket}/prefix/videos/a.mp4"
    assert s3_store.url_for("") == f"s3://{bucket}/prefix"
    assert local_store.url_for("") == str(tmp_path / "out")


def test_file_url_is_a_local_store(tmp_path: Path) -> None:
    store = OutputStore((tmp_path / "o").as_uri())
    store.write_text_atomic("a.txt", "hi")
    assert (tmp_path / "o" / "a.txt").read_text() == "hi"


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "a//b", "", "a\\b", "a/./b"])
def test_keys_cannot_escape_the_root(local_store: OutputStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid store key"):
        local_store.write_text_atomic(key, "x")


def test_write_read_list_delete(store: OutputStore) -> None:
    stored = store.write_text_atomic("runs/r1/state.json", '{"ok": true}')
    store.write_bytes_atomic("videos/a.mp4", b"\x00\x01")
    assert stored.url == store.url_for("runs/r1/state.json")
    assert store.read_text("runs/r1/state.json") == '{"ok": true}'
    assert store.read_bytes("videos/a.mp4") == b"\x00\x01"
    assert store.exists("videos/a.mp4")
    assert store.size("videos/a.mp4") == 2
    assert store.list() == ["runs/r1/state.json", "videos/a.mp4"]
    assert store.list("videos") == ["videos/a.mp4"]
    assert store.list("nothing-here") == []
    store.delete("videos/a.mp4")
    store.delete("videos/a.mp4")  # missing is fine
    assert not store.exists("videos/a.mp4")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("videos/a.mp4")


def test_stream_write_hashes_and_counts(store: OutputStore) -> None:
    chunks = [os.urandom(300_000) for _ in range(4)]
    result = store.write_stream_atomic("videos/b.mp4", iter(chunks), expected_size=1_200_000)
    whole = b"".join(chunks)
    assert result == StoredObject(
        url=store.url_for("videos/b.mp4"), size=len(whole), sha256=hashlib.sha256(whole).hexdigest()
    )
    assert store.read_bytes("videos/b.mp4") == whole


def test_overwrite_replaces_the_object(store: OutputStore) -> None:
    store.write_text_atomic("runs/r/x.json", "old")
    store.write_text_atomic("runs/r/x.json", "new")
    assert store.read_text("runs/r/x.json") == "new"


def test_failure_mid_stream_leaves_nothing(store: OutputStore) -> None:
    with pytest.raises(Boom):
        store.write_stream_atomic("videos/c.mp4", failing_chunks(3), expected_size=None)
    assert not store.exists("videos/c.mp4")
    assert store.list() == []
    assert store.fs.find(store.root) == []  # no temp file either


def test_failed_overwrite_keeps_the_previous_object(store: OutputStore) -> None:
    store.write_bytes_atomic("videos/d.mp4", b"complete video")
    with pytest.raises(Boom):
        store.write_stream_atomic("videos/d.mp4", failing_chunks(2), expected_size=None)
    assert store.read_bytes("videos/d.mp4") == b"complete video"
    assert store.list() == ["videos/d.mp4"]


@pytest.mark.parametrize("expected", [2 * MB - 1, 2 * MB + 1])
def test_byte_count_mismatch_raises_and_stores_nothing(store: OutputStore, expected: int) -> None:
    with pytest.raises(IncompleteWriteError, match=f"got {2 * MB} bytes but {expected}"):
        store.write_stream_atomic("videos/e.mp4", iter([b"y" * MB] * 2), expected_size=expected)
    assert not store.exists("videos/e.mp4")
    assert store.fs.find(store.root) == []


def test_s3_failure_after_a_multipart_part_aborts_the_upload(
    s3_store: OutputStore, s3_env: str, moto_server: str
) -> None:
    """10 MiB reach S3 as a multipart part before the failure; the upload must be aborted."""
    with pytest.raises(Boom):
        s3_store.write_stream_atomic("videos/big.mp4", failing_chunks(10), expected_size=None)
    assert s3_store.fs.find(s3_store.root) == []
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    assert client.list_multipart_uploads(Bucket=s3_env).get("Uploads", []) == []


def test_an_upload_the_store_acknowledged_but_does_not_hold_is_a_failure(
    s3_store: OutputStore,
) -> None:
    """A store, or a proxy before it, that answers 200 to the PUT and keeps nothing (or other
    bytes): the write fails, so no run reports a video that is not there."""
    real = s3_store.fs.put_file
    s3_store.fs.put_file = lambda *a, **kw: None  # type: ignore[method-assign]
    try:
        with pytest.raises(OSError, match="accepted the upload of 11 bytes but holds nothing"):
            s3_store.write_stream_atomic("videos/a.mp4", [b"hello world"], expected_size=11)
        s3_store.write_bytes_atomic("videos/b.mp4", b"short")  # another object at the key
        s3_store.fs.put_file = lambda *a, **kw: None  # type: ignore[method-assign]
        with pytest.raises(OSError, match="but holds 5 bytes"):
            s3_store.write_stream_atomic("videos/b.mp4", [b"hello world"], expected_size=11)
        assert not s3_store.exists("videos/b.mp4")  # bytes not verified: not left there
    finally:
        s3_store.fs.put_file = real  # type: ignore[method-assign]
    stored = s3_store.write_stream_atomic("videos/c.mp4", [b"hello world"], expected_size=11)
    assert stored.size == 11 and s3_store.read_bytes("videos/c.mp4") == b"hello world"


def test_presign_s3_gives_a_fetchable_url(s3_store: OutputStore) -> None:
    s3_store.write_bytes_atomic("inputs/a.bin", b"payload")
    url = s3_store.presign("inputs/a.bin", 600)
    assert "X-Amz-Signature=" in url or "Signature=" in url
    assert httpx.get(url).content == b"payload"


def test_presign_local_is_unsupported(local_store: OutputStore) -> None:
    local_store.write_bytes_atomic("a.bin", b"x")
    with pytest.raises(PresignUnsupported, match="s3://"):
        local_store.presign("a.bin", 60)


# --- staging ----------------------------------------------------------------------------------


def test_stage_http_url_is_unchanged(local_store: OutputStore) -> None:
    url = "https://cdn.example.com/a.jpg?v=2"
    assert stage_image(url, local_store, settings=Settings()) == url


def test_stage_s3_image_is_presigned(s3_store: OutputStore, s3_env: str) -> None:
    s3_store.fs.pipe_file(f"{s3_env}/images/cat.jpg", b"jpeg bytes")
    url = stage_image(f"s3://{s3_env}/images/cat.jpg", s3_store, settings=Settings())
    assert url.startswith("http")
    assert httpx.get(url).content == b"jpeg bytes"


def test_stage_s3_image_from_a_local_output_uses_env_credentials(
    s3_env: str, local_store: OutputStore
) -> None:
    OutputStore(f"s3://{s3_env}").write_bytes_atomic("images/dog.png", b"png bytes")
    url = stage_image(f"s3://{s3_env}/images/dog.png", local_store, settings=Settings())
    assert httpx.get(url).content == b"png bytes"


def test_stage_missing_s3_image(s3_store: OutputStore, s3_env: str) -> None:
    with pytest.raises(StagingError, match="not found"):
        stage_image(f"s3://{s3_env}/images/none.jpg", s3_store, settings=Settings())


def test_stage_local_image_uploads_once_and_presigns(
    s3_store: OutputStore, make_image: MakeImage
) -> None:
    path = make_image(800, 600, "JPEG", name="photo.jpeg")
    data = path.read_bytes()
    key = f"inputs/{hashlib.sha256(data).hexdigest()}.jpg"
    url = stage_image(str(path), s3_store, settings=Settings())
    assert s3_store.list("inputs") == [key]
    assert httpx.get(url).content == data
    # staging again (also via file://) reuses the uploaded object
    modified = s3_store.fs.info(s3_store.root + "/" + key)["LastModified"]
    url2 = stage_image(path.as_uri(), s3_store, settings=Settings())
    assert s3_store.fs.info(s3_store.root + "/" + key, refresh=True)["LastModified"] == modified
    assert httpx.get(url2).content == data


def test_stage_local_image_with_local_output_is_refused(
    local_store: OutputStore, make_image: MakeImage
) -> None:
    path = make_image(800, 600)
    with pytest.raises(StagingError, match=r"s3:// output.*http\(s\)"):
        stage_image(str(path), local_store, settings=Settings())


def test_stage_missing_local_image(s3_store: OutputStore, tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="not found"):
        stage_image(str(tmp_path / "missing.jpg"), s3_store, settings=Settings())


def test_a_stored_videos_check_reads_it_in_chunks_not_whole(
    store: OutputStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rerun checks every stored video against its recorded sha256 (`ledger.stored_intact`),
    one per item in flight at once: each is hashed as it streams by, so memory stays bounded by
    the chunk, not by the videos' sizes."""
    from hailuo_batch.ledger import LedgerRecord, LedgerState, stored_intact

    data = os.urandom(3 * MB + 12345)  # several chunks and a short last one
    store.write_bytes_atomic("videos/big.mp4", data)
    rec = LedgerRecord(
        id="big", input_hash="h", state=LedgerState.STORED, task_id="t",
        video_key="videos/big.mp4", bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
    )  # fmt: skip
    del data

    def whole(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the whole object was read at once")

    monkeypatch.setattr(store.fs, "cat_file", whole)
    monkeypatch.setattr(store.fs, "cat", whole)
    # the S3 case's moto server runs in this process: only the local case's peak is ours alone
    tracemalloc.start()
    try:
        intact = stored_intact(store, rec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert intact
    if store.is_local:
        assert peak < 2.5 * MB  # a chunk and its buffer, never the whole 3 MB video
    assert not stored_intact(store, rec.model_copy(update={"sha256": "0" * 64}))
    with pytest.raises(FileNotFoundError):
        store.sha256("videos/absent.mp4")
