"""Storage names no id can reach: final keys and temporaries come from disjoint spaces, and a
sweep of one key's temporaries never touches anything else (issue 9)."""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hailuo_batch.storage import (
    TEMP_DIR,
    OutputStore,
    is_temp_of,
    is_temporary,
    temp_token,
    video_key,
)

PROPS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FILE_PROPS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Every id a video key accepts: wider than the manifest's (which also forbids a leading '.' and
# '..'), so the properties hold whatever id reaches the store.
plain_ids = st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True)
# Names built to sit inside another id's names: "a" vs "a.mp4" vs "a.mp4.part-x" ...
SUFFIXES = [".mp4", ".mp4.part-x", ".mp4.part-" + "0" * 32, ".part", "-1", ".mp4.mp4", "."]
tricky_ids = st.builds(lambda base, tail: (base + tail)[:128], plain_ids, st.sampled_from(SUFFIXES))
ids = st.one_of(plain_ids, tricky_ids, st.sampled_from(["a", "a.mp4", "a.mp4.part-x", ".", ".."]))
hex12 = st.from_regex(r"[0-9a-f]{12}", fullmatch=True)
variants = st.one_of(
    st.none(),
    hex12,
    st.builds(lambda h, n: f"{h}-{n}", hex12, st.integers(2, 99)),  # steps.choose_video_key's
    st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
)
named = st.tuples(ids, variants)
# one short base id and names built on it, each inside the last one's names: "a", "a.mp4",
# "a.mp4.part-x", ... (the item "a" itself always among them)
family = st.builds(
    lambda base, tails: [(base, None)] + [(base + tail, variant) for tail, variant in tails],
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,19}", fullmatch=True),
    st.lists(
        st.tuples(st.sampled_from(["", *SUFFIXES]), st.sampled_from([None, None, "0123456789ab"])),
        min_size=1,
        max_size=4,
    ),
)
# what tempfile.mkstemp puts between a prefix and a suffix
randoms = st.from_regex(r"[a-z0-9_]{8}", fullmatch=True)


def _key_of(pair: tuple[str, str | None]) -> str:
    return video_key(pair[0], pair[1])


def temp_name(key: str, random_part: str) -> str:
    """The name a local writer of `key` gives its temporary (see OutputStore._publish_local)."""
    return f"{temp_token(key)}~{random_part}.part"


# --- pure properties of the names ---------------------------------------------------------------


@PROPS
@given(a=named, b=named)
def test_distinct_ids_and_variants_give_distinct_keys(
    a: tuple[str, str | None], b: tuple[str, str | None]
) -> None:
    assume(a != b)
    assert video_key(*a) != video_key(*b)


@PROPS
@given(pair=named, other=named, random_part=randoms)
def test_no_final_key_is_a_temporary_name(
    pair: tuple[str, str | None], other: tuple[str, str | None], random_part: str
) -> None:
    key = video_key(*pair)
    assert key.startswith("videos/") and key.endswith(".mp4")
    assert not is_temporary(key)  # list() never hides a video
    temp = f"{TEMP_DIR}/{temp_name(video_key(*other), random_part)}"
    assert is_temporary(temp)
    assert temp != key


@PROPS
@given(pairs=st.one_of(st.lists(named, min_size=2, max_size=4), family), random_part=randoms)
def test_a_sweep_matches_only_its_own_temporaries(
    pairs: list[tuple[str, str | None]], random_part: str
) -> None:
    keys = [_key_of(p) for p in pairs]
    for key_a in keys:
        assert is_temp_of(temp_name(key_a, random_part), key_a)
        for key_b in keys:
            assert is_temp_of(temp_name(key_b, random_part), key_a) == (key_a == key_b)
            # nor is any final name (a video's file name) ever taken for a temporary
            assert not is_temp_of(key_b.rsplit("/", 1)[1], key_a)


