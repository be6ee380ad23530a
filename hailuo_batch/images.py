"""Check an input image against the provider's rules before paying for a task.

`inspect_image` reads only the first bytes of an image (never the whole file) from an http(s)
URL, an fsspec URL (s3://...) or a local path, and returns its format, dimensions and size.
`check_image_rules` turns that into a list of human-readable rule violations (empty = fine).
Fetch problems (not found, HTTP error, timeout) raise `ImageFetchError`; rule violations never do.
"""

from __future__ import annotations

import functools
import io
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urljoin, urlsplit

import fsspec
import httpx
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin

from hailuo_batch.netguard import BlockedAddressError, check_url_allowed

if TYPE_CHECKING:
    from hailuo_batch.settings import Settings

ACCEPTED_FORMATS = ("jpeg", "png")
HEADER_BOUND = 256 * 1024
"""Most bytes read to find format and dimensions (a JPEG's SOF may sit behind a large EXIF)."""
FIRST_READ = 64 * 1024
MAX_REDIRECTS = 5
# Aspect ratio must be strictly inside (2:5, 5:2); short side strictly above 300 px.
MIN_RATIO = (2, 5)
MAX_RATIO = (5, 2)
MIN_SHORT_SIDE = 300


class ImageFetchError(Exception):
    """The image could not be read at all (not found, HTTP error, timeout, refused address)."""


@dataclass(frozen=True)
class ImageInfo:
    """What the rules need to know about an image. `size_bytes` is None when unknown."""

    format: Literal["jpeg", "png"] | str
    width: int
    height: int
    size_bytes: int | None = None


def check_image_rules(info: ImageInfo, *, max_bytes: int) -> list[str]:
    """Every provider rule `info` breaks, as messages naming the rule and the values."""
    problems: list[str] = []
    if info.format not in ACCEPTED_FORMATS:
        if info.format == "unknown":
            problems.append("not a recognisable image (JPEG or PNG only)")
        else:
            problems.append(f"format {info.format} is not accepted (JPEG or PNG only)")
    w, h = info.width, info.height
    if info.format in ACCEPTED_FORMATS and (w <= 0 or h <= 0):
        problems.append(
            f"cannot read the image dimensions within the first {HEADER_BOUND // 1024} KiB "
            "(truncated or unusual file)"
        )
    if w > 0 and h > 0:
        # w/h > 2/5  <=>  5w > 2h ; w/h < 5/2  <=>  2w < 5h  (exact integer arithmetic)
        if not (MIN_RATIO[1] * w > MIN_RATIO[0] * h and MAX_RATIO[1] * w < MAX_RATIO[0] * h):
            problems.append(
                f"aspect ratio {w}x{h} ({w / h:.3f}) must be strictly between 2:5 (0.4) "
                "and 5:2 (2.5)"
            )
        short = min(w, h)
        if short <= MIN_SHORT_SIDE:
            problems.append(
                f"short side {short} px is too small: it must be more than {MIN_SHORT_SIDE} px"
            )
    if info.size_bytes is not None and info.size_bytes > max_bytes:
        problems.append(
            f"file size {info.size_bytes} bytes is over the limit of {max_bytes} bytes "
            "(HAILUO_MAX_IMAGE_BYTES)"
        )
    return problems


_MAGIC: list[tuple[int, bytes, str]] = [
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (8, b"WEBP", "webp"),
    (8, b"avif", "avif"),
    (8, b"heic", "heic"),
    (8, b"heix", "heic"),
    (8, b"mif1", "heic"),
]


def _try_sniff(header: bytes, *, complete: bool) -> ImageInfo | None:
    """Format and size from `header`, or None if more bytes are needed (and may exist)."""
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        factory: Callable[[io.BytesIO], ImageFile.ImageFile] = PngImagePlugin.PngImageFile
        fmt = "png"
    elif header.startswith(b"\xff\xd8\xff"):
        factory, fmt = JpegImagePlugin.JpegImageFile, "jpeg"
    else:
        for offset, magic, name in _MAGIC:
            if header[offset : offset + len(magic)] == magic:
                return ImageInfo(format=name, width=0, height=0)
        try:
            with Image.open(io.BytesIO(header)) as im:
                return ImageInfo(format=(im.format or "unknown").lower(), width=0, height=0)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
            return None if not complete and len(header) < 16 else _UNKNOWN
    try:
        # Plugin classes directly: no decompression-bomb refusal, we only want the header.
        im = factory(io.BytesIO(header))
    except (OSError, SyntaxError, ValueError, IndexError, EOFError):
        return None if not complete else ImageInfo(format=fmt, width=0, height=0)
    width, height = im.size
    im.close()
    return ImageInfo(format=fmt, width=width, height=height)


_UNKNOWN = ImageInfo(format="unknown", width=0, height=0)


def sniff_image(header: bytes) -> ImageInfo:
    """Format and dimensions from the first bytes of a file (pixels are not decoded).

    A JPEG/PNG whose dimensions are not within `header` gets width and height 0; bytes that
    are not a known image format give format "unknown". `size_bytes` is None.
    """
    return _try_sniff(header, complete=True) or _UNKNOWN


