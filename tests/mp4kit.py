"""Real MP4 bytes for tests: tiny H.264 videos encoded with PyAV, in a few shapes."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def encode_mp4(
    path: Path, *, seconds: int = 2, fps: int = 4, faststart: bool = True, shade: int = 0
) -> bytes:
    """Write and return a 96x64 H.264 MP4 of `seconds` at `fps`; `faststart=False` puts the
    index (moov) after the media data; `shade` makes videos with different bytes."""
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as box:
        stream = box.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(seconds * fps):
            pixels = np.full((64, 96, 3), (shade + i * 20) % 255, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    return path.read_bytes()