@PROPS
@given(a=st.text(min_size=1, max_size=300), b=st.text(min_size=1, max_size=300))
def test_temp_tokens_of_any_keys_are_distinct_single_components(a: str, b: str) -> None:
    for key in (a, b):
        token = temp_token(key)
        assert "/" not in token and "~" not in token and len(token.encode()) <= 236
    if a != b:
        assert temp_token(a) != temp_token(b)


@PROPS
@given(pair=named)
def test_video_keys_are_spelled_out_in_their_tokens(pair: tuple[str, str | None]) -> None:
    """Video keys never fall back to a digest: their temporaries are exactly theirs."""
    assert not temp_token(video_key(*pair)).startswith("+")


# --- real files: a killed writer's leftovers ----------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: the writer stops mid-stream."""


def leave_temp(store: OutputStore, key: str, temp_dir: Path) -> Path:
    """Leave the temporary a writer of `key` killed mid-stream would leave: start a real write,
    note the file it creates, stop it, and put that file back (a SIGKILLed process would not
    have removed it)."""
    before = set(os.listdir(temp_dir)) if temp_dir.exists() else set()
    created: list[str] = []

    def chunks() -> Iterator[bytes]:
        yield b"half a video"
        created.extend(set(os.listdir(temp_dir)) - before)
        raise Killed

    with pytest.raises(Killed):
        store.write_stream_atomic(key, chunks(), expected_size=None)
    assert len(created) == 1
    leftover = temp_dir / created[0]
    leftover.write_bytes(b"half a video")
    return leftover


@FILE_PROPS
@given(
    pairs=st.one_of(st.lists(named, min_size=2, max_size=5), family),
    which=st.integers(min_value=0, max_value=4),
)
def test_sweeping_one_item_leaves_every_other_name_alone(
    pairs: list[tuple[str, str | None]], which: int
) -> None:
    keys = list(dict.fromkeys(_key_of(p) for p in pairs))
    assume(len(keys) >= 2)
    with tempfile.TemporaryDirectory() as root:
        store = OutputStore(root)
        temp_dir = Path(root) / TEMP_DIR
        for key in keys:
            store.write_bytes_atomic(key, f"video of {key}".encode())
        leftovers = {key: leave_temp(store, key, temp_dir) for key in keys}
        assert store.list() == sorted(keys)  # temporaries are never listed

        swept = keys[which % len(keys)]
        assert store.remove_temp_files(swept) == 1
        assert not leftovers[swept].exists()
        for key in keys:
            assert store.read_bytes(key) == f"video of {key}".encode()
            if key != swept:
                assert leftovers[key].exists()
        assert store.remove_temp_files(swept) == 0


def test_a_tricky_pair_by_hand(tmp_path: Path) -> None:
    """The issue's example: item `a` and item `a.mp4.part-x` (whose video is
    `videos/a.mp4.part-x.mp4`, inside the old sweep pattern `videos/a.mp4.part-*`)."""
    store = OutputStore(str(tmp_path / "o"))
    a, other = video_key("a"), video_key("a.mp4.part-x")
    store.write_bytes_atomic(other, b"paid video of the other item")
    leftover = leave_temp(store, a, tmp_path / "o" / TEMP_DIR)
    others_leftover = leave_temp(store, other, tmp_path / "o" / TEMP_DIR)
    assert store.remove_temp_files(a) == 1 and not leftover.exists()
    assert store.read_bytes(other) == b"paid video of the other item"
    assert others_leftover.exists()  # the other item's crashed download is not ours to remove
    assert store.list() == [other]


# --- leftovers of the previous naming (a run killed before an upgrade) --------------------------


def test_local_sweep_takes_the_old_names_of_exactly_its_key(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "o"))
    videos = tmp_path / "o" / "videos"
    videos.mkdir(parents=True)
    own = videos / ".a.mp4.part-k3j_9x2q"  # the old `.{name}.part-{mkstemp}` of videos/a.mp4
    others = [
        videos / ".a.mp4.part-x.mp4.part-abcdefgh",  # the old temporary of item a.mp4.part-x
        videos / ".b.mp4.part-abcdefgh",
    ]
    for p in [own, *others]:
        p.write_bytes(b"half")
    store.write_bytes_atomic("videos/a.mp4.part-x.mp4", b"a final video")
    assert store.list() == ["videos/a.mp4.part-x.mp4"]  # old temporaries are not listed
    assert store.remove_temp_files("videos/a.mp4") == 1
    assert not own.exists() and all(p.exists() for p in others)
    assert store.read_bytes("videos/a.mp4.part-x.mp4") == b"a final video"


