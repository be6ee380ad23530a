"""verify_mp4 accepts complete, decodable MP4s only; duration_warning compares lengths."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mp4kit import encode_mp4
from PIL import Image

from hailuo_batch.emulator.video import encode_pan_zoom
from hailuo_batch.video import NotAVideoError, VideoInfo, duration_warning, verify_mp4

PROPS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _jpeg(width: int = 640, height: int = 360) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("videos")
    emulator_mp4 = root / "emulator.mp4"  # what the emulator serves: 6 s at 768p-like size
    encode_pan_zoom(_jpeg(), 320, 180, 6, 4, emulator_mp4)
    faststart = encode_mp4(root / "fast.mp4")
    return {
        "emulator": emulator_mp4.read_bytes(),
        "faststart": faststart,
        "moov_last": encode_mp4(root / "slow.mp4", faststart=False),
        "mdat_to_end": _mdat_to_end(faststart),
    }


def _mdat_to_end(video: bytes) -> bytes:
    """The same video with its `mdat` box sized 0, "to the end of the file" (valid ISO-BMFF),
    which hides from the box sizes where the data should end."""
    data = bytearray(video)
    _, offset, _ = next(b for b in _boxes(video) if b[0] == b"mdat")
    data[offset : offset + 4] = b"\x00\x00\x00\x00"
    return bytes(data)


def _boxes(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of the top-level boxes."""
    out, pos = [], 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        size = size or len(data) - pos  # 0: to the end of the file
        out.append((kind, pos, size))
        pos += size
    return out


def _refused(data: bytes, rule: str) -> None:
    with pytest.raises(NotAVideoError, match=rule):
        verify_mp4(io.BytesIO(data))


# --- what passes --------------------------------------------------------------------------------


def test_a_real_video_passes_with_its_facts(videos: dict[str, bytes], tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    path.write_bytes(videos["emulator"])
    info = verify_mp4(path)
    assert info == VideoInfo(
        duration_s=6.0, width=320, height=180, codec="h264", frames_decoded=1, frames=24
    )
    assert verify_mp4(str(path)) == info
    assert verify_mp4(io.BytesIO(videos["emulator"])) == info


def test_index_at_the_end_passes_too(videos: dict[str, bytes]) -> None:
    assert [b[0] for b in _boxes(videos["moov_last"])][-1] == b"moov"
    info = verify_mp4(io.BytesIO(videos["moov_last"]))
    assert (info.width, info.height, info.frames, info.duration_s) == (96, 64, 8, 2.0)


def test_a_file_object_is_read_from_its_start(videos: dict[str, bytes]) -> None:
    f = io.BytesIO(videos["faststart"])
    f.seek(100)
    assert verify_mp4(f).frames == 8


# --- what is refused, and which rule says so ---------------------------------------------------


def test_empty() -> None:
    _refused(b"", "empty")


@pytest.mark.parametrize(
    "body",
    [
        b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>",
        b'{"code": 500, "message": "internal error", "data": null}',
        b"\x00",
        b"Access Denied",
    ],
)
def test_text_and_error_pages(body: bytes) -> None:
    _refused(body, "not an MP4 container")


def test_a_png_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (400, 400), (1, 2, 3)).save(buf, "PNG")
    _refused(buf.getvalue(), "not an MP4 container")


def test_gzip_encoded_video_is_not_itself_a_video(videos: dict[str, bytes]) -> None:
    """Bytes still Content-Encoded (a client that did not decode) are refused, not stored."""
    _refused(gzip.compress(videos["emulator"]), "not an MP4 container")


def test_an_mp4_without_video(tmp_path: Path) -> None:
    path = tmp_path / "audio.mp4"
    with av.open(str(path), mode="w", format="mp4") as box:
        stream = box.add_stream("aac", rate=8000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono"
            )
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    _refused(path.read_bytes(), "no video stream")


def test_media_data_that_does_not_decode(videos: dict[str, bytes]) -> None:
    data = bytearray(videos["faststart"])
    _, offset, size = next(b for b in _boxes(bytes(data)) if b[0] == b"mdat")
    data[offset + 8 : offset + size] = b"\x00" * (size - 8)
    _refused(bytes(data), "no decodable frame")


def test_garbage_after_the_last_box(videos: dict[str, bytes]) -> None:
    _refused(videos["emulator"] + b"<html>oops</html>", "not an MP4 container|truncated")
    _refused(videos["emulator"] + b"<p>", "not an MP4 container")


def test_a_damaged_index(videos: dict[str, bytes]) -> None:
    data = bytearray(videos["faststart"])
    _, offset, size = next(b for b in _boxes(bytes(data)) if b[0] == b"moov")
    data[offset + 8 : offset + size] = b"\xff" * (size - 8)
    with pytest.raises(NotAVideoError):
        verify_mp4(io.BytesIO(bytes(data)))


@pytest.mark.parametrize("name", ["faststart", "moov_last", "emulator", "mdat_to_end"])
def test_every_cut_at_a_box_boundary_is_refused(videos: dict[str, bytes], name: str) -> None:
    data = videos[name]
    for _, offset, size in _boxes(data):
        for cut in (offset, offset + 8, offset + size - 1):
            if 0 < cut < len(data):
                with pytest.raises(NotAVideoError):
                    verify_mp4(io.BytesIO(data[:cut]))


