"""Is it a video? Checks a downloaded result before it may be stored under its final name.

A provider's CDN can answer a result URL with an HTML error page (status 200), an empty body or a
body cut short when no Content-Length was sent. None of these may be stored as a success: a rerun
would then say "already stored" forever. `verify_mp4` accepts only a complete MP4 whose video
stream decodes, reading the whole file's structure but decoding one frame only.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import av

DURATION_TOLERANCE_S = 0.5
"""A video whose length differs from the requested clip length by more than this is reported."""

_HEADER = struct.Struct(">I4s")
_LARGE = struct.Struct(">Q")
# the mp4 family is one demuxer in FFmpeg ("mov,mp4,m4a,3gp,3g2,mj2")
_MP4_DEMUXER = "mp4"


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


def verify_mp4(source: str | os.PathLike[str] | BinaryIO) -> VideoInfo:
    """Check that `source` (a path or a seekable binary file) is a complete MP4 with a video
    stream whose first frame decodes; return what it holds.

    Raises `NotAVideoError` naming the broken rule: empty; not an MP4 container (no `ftyp` box
    first, or FFmpeg's mp4 demuxer refuses it); truncated (a top-level box runs past the end of
    the file, or a frame's data is missing); no video stream; no decodable frame.
    """
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            return _verify_file(f)
    source.seek(0)
    return _verify_file(source)


def _verify_file(f: BinaryIO) -> VideoInfo:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size == 0:
        raise NotAVideoError("empty: the body has 0 bytes")
    _check_boxes(f, size)
    f.seek(0)
    try:
        container = av.open(f, mode="r", format=_MP4_DEMUXER)
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise NotAVideoError(f"not an MP4 container: {exc}") from exc
    with container:
        if not container.streams.video:
            raise NotAVideoError("no video stream in the MP4")
        return _check_stream(container, container.streams.video[0])


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


def _check_stream(container: av.container.InputContainer, stream: av.VideoStream) -> VideoInfo:
    """Demux every packet of `stream` (cheap: no decoding), decode until the first frame."""
    packets = 0
    first: av.VideoFrame | None = None
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
        if first is None:
            first = next(iter(stream.decode(None)), None)  # flush: frames held by the decoder
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
    )


def _duration_s(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


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