# --- object stores: spool files, unfinished uploads, old temporary objects ----------------------


@pytest.fixture
def s3(s3_env: str, tmp_path: Path) -> tuple[OutputStore, Path, str]:
    spool = tmp_path / "spool"
    return OutputStore(f"s3://{s3_env}/o", spool_dir=str(spool)), spool, s3_env


def test_s3_sweep_takes_exactly_its_keys_leftovers(
    s3: tuple[OutputStore, Path, str], moto_server: str
) -> None:
    store, spool, bucket = s3
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    a = video_key("a")
    neighbours = [video_key("a.mp4.part-x"), video_key("a", "0123456789ab"), video_key("b")]
    for key in neighbours:
        store.write_bytes_atomic(key, f"video of {key}".encode())
    spooled = {key: leave_temp(store, key, spool) for key in [a, *neighbours]}
    uploads = {  # uploads a killed process began and never completed or aborted
        key: client.create_multipart_upload(Bucket=bucket, Key=f"o/{key}")["UploadId"]
        for key in [a, *neighbours, "videos/a.mp4x"]
    }
    old_own = f"o/{a}.part-{uuid.uuid4().hex}"  # the previous version's temporary object
    old_other = f"o/{neighbours[0]}.part-{uuid.uuid4().hex}"
    for name in (old_own, old_other):
        client.put_object(Bucket=bucket, Key=name, Body=b"half")
    assert store.list("videos") == sorted(neighbours)  # old temporaries are not listed

    assert store.remove_temp_files(a) == 3  # its spool file, its upload, its old object

    assert not spooled[a].exists()
    assert all(spooled[k].exists() for k in neighbours)
    left = {
        u["Key"]: u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    }
    assert left == {f"o/{k}": uploads[k] for k in [*neighbours, "videos/a.mp4x"]}
    names = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert old_own not in names and old_other in names
    for key in neighbours:
        assert store.read_bytes(key) == f"video of {key}".encode()
    assert store.remove_temp_files(a) == 0


def test_s3_writes_leave_no_temporary_object(s3: tuple[OutputStore, Path, str]) -> None:
    store, spool, bucket = s3
    store.write_stream_atomic("videos/x.mp4", iter([b"a" * 1000] * 3), expected_size=3000)
    assert store.fs.find(f"{bucket}/o") == [f"{bucket}/o/videos/x.mp4"]
    assert os.listdir(spool) == []


def test_temp_files_live_under_the_temp_folder(tmp_path: Path) -> None:
    store = OutputStore(str(tmp_path / "o"))
    leftover = leave_temp(store, video_key("a", "v1"), tmp_path / "o" / TEMP_DIR)
    assert leftover.parent == tmp_path / "o" / TEMP_DIR
    assert re.fullmatch(r"videos%2Fa%7Ev1\.mp4~[a-z0-9_]{8}\.part", leftover.name)


def test_s3_sweep_goes_on_when_uploads_cannot_be_listed(
    s3: tuple[OutputStore, Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unfinished uploads only cost storage (they are never visible): a key without the right
    to list them must not stop the sweep of the rest, nor the item."""
    store, spool, _ = s3
    leftover = leave_temp(store, video_key("a"), spool)
    real_call = store.fs.call_s3

    def call_s3(method: str, **kwargs: object) -> object:
        if method == "list_multipart_uploads":
            raise PermissionError("Access Denied")
        return real_call(method, **kwargs)

    monkeypatch.setattr(store.fs, "call_s3", call_s3)
    assert store.remove_temp_files(video_key("a")) == 1
    assert not leftover.exists()