def test_a_cut_hidden_by_a_box_that_runs_to_the_end_is_refused(videos: dict[str, bytes]) -> None:
    """A `mdat` of size 0 ("to the end of the file") hides where the data should end: the
    frames the index lists must then all be there."""
    data = videos["mdat_to_end"]
    offset = next(b[1] for b in _boxes(videos["faststart"]) if b[0] == b"mdat")
    assert verify_mp4(io.BytesIO(data)).frames == 8  # complete: fine
    for cut in (len(data) - 1, len(data) - 300, offset + 40):
        _refused(bytes(data[:cut]), "truncated")


@PROPS
@given(data=st.data())
def test_no_strict_prefix_of_a_video_passes(videos: dict[str, bytes], data: st.DataObject) -> None:
    """A body cut short anywhere (no Content-Length to tell) is never taken for a video."""
    name = data.draw(st.sampled_from(sorted(videos)))
    video = videos[name]
    cut = data.draw(st.integers(min_value=0, max_value=len(video) - 1))
    with pytest.raises(NotAVideoError):
        verify_mp4(io.BytesIO(video[:cut]))


@PROPS
@given(body=st.binary(min_size=0, max_size=4096))
def test_random_bytes_are_never_a_video(body: bytes) -> None:
    with pytest.raises(NotAVideoError):
        verify_mp4(io.BytesIO(body))


@PROPS
@given(data=st.data())
def test_random_bytes_behind_an_mp4_header_are_never_a_video(
    videos: dict[str, bytes], data: st.DataObject
) -> None:
    """Random bytes after a real `ftyp` box (a sniffer would say "MP4") are refused."""
    video = videos["faststart"]
    ftyp_end = _boxes(video)[0][2]
    tail = data.draw(st.binary(min_size=0, max_size=2048))
    with pytest.raises(NotAVideoError):
        verify_mp4(io.BytesIO(video[:ftyp_end] + tail))


# --- duration -----------------------------------------------------------------------------------


def _info(duration: float | None) -> VideoInfo:
    return VideoInfo(duration, 1366, 768, "h264", 1, 144)


@pytest.mark.parametrize(
    ("duration", "requested", "warns"),
    [
        (6.0, 6, False),
        (6.4, 6, False),
        (5.6, 6, False),
        (6.6, 6, True),
        (5.4, 6, True),
        (10.04, 10, False),
        (6.0, 10, True),
        (6.0, None, False),
    ],
)
def test_duration_warning(duration: float, requested: int | None, warns: bool) -> None:
    warning = duration_warning(_info(duration), requested)
    if warns:
        assert warning is not None
        assert f"{duration:.2f} s" in warning and f"{requested} s were requested" in warning
    else:
        assert warning is None


def test_unknown_duration_is_reported_when_a_length_was_asked() -> None:
    assert duration_warning(_info(None), None) is None
    assert "cannot be read" in (duration_warning(_info(None), 6) or "")


def test_emulator_video_matches_its_requested_length(videos: dict[str, bytes]) -> None:
    info = verify_mp4(io.BytesIO(videos["emulator"]))
    assert duration_warning(info, 6) is None
    assert duration_warning(info, 10) is not None


@pytest.mark.parametrize(
    ("size", "mode", "warns"),
    [
        ((1366, 768), "standard-image-to-video", False),
        ((432, 768), "standard-image-to-video", False),  # portrait: the height
        ((768, 1366), "standard-image-to-video", False),  # portrait: the shorter side
        ((768, 768), "standard-image-to-video", False),
        ((1920, 1080), "pro-image-to-video", False),
        ((1920, 1088), "pro-image-to-video", False),  # coded height, within the tolerance
        ((768, 768), "pro-image-to-video", True),  # billed for 1080p
        ((1280, 720), "standard-image-to-video", True),
        ((1920, 1080), "standard-image-to-video", True),
        ((640, 360), "some-future-mode", False),  # a mode with no known resolution
    ],
)
def test_resolution_warning(size: tuple[int, int], mode: str, warns: bool) -> None:
    from hailuo_batch.video import resolution_warning

    warning = resolution_warning(VideoInfo(6.0, *size, "h264", 1, 144), mode)
    if warns:
        assert warning is not None and f"{size[0]}x{size[1]}" in warning and mode in warning
    else:
        assert warning is None


def test_the_emulators_video_is_the_resolution_its_mode_is_billed_for(tmp_path: Path) -> None:
    from hailuo_batch.emulator.video import ImageInfo, output_size
    from hailuo_batch.video import resolution_warning

    width, height = output_size(ImageInfo("x", 640, 360), 768)  # what a standard task serves
    encode_pan_zoom(_jpeg(), width, height, 1, 2, tmp_path / "v.mp4")
    info = verify_mp4(io.BytesIO((tmp_path / "v.mp4").read_bytes()))
    assert resolution_warning(info, "standard-image-to-video") is None
    assert resolution_warning(info, "pro-image-to-video") is not None
