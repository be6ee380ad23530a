"""Is it a video? Checks a downloaded result before it may be stored under its final name.

A provider's CDN can answer a result URL with an HTML error page (status 200), an empty body or a
body cut short when no Content-Length was sent. None of these may be stored as a success: a rerun
would then say "already stored" forever. `verify_mp4` accepts only a complete MP4 whose video
stream decodes, reading the whole file's structure but decoding one frame only.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import av

from hailuo_batch.apixo.models import PRO_DURATION_S

POSTER_AT_S = 0.5
"""A poster shows the frame at this time: the input image has begun to move."""
POSTER_MAX_WIDTH = 480

DURATION_TOLERANCE_S = 0.5
"""A video whose length differs from the requested clip length by more than this is reported."""

_HEADER = struct.Struct(">I4s")
_LARGE = struct.Struct(">Q")
# the mp4 family is one demuxer in FFmpeg ("mov,mp4,m4a,3gp,3g2,mj2")
_MP4_DEMUXER = "mp4"
# Opening a container makes FFmpeg probe each stream by decoding its first frames; the check
# decodes the first frame itself right after, so the probe's decoding is skipped (it was half
# of the check's CPU on a 1366x768 clip). The check's own decoder keeps its default.
OPEN_OPTIONS = {"skip_frame": "all"}


class NotAVideoError(ValueError):
    """The bytes are not a complete, decodable MP4 video; the message says which rule broke."""


@dataclass(frozen=True)
class VideoInfo:
    """What `verify_mp4` found in a video."""

    duration_s: float | None
    width: int
    height: int
    codec: str
    frames_decoded: int
    """Frames actually decoded to prove the stream decodes (one: the file is not decoded whole)."""
    frames: int = 0
    """Frames in the video stream (every one's data is present in the file)."""
    poster: bytes | None = field(default=None, repr=False, compare=False)
    """With `verify_mp4(..., poster_at_s=...)`: a JPEG of the frame shown then (`poster_jpeg`),
    or None when no frame up to then decodes."""


def verify_mp4(
    source: str | os.PathLike[str] | BinaryIO, *, poster_at_s: float | None = None
) -> VideoInfo:
    """Check that `source` (a path or a seekable binary file) is a complete MP4 with a video
    stream whose first frame decodes; return what it holds.

    Raises `NotAVideoError` naming the broken rule: empty; not an MP4 container (no `ftyp` box
    first, or FFmpeg's mp4 demuxer refuses it); truncated (a top-level box runs past the end of
    the file, or a frame's data is missing); no video stream; no decodable frame.

    With `poster_at_s`, the same pass decodes on to the frame shown at that time (the last one
    of a shorter video) and returns it as `info.poster`; a frame that fails to decode there
    only leaves the poster out, it never fails the check.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return _verify_file(f, poster_at_s)
    source.seek(0)
    return _verify_file(source, poster_at_s)


def is_poster_frame(frame: av.VideoFrame, at_s: float) -> bool:
    """Whether decoding stops at `frame` for a poster at `at_s`: it is shown then or later (or
    has no time); a video that ends sooner gives its last frame."""
    return frame.time is None or frame.time >= at_s


def poster_jpeg(frame: av.VideoFrame, max_width: int = POSTER_MAX_WIDTH) -> bytes:
    """A JPEG of `frame`, at most `max_width` pixels wide (never enlarged)."""
    width, height = frame.width, frame.height
    if width > max_width:  # scaled by swscale straight from YUV: ~20x faster than Pillow
        width, height = max_width, max(1, round(height * max_width / width))
    image = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
    out = io.BytesIO()
    image.to_image().save(out, "JPEG", quality=80)
    return out.getvalue()


def _verify_file(f: BinaryIO, poster_at_s: float | None = None) -> VideoInfo:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size == 0:
        raise NotAVideoError("empty: the body has 0 bytes")
    _check_boxes(f, size)
    f.seek(0)
    try:
        container = av.open(f, mode="r", format=_MP4_DEMUXER, options=OPEN_OPTIONS)
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise NotAVideoError(f"not an MP4 container: {exc}") from exc
    with container:
        if not container.streams.video:
            raise NotAVideoError("no video stream in the MP4")
        return _check_stream(container, container.streams.video[0], poster_at_s)


def _check_boxes(f: BinaryIO, size: int) -> None:
    """The top-level ISO-BMFF boxes: `ftyp` first, each box inside the file, a `moov` present.

    A body cut short ends inside a box (almost always `mdat` or `moov`), which this catches
    without reading the media data.
    """
    pos = 0
    seen: list[bytes] = []
    while pos < size:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise NotAVideoError(
                f"not an MP4 container: {size - pos} bytes after its last box are not a box"
            )
        length, kind = _HEADER.unpack(header)
        header_len = _HEADER.size
        if length == 1:  # 64-bit size follows
            large = f.read(_LARGE.size)
            if len(large) < _LARGE.size:
                raise NotAVideoError("truncated: cut inside an MP4 box header")
            (length,) = _LARGE.unpack(large)
            header_len += _LARGE.size
        elif length == 0:  # the box runs to the end of the file
            length = size - pos
        if not seen and kind != b"ftyp":
            raise NotAVideoError(
                "not an MP4 container: it does not start with an 'ftyp' box "
                f"(first bytes {header[:8]!r})"
            )
        if length < header_len:
            raise NotAVideoError(f"not an MP4 container: box {kind!r} has an invalid size")
        if pos + length > size:
            raise NotAVideoError(
                f"truncated: MP4 box {kind.decode('latin-1')!r} needs {length} bytes "
                f"but only {size - pos} remain"
            )
        seen.append(kind)
        pos += length
        f.seek(pos)
    for kind, what in ((b"moov", "index"), (b"mdat", "media data")):
        if kind not in seen:
            raise NotAVideoError(f"truncated: the MP4 has no {kind.decode()!r} box (its {what})")


def _check_stream(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    poster_at_s: float | None = None,
) -> VideoInfo:
    """Demux every packet of `stream` (cheap: no decoding), decode until the first frame (and,
    with `poster_at_s`, on to the poster's frame)."""
    packets = 0
    first: av.VideoFrame | None = None
    poster = _PosterFrame(poster_at_s)
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            if packet.is_corrupt:
                raise NotAVideoError(
                    f"truncated: frame {packets + 1} of the video stream is incomplete"
                )
            packets += 1
            if first is None:
                first = next(iter(stream.decode(packet)), None)
                poster.offer(first)
            elif poster.wanted:
                poster.decode(stream, packet)
        if first is None:
            first = next(iter(stream.decode(None)), None)  # flush: frames held by the decoder
            poster.offer(first)
        elif poster.wanted:
            poster.decode(stream, None)
    except av.FFmpegError as exc:
        if first is None:
            raise NotAVideoError(f"no decodable frame: {exc}") from exc
        raise NotAVideoError(f"truncated: the video stream breaks off: {exc}") from exc
    if first is None:
        raise NotAVideoError(f"no decodable frame in the video stream ({packets} packets)")
    if stream.frames and packets != stream.frames:
        raise NotAVideoError(
            f"truncated: the video stream has {packets} of its {stream.frames} frames"
        )
    return VideoInfo(
        duration_s=_duration_s(container, stream),
        width=first.width,
        height=first.height,
        codec=stream.codec_context.name,
        frames_decoded=1,
        frames=packets,
        poster=poster.jpeg(),
    )


class _PosterFrame:
    """The frame shown at `at_s` (None: no poster wanted), met while a stream is decoded."""

    def __init__(self, at_s: float | None) -> None:
        self.at_s = at_s
        self.chosen: av.VideoFrame | None = None
        self.wanted = at_s is not None
        self.broken = False

    def offer(self, frame: av.VideoFrame | None) -> None:
        if not self.wanted or frame is None:
            return
        self.chosen = frame
        if self.at_s is None or is_poster_frame(frame, self.at_s):
            self.wanted = False

    def decode(self, stream: av.VideoStream, packet: av.Packet | None) -> None:
        """Decode `packet` (None: flush the decoder) for the poster only: a frame that fails
        here leaves the poster out, and never fails the check."""
        try:
            for frame in stream.decode(packet):
                self.offer(frame)
                if not self.wanted:
                    return
        except av.FFmpegError:
            self.wanted, self.broken = False, True

    def jpeg(self) -> bytes | None:
        """The poster, or None: not asked, no frame, or one that cannot be made (a poster is
        optional; the check's verdict never depends on it)."""
        if self.at_s is None or self.chosen is None or self.broken:
            return None
        try:
            return poster_jpeg(self.chosen)
        except Exception:  # noqa: BLE001 - swscale, Pillow or memory: no poster, same verdict
            return None


def _duration_s(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def paid_for_facts(info: VideoInfo | None, mode: str, duration: int | None) -> dict[str, Any]:
    """A verified video's duration and resolution, and a warning when it is not the clip the
    order (`mode`, `duration`; a pro clip is always 6 s) paid for; {} with no video info."""
    if not isinstance(info, VideoInfo):
        return {}
    requested = PRO_DURATION_S if mode == "pro-image-to-video" else duration
    warnings = (duration_warning(info, requested), resolution_warning(info, mode))
    return {
        "video_duration_s": None if info.duration_s is None else round(info.duration_s, 2),
        "video_resolution": f"{info.width}x{info.height}",
        "warning": "; ".join(w for w in warnings if w) or None,
    }


#: the output height each mode is billed for ("768p", "1080p"), and how far off it may be
MODE_HEIGHTS = {"standard-image-to-video": 768, "pro-image-to-video": 1080}
RESOLUTION_TOLERANCE_PX = 8


def resolution_warning(info: VideoInfo, mode: str) -> str | None:
    """A warning when the video is not the resolution its mode is billed for: its height (or,
    for a portrait clip, its shorter side) more than `RESOLUTION_TOLERANCE_PX` from the
    mode's; None when it matches or the mode names none."""
    expected = MODE_HEIGHTS.get(mode)
    if expected is None or not info.width or not info.height:
        return None
    sides = (info.height, min(info.width, info.height))
    if any(abs(side - expected) <= RESOLUTION_TOLERANCE_PX for side in sides):
        return None
    return f"the video is {info.width}x{info.height} but {mode} is billed for {expected}p"


def duration_warning(info: VideoInfo, requested_s: int | float | None) -> str | None:
    """A warning when the video's length is not the requested clip length (more than
    `DURATION_TOLERANCE_S` apart), or cannot be read; None when it matches or nothing was asked.
    """
    if requested_s is None:
        return None
    if info.duration_s is None:
        return f"the video's duration cannot be read ({requested_s:g} s were requested)"
    if abs(info.duration_s - requested_s) > DURATION_TOLERANCE_S:
        return f"the video lasts {info.duration_s:.2f} s but {requested_s:g} s were requested"
    return None
