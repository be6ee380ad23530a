"""Input image checks and result videos: an H.264 MP4 slowly panning and zooming over the image.

Encoded files are cached on disk by (image sha256, width, height, duration, fps), so a thousand
tasks on one image encode once. Encoding runs in a small thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

ENCODER_VERSION = "v1"
ACCEPTED_FORMATS = ("JPEG", "PNG")
_ZOOM = 0.15  # the last frame shows 1/(1+_ZOOM) of the image


class ImageRejected(Exception):
    """The input image cannot be used; `code` is the task's failCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    width: int
    height: int


def _open_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        oriented = ImageOps.exif_transpose(im)
        return oriented.convert("RGB")


def inspect_image(data: bytes, max_bytes: int) -> ImageInfo:
    """Check the provider's input rules (by the bytes, not the name); raise ImageRejected."""
    if len(data) > max_bytes:
        raise ImageRejected("IMAGE_TOO_LARGE", f"image is {len(data)} bytes, limit {max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in ACCEPTED_FORMATS:
                raise ImageRejected("UNSUPPORTED_FORMAT", f"image format {fmt} is not accepted")
            im.load()
            width, height = ImageOps.exif_transpose(im).size
    except ImageRejected:
        raise
    except Exception as exc:  # any decoder error: not an image we take
        raise ImageRejected("UNSUPPORTED_FORMAT", "image cannot be decoded") from exc
    ratio = width / height
    if not (0.4 < ratio < 2.5) or min(width, height) <= 300:
        raise ImageRejected(
            "INVALID_IMAGE_URL", f"image size {width}x{height} is outside the accepted range"
        )
    return ImageInfo(hashlib.sha256(data).hexdigest(), width, height)


def output_size(info: ImageInfo, height: int) -> tuple[int, int]:
    """(width, height) of the video: the given height, the image's aspect, even width."""
    width = max(2, round(height * info.width / info.height / 2) * 2)
    return width, height


def encode_pan_zoom(
    data: bytes, width: int, height: int, duration_s: int, fps: int, out: Path
) -> None:
    """Write an H.264/yuv420p MP4 of `duration_s` seconds panning and zooming over the image."""
    src = _open_rgb(data)
    # One good resize up front; each frame is then a crop scaled by swscale (cheap).
    base_w, base_h = round(width * (1 + _ZOOM)), round(height * (1 + _ZOOM))
    pixels = np.asarray(src.resize((base_w, base_h), Image.Resampling.LANCZOS))
    n_frames = duration_s * fps
    time_base = Fraction(1, fps)
    with av.open(str(out), mode="w", format="mp4", options={"movflags": "+faststart"}) as box:
        stream = box.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            t = i / max(1, n_frames - 1)
            t = t * t * (3 - 2 * t)  # smoothstep
            zoom = 1 + _ZOOM * t
            crop_w, crop_h = round(base_w / zoom), round(base_h / zoom)
            x0 = round((base_w - crop_w) * t)
            y0 = (base_h - crop_h) // 2
            crop = np.ascontiguousarray(pixels[y0 : y0 + crop_h, x0 : x0 + crop_w])
            frame = av.VideoFrame.from_ndarray(crop, format="rgb24").reformat(
                width=width, height=height, format="yuv420p", interpolation="BILINEAR"
            )
            frame.pts = i
            frame.time_base = time_base
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)


class VideoCache:
    """Encode once per (image, size, duration, fps); concurrent requests share one encode."""

    def __init__(self, directory: Path, workers: int) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="emu-encode")
        self._pending: dict[Path, asyncio.Future[Path]] = {}
        self.encodes = 0

    def path_for(self, sha256: str, width: int, height: int, duration_s: int, fps: int) -> Path:
        name = f"{ENCODER_VERSION}_{sha256[:40]}_{width}x{height}_{duration_s}s_{fps}fps.mp4"
        return self.directory / name

    async def get(
        self, data: bytes, info: ImageInfo, width: int, height: int, duration_s: int, fps: int
    ) -> Path:
        path = self.path_for(info.sha256, width, height, duration_s, fps)
        if path.exists():
            return path
        pending = self._pending.get(path)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Path] = loop.create_future()
        self._pending[path] = future
        try:
            await loop.run_in_executor(
                self._pool, self._encode_to, data, width, height, duration_s, fps, path
            )
            self.encodes += 1
            future.set_result(path)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._pending[path]
        return path

    def _encode_to(
        self, data: bytes, width: int, height: int, duration_s: int, fps: int, path: Path
    ) -> None:
        fd, tmp = tempfile.mkstemp(suffix=".mp4.part", dir=self.directory)
        os.close(fd)
        try:
            encode_pan_zoom(data, width, height, duration_s, fps, Path(tmp))
            os.replace(tmp, path)  # atomic: readers never see a partial file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