def _sniff_progressive(read_upto: Callable[[int], bytes], size: int | None) -> ImageInfo:
    """Read growing prefixes (64 KiB, then up to HEADER_BOUND) until the header parses."""
    limit = HEADER_BOUND if size is None else min(size, HEADER_BOUND)
    want = min(FIRST_READ, limit)
    while True:
        data = read_upto(want)
        complete = len(data) < want or want >= limit
        info = _try_sniff(data, complete=complete)
        if info is not None:
            return info
        want = limit


# --- fetching ---------------------------------------------------------------------------------


def inspect_image(
    source: str, *, settings: Settings, storage_options: dict | None = None
) -> ImageInfo:
    """Format, dimensions and size of the image at `source` (http(s), fsspec URL or local path).

    Reads at most about HEADER_BOUND bytes. http(s) URLs are checked with the private-network
    guard on every redirect hop, and the whole fetch is bounded by `settings.fetch_timeout_s`.
    """
    scheme = urlsplit(source).scheme.lower()
    if scheme in ("http", "https"):
        return _inspect_http(source, settings=settings)
    return _inspect_fsspec(source, storage_options=storage_options)


def _inspect_fsspec(source: str, *, storage_options: dict | None) -> ImageInfo:
    try:
        fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
        info = fs.info(path)
        if info.get("type") == "directory":
            raise ImageFetchError(f"image {source} is a directory, not a file")
        size = int(info["size"])
        return _with_size(
            _sniff_progressive(lambda n: fs.cat_file(path, start=0, end=min(n, size)), size),
            size,
        )
    except ImageFetchError:
        raise
    except FileNotFoundError as exc:
        raise ImageFetchError(f"image not found: {source}") from exc
    except PermissionError as exc:
        raise ImageFetchError(f"no permission to read image {source}: {exc}") from exc
    except Exception as exc:
        raise ImageFetchError(f"cannot read image {source}: {type(exc).__name__}: {exc}") from exc


def _with_size(info: ImageInfo, size: int | None) -> ImageInfo:
    return ImageInfo(format=info.format, width=info.width, height=info.height, size_bytes=size)


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One TLS context for every image fetch: loading the CA bundle costs ~40 ms of CPU."""
    return httpx.create_ssl_context()


def _inspect_http(url: str, *, settings: Settings) -> ImageInfo:
    limit = settings.fetch_timeout_s
    deadline = time.monotonic() + limit
    timeout = httpx.Timeout(limit, connect=min(settings.connect_timeout_s, limit))
    shown = _display_url(url)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, verify=_ssl_context()) as client:
            current = url
            for _hop in range(MAX_REDIRECTS + 1):
                try:
                    check_url_allowed(current, allow_private=settings.allow_private_networks)
                except BlockedAddressError as exc:
                    raise ImageFetchError(f"image URL {shown} refused: {exc}") from exc
                headers = {"Range": f"bytes=0-{HEADER_BOUND - 1}"}
                with client.stream("GET", current, headers=headers) as resp:
                    if resp.is_redirect:  # only when a Location header is present
                        current = urljoin(current, resp.headers["location"])
                        continue
                    if resp.status_code == 404:
                        raise ImageFetchError(f"image not found: {shown} (HTTP 404)")
                    if resp.status_code not in (200, 206):
                        raise ImageFetchError(
                            f"cannot fetch image {shown}: HTTP {resp.status_code}"
                        )
                    return _read_http_body(resp, settings=settings, deadline=deadline, url=shown)
            raise ImageFetchError(f"image URL {shown}: more than {MAX_REDIRECTS} redirects")
    except httpx.TimeoutException as exc:
        raise ImageFetchError(f"fetching image {shown} timed out after {limit:g} s") from exc
    except httpx.HTTPError as exc:
        raise ImageFetchError(f"cannot fetch image {shown}: {type(exc).__name__}: {exc}") from exc


def _read_http_body(
    resp: httpx.Response, *, settings: Settings, deadline: float, url: str
) -> ImageInfo:
    """Read the header (and, without a known size, count up to max_bytes+1) within the deadline."""
    size = _total_size(resp)
    ranged = resp.status_code == 206
    # Without a known size, keep counting past the header, stopping at max_bytes + 1.
    count_to = HEADER_BOUND if size is not None or ranged else settings.max_image_bytes + 1
    buf = bytearray()
    received = 0
    info: ImageInfo | None = None
    try_at = FIRST_READ  # parse attempts at 64 KiB and at the bound, not on every chunk
    for chunk in resp.iter_bytes():
        if time.monotonic() > deadline:
            raise ImageFetchError(
                f"fetching image {url} timed out after {settings.fetch_timeout_s:g} s"
            )
        received += len(chunk)
        if info is None:
            buf += chunk[: HEADER_BOUND - len(buf)]
            if len(buf) >= try_at:
                info = _try_sniff(bytes(buf), complete=len(buf) >= HEADER_BOUND)
                try_at = HEADER_BOUND
        if info is not None and received >= count_to:
            break
    if info is None:
        info = sniff_image(bytes(buf))
    if size is None and not ranged:
        size = min(received, count_to)  # the whole body, or max_bytes + 1: "too big"
    return _with_size(info, size)


def _total_size(resp: httpx.Response) -> int | None:
    """The full object size from Content-Range (206) or Content-Length (200)."""
    if resp.status_code == 206:
        total = resp.headers.get("content-range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = resp.headers.get("content-length", "")
    if length.isdigit() and "content-encoding" not in resp.headers:
        return int(length)
    return None


def _display_url(url: str) -> str:
    """The URL without query string or credentials (presigned URLs carry signatures)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}"
