"""Check an input image against the provider's rules before paying for a task.

`inspect_image` reads the first bytes of an image and its last few bytes from an http(s) URL,
an s3:// URL or a plain local path, and returns its format, dimensions and size; only a file
whose last bytes are not how its format ends (a PNG's IEND, a JPEG's EOI) is read whole (within
the size limit) and its image data decoded cheaply, to tell a file cut short from one with bytes
appended after a complete image.
`check_image_rules` turns that into a list of human-readable rule violations (empty = fine).
A URL of any other form raises `ImageUrlError` before anything is read; fetch problems (not
found, HTTP error, timeout, refused address) raise `ImageFetchError`; rule violations never do.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import ssl
import stat
import threading
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import fsspec
import httpx
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin

from hailuo_batch.apixo.transport import decoded_url
from hailuo_batch.netguard import (
    BlockedAddressError,
    GuardedTransport,
    ImageUrlError,
    image_url_kind,
    redact_url,
)

if TYPE_CHECKING:
    from hailuo_batch.settings import Settings

ACCEPTED_FORMATS = ("jpeg", "png")
HEADER_BOUND = 1024 * 1024
"""Most bytes read to find format and dimensions: a JPEG's SOF may sit behind EXIF, XMP and ICC
segments of several hundred KB (each segment is at most 64 KB, but a file may have many)."""
FIRST_READ = 64 * 1024
TAIL_BYTES = 64
"""Bytes read at the end of a file to see how it ends (a PNG's IEND chunk, a JPEG's EOI)."""
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
    # the fewest bytes a whole file of this format and these dimensions can have
    # (`least_bytes`), None when there is no such bound
    least_bytes: int | None = None
    # what the file's own structure says is broken (e.g. a JPEG without image data), as
    # messages for `check_image_rules`
    defects: tuple[str, ...] = ()


#: Pillow's own default for `Image.MAX_IMAGE_PIXELS` (1 GiB of 24-bit pixels over 4)
PILLOW_DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


def pixel_limit() -> int:
    """The most pixels an image may have: above twice `PIL.Image.MAX_IMAGE_PIXELS` Pillow
    raises `DecompressionBombError` instead of opening it (the provider's decoder refuses it as
    UNSUPPORTED_FORMAT, and so does the emulator). Pillow's default when this process turned
    its guard off: the provider's is on."""
    return 2 * (Image.MAX_IMAGE_PIXELS or PILLOW_DEFAULT_MAX_PIXELS)


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
    problems.extend(info.defects)
    if w > 0 and h > 0 and w * h > (limit := pixel_limit()):
        problems.append(
            f"the image has {w * h} pixels ({w}x{h}), over the limit of {limit} pixels "
            "(above it Pillow refuses to decode an image, as a decompression bomb)"
        )
    if info.size_bytes is not None and info.least_bytes and info.size_bytes < info.least_bytes:
        problems.append(
            f"the file is {info.size_bytes} bytes, too small to hold a {w}x{h} "
            f"{info.format.upper()} (at least {info.least_bytes} bytes): it is truncated, or its "
            "header declares dimensions its data does not have"
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
        except Exception:  # noqa: BLE001 - see below
            # Whatever a plugin raises on bytes it half recognises (a malformed DDS raises
            # NotImplementedError, others struct.error or TypeError) means the same thing:
            # not an image the provider takes.
            return None if not complete and len(header) < 16 else _UNKNOWN
    try:
        # Plugin classes directly: no decompression-bomb refusal, we only want the header.
        im = factory(io.BytesIO(header))
    except Exception:  # noqa: BLE001 - any parser error: the header is cut short or malformed
        return None if not complete else ImageInfo(format=fmt, width=0, height=0)
    width, height = im.size
    im.close()
    frame: int | None = None
    defects: tuple[str, ...] = ()
    if fmt == "jpeg":
        frame, scan = _jpeg_layout(header)
        if scan is None and not complete:
            return None  # the start of scan may be in the bytes not read yet
        if not scan:
            where = f" within the first {HEADER_BOUND // 1024} KiB" if scan is None else ""
            defects = (
                "the JPEG has no image data: no start-of-scan marker (FF DA) follows its "
                f"frame header{where}",
            )
    least = least_bytes(fmt, width, height, frame)
    return ImageInfo(format=fmt, width=width, height=height, least_bytes=least, defects=defects)


#: deflate codes at most 258 bytes in a 2-bit match: no zlib stream is smaller than 1/1032 of
#: its data
DEFLATE_MAX_RATIO = 1032
#: a PNG's signature, IHDR, one IDAT's length/type/CRC and IEND
PNG_OVERHEAD = 8 + 25 + 12 + 12
#: JPEG frames coded with Huffman tables (baseline, extended, progressive): every 8x8 block of
#: the first component costs at least one bit (its DC code). Arithmetic and lossless codings
#: have no such bound.
HUFFMAN_FRAMES = frozenset({0xC0, 0xC1, 0xC2})


def least_bytes(fmt: str, width: int, height: int, jpeg_frame: int | None) -> int | None:
    """The fewest bytes a complete `fmt` image of `width` x `height` can take, or None when no
    bound is known. A PNG holds `height` filter bytes plus at least one bit per pixel, deflated
    at best 1032:1; a Huffman-coded JPEG at least one bit per 8x8 block. Far below any real
    image: only a file cut short, or a header that lies about its size, is under it."""
    if width <= 0 or height <= 0:
        return None
    if fmt == "png":
        raw = height * (1 + -(-width // 8))
        return PNG_OVERHEAD + -(-raw // DEFLATE_MAX_RATIO)
    if fmt == "jpeg" and jpeg_frame in HUFFMAN_FRAMES:
        blocks = -(-width // 8) * -(-height // 8)
        return -(-blocks // 8)
    return None


def _jpeg_layout(header: bytes) -> tuple[int | None, bool | None]:
    """(frame, scan) from walking the segments of a JPEG's first bytes `header`.

    `frame` is the marker of its frame header (SOF0-SOF15: 0xC0-0xCF but DHT, JPG and DAC),
    None when there is none before the first scan or the end. `scan` is True when a start of
    scan (FF DA) follows the frame header, False when the image ends (EOI) or a scan starts
    without one, None when `header` ends first. Bytes between segments that are not a marker
    are skipped, as decoders do; the walk stops at EOI, so bytes appended after the image (a
    video, say) are never read as part of it.
    """
    frame: int | None = None
    pos = 2
    while pos + 2 <= len(header):
        if header[pos] != 0xFF:  # stray bytes before a marker
            pos += 1
            continue
        marker = header[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8 or marker == 0x00:  # no length field
            pos += 2
            continue
        if marker == 0xD9:  # the end of the image
            return frame, False
        if marker == 0xDA:
            return frame, frame is not None
        if frame is None and 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            frame = marker
        if pos + 4 > len(header):
            break
        pos += 2 + int.from_bytes(header[pos + 2 : pos + 4], "big")
    return frame, None


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
    """Format, dimensions and size of the image at `source` (http(s), s3:// or a local path).

    Any other form raises `ImageUrlError` before any I/O. Reads at most about HEADER_BOUND
    bytes and the last TAIL_BYTES, unless the file does not end as its format does (see
    `_check_ending`). Every http(s) request of one check goes through one `GuardedTransport`
    (every connection, redirects included, is checked against the private-network policy and
    made to the address that was checked), and the whole check, from DNS to the last byte,
    across redirects and requests, ends within `settings.fetch_timeout_s`.
    """
    kind = image_url_kind(source)
    if kind == "http":
        return _inspect_http(source, settings=settings)
    if kind == "s3":
        return _inspect_fsspec(
            source, storage_options=storage_options, max_bytes=settings.max_image_bytes
        )
    return _inspect_local(source, max_bytes=settings.max_image_bytes)


def _inspect_local(path: str, *, max_bytes: int) -> ImageInfo:
    """A plain local path: only a regular file is read (never a FIFO, device or directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        raise ImageFetchError(f"image not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ImageFetchError(f"image {path} is a directory, not a file") from exc
    except PermissionError as exc:
        raise ImageFetchError(f"no permission to read image {path}") from exc
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ImageFetchError(f"cannot read image {path}: {reason}") from exc
    except ValueError as exc:  # e.g. an embedded NUL byte
        raise ImageFetchError(f"cannot read image {path}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ImageFetchError(f"image {path} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageFetchError(f"image {path} is not a regular file")
        size = st.st_size

        def read(start: int, end: int) -> bytes:
            out = bytearray()
            while start + len(out) < end:
                got = os.pread(fd, end - start - len(out), start + len(out))
                if not got:  # the file shrank while it was read
                    break
                out += got
            return bytes(out)

        info = _with_size(_sniff_progressive(lambda n: read(0, min(n, size)), size), size)
        return _check_ending(
            info,
            max_bytes=max_bytes,
            read_tail=lambda: read(max(0, size - TAIL_BYTES), size),
            read_all=lambda: read(0, size),
        )
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ImageFetchError(f"cannot read image {path}: {reason}") from exc
    finally:
        os.close(fd)


def _inspect_fsspec(source: str, *, storage_options: dict | None, max_bytes: int) -> ImageInfo:
    try:
        fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
        info = fs.info(path)
        if info.get("type") == "directory":
            raise ImageFetchError(f"image {source} is a directory, not a file")
        size = int(info["size"])
        found = _with_size(
            _sniff_progressive(lambda n: fs.cat_file(path, start=0, end=min(n, size)), size),
            size,
        )
        return _check_ending(
            found,
            max_bytes=max_bytes,
            read_tail=lambda: fs.cat_file(path, start=max(0, size - TAIL_BYTES), end=size),
            read_all=lambda: fs.cat_file(path, start=0, end=size),
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
    return replace(info, size_bytes=size)


def _with_defect(info: ImageInfo, defect: str | None) -> ImageInfo:
    return replace(info, defects=(*info.defects, defect)) if defect else info


# --- how a file ends ----------------------------------------------------------------------------

#: the IEND chunk that closes every complete PNG: length 0, type, CRC
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
#: the EOI marker that closes every complete JPEG
JPEG_END = b"\xff\xd9"


def _needs_ending_check(info: ImageInfo, max_bytes: int) -> bool:
    """Whether to look at how the file ends: a JPEG or PNG that breaks no rule so far (one
    that does is refused anyway; a decompression bomb is never decoded)."""
    return info.format in ACCEPTED_FORMATS and not check_image_rules(info, max_bytes=max_bytes)


def _ends_as_expected(fmt: str, tail: bytes) -> bool:
    """Whether the last bytes of a file are how a complete `fmt` file ends."""
    if fmt == "png":
        return tail.endswith(PNG_END)
    if fmt == "jpeg":
        return tail.endswith(JPEG_END)
    return True


def _check_ending(
    info: ImageInfo,
    *,
    max_bytes: int,
    read_tail: Callable[[], bytes],
    read_all: Callable[[], bytes],
) -> ImageInfo:
    """`info`, with a defect when its file is cut short (an interrupted upload).

    Cheap in the common case: only the last TAIL_BYTES bytes are read, and a file that ends
    as its format does (IEND, EOI) is taken as complete. Any other ending is not refused on
    its own (phones' motion photos append a video after the JPEG; some tools write bytes
    after a PNG's IEND): the whole file (within the size limit) is read and its image data
    looked at, and only data that really ends early is refused.
    """
    if not _needs_ending_check(info, max_bytes) or _ends_as_expected(info.format, read_tail()):
        return info
    return _with_defect(info, _cut_short(info.format, read_all()))


def _cut_short(fmt: str, data: bytes) -> str | None:
    """Why the image data of `data`, a whole JPEG or PNG file, ends early or cannot be
    decoded; None when its image is complete (whatever follows it)."""
    if fmt == "png":
        return _png_cut_short(data)
    if fmt == "jpeg":
        return _jpeg_cut_short(data)
    return None


def _png_cut_short(data: bytes) -> str | None:
    """Walk the chunks to IEND, inflating the IDAT stream (output discarded, a MiB at a
    time): a file that ends inside a chunk, before IEND, or before its zlib stream ends is
    cut short. Nothing after IEND is read."""
    rule = "a PNG must end with its IEND chunk"
    inflate = zlib.decompressobj()
    pos = 8
    while True:
        if pos + 12 > len(data):
            return (
                f"the file is cut short: its PNG data stops at byte {len(data)}, before the "
                f"IEND chunk ({rule})"
            )
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if pos + 12 + length > len(data):
            name = kind.decode("latin-1", "replace")
            return (
                f"the file is cut short: it ends at byte {len(data)}, inside the {name!r} "
                f"chunk that starts at byte {pos} ({rule})"
            )
        if kind == b"IEND":
            break
        if kind == b"IDAT" and not inflate.eof:
            pending = data[pos + 8 : pos + 8 + length]
            try:
                while pending and not inflate.eof:
                    inflate.decompress(pending, 1 << 20)
                    pending = inflate.unconsumed_tail
            except zlib.error as exc:
                return f"the PNG image data cannot be decoded (zlib: {exc})"
        pos += 12 + length
    if not inflate.eof:
        return (
            "the file is cut short: its PNG image data (IDAT) ends before the image is "
            f"complete ({rule}, after the whole image)"
        )
    return None


#: the next marker in a JPEG's entropy-coded data: FF, then neither a stuffed zero nor a restart
#: marker (RST0-7) nor another fill byte
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _jpeg_cut_short(data: bytes) -> str | None:
    """Walk the segments and, after each start of scan, the entropy-coded data to the end of
    the image (EOI, FF D9), as a decoder reads them but decoding nothing (no memory beyond
    `data`, whatever the image's size or coding); a file whose markers end first is cut
    short. Nothing after EOI is read (a motion photo's video, a camera's trailer)."""
    cut = (
        f"the file is cut short: its JPEG image data ends before the image is complete, at "
        f"byte {len(data)} (a JPEG must end with its EOI marker, FF D9, after the whole image)"
    )
    pos = 2  # after SOI
    while True:
        while pos + 1 < len(data) and data[pos] == data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 2 > len(data):
            return cut
        if data[pos] != 0xFF:
            return f"the JPEG image data cannot be decoded (no marker at byte {pos})"
        marker = data[pos + 1]
        if marker == 0xD9:
            return None  # the end of the image
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
            continue
        if pos + 4 > len(data):
            return cut
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > len(data):
            return cut
        pos = end
        if marker == 0xDA:  # a scan: its entropy-coded data runs to the next marker
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                return cut
            pos = found.start()


_SSL_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def _make_ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()


def _ssl_context() -> ssl.SSLContext:
    """One TLS context for every image fetch: loading the CA bundle costs ~40 ms of CPU. Under
    a lock: the threads checking images at once would otherwise all miss the cache and each
    build one."""
    with _SSL_LOCK:
        return _make_ssl_context()


def _inspect_http(url: str, *, settings: Settings) -> ImageInfo:
    limit = settings.fetch_timeout_s
    deadline = time.monotonic() + limit
    shown = _display_url(url)
    no_answer = (
        f"cannot fetch image {shown}: no complete HTTP answer within the {limit:g} s limit "
        "(connection refused, reset or timed out, or not an HTTP server; "
        "HAILUO_FETCH_TIMEOUT_S sets the limit)"
    )
    transport = GuardedTransport(
        settings.allow_private_networks, deadline=deadline, verify=_ssl_context()
    )
    timeout = httpx.Timeout(limit, connect=min(settings.connect_timeout_s, limit))
    try:
        with httpx.Client(
            transport=transport, timeout=timeout, follow_redirects=False, trust_env=False
        ) as client:
            head_range = f"bytes=0-{HEADER_BOUND - 1}"
            with _get(client, httpx.URL(url), head_range, shown) as (final, resp):
                info, body = _read_http_body(resp, settings=settings, deadline=deadline, url=shown)
                size = info.size_bytes
                if (
                    _needs_ending_check(info, settings.max_image_bytes)
                    and resp.status_code == 200
                    and size is not None
                ):
                    body.read_to(size)  # Range was ignored: the rest of the file is coming
                tail: bytes | None = None
                if size is not None and body.received >= size:
                    tail = body.tail  # this answer held the whole file
                in_head = bytes(body.head) if size is not None and size <= len(body.head) else None
            if not _needs_ending_check(info, settings.max_image_bytes):
                return info
            if tail is None:
                # the last bytes (by where they are when the size is known), and the size when
                # a 206 said `bytes 0-N/*` and filled the range
                try:
                    size, tail = _read_http_tail(
                        client, final, settings=settings, deadline=deadline, shown=shown,
                        size=info.size_bytes,
                    )  # fmt: skip
                except ImageFetchError:  # a server that answers that range oddly: read it all
                    if (known := info.size_bytes) is None:
                        raise
                    in_head = _read_http_whole(client, final, known, deadline=deadline, shown=shown)
                    size, tail = known, in_head[-TAIL_BYTES:]
                if info.size_bytes is not None and size != info.size_bytes:
                    raise ImageFetchError(
                        f"image {shown} changed while it was checked (its size was "
                        f"{info.size_bytes} bytes, then {size})"
                    )
                info = _with_size(info, size)
                if not _needs_ending_check(info, settings.max_image_bytes):
                    return info
            assert size is not None
            if _ends_as_expected(info.format, tail):
                return info
            if in_head is None:
                in_head = _read_http_whole(client, final, size, deadline=deadline, shown=shown)
            return _with_defect(info, _cut_short(info.format, in_head))
    except BlockedAddressError as exc:
        raise ImageFetchError(f"image URL {shown} refused: {exc}") from exc
    except httpx.RemoteProtocolError as exc:
        if "location header" in str(exc):  # httpx parses Location before we see it
            raise ImageFetchError(
                f"image URL {shown} redirects to a location that does not parse"
            ) from exc
        raise ImageFetchError(no_answer) from exc
    except (httpx.TransportError, httpx.TimeoutException) as exc:
        raise ImageFetchError(no_answer) from exc
    except (httpx.HTTPError, httpx.StreamError) as exc:
        raise ImageFetchError(f"cannot fetch image {shown}: {type(exc).__name__}") from exc
    except (httpx.InvalidURL, UnicodeError, IndexError) as exc:
        # httpx reads every redirect's target host, followed or not: an "xn--" (IDNA) host
        # that does not decode raises there (the URL itself passed `image_url_kind`)
        raise ImageFetchError(
            f"image URL {shown} redirects to a location that does not parse"
        ) from exc


@contextlib.contextmanager
def _get(
    client: httpx.Client, url: httpx.URL, byte_range: str | None, shown: str
) -> Iterator[tuple[httpx.URL, httpx.Response]]:
    """GET `url` with `byte_range` (a Range header value), following at most MAX_REDIRECTS
    redirects (each target checked as a manifest's URL is): the final URL and its 200 or 206
    answer, body not read yet. Any other answer raises `ImageFetchError`. Every request of an
    image check goes through here, on the check's one guarded client."""
    headers = {"Accept-Encoding": "identity"}
    if byte_range:
        headers["Range"] = byte_range
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        with client.stream("GET", current, headers=headers) as resp:
            if resp.is_redirect:  # only when a Location header is present
                current = _next_hop(current, resp, shown)
                continue
            if resp.status_code == 404:
                raise ImageFetchError(f"image not found: {shown} (HTTP 404)")
            if resp.status_code == 416 and resp.headers.get("content-range") in (
                "bytes */0",
                "*/0",
            ):  # no byte 0 to send: the file is empty
                raise ImageFetchError(f"image {shown} is empty (0 bytes)")
            if resp.status_code not in (200, 206):
                raise ImageFetchError(f"cannot fetch image {shown}: HTTP {resp.status_code}")
            encoding = resp.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise ImageFetchError(
                    f"image {shown} was sent compressed (Content-Encoding: {encoding[:40]}): "
                    "serve image files as they are"
                )
            yield current, resp
            return
    raise ImageFetchError(f"image URL {shown}: more than {MAX_REDIRECTS} redirects")


def _next_hop(current: httpx.URL, resp: httpx.Response, shown: str) -> httpx.URL:
    """The redirect target, or `ImageFetchError` when it does not parse or is not http(s)."""
    location = resp.headers.get("location", "")
    unparseable = ImageFetchError(f"image URL {shown} redirects to a location that does not parse")
    if not location.strip():
        raise ImageFetchError(f"image URL {shown} redirects (HTTP {resp.status_code}) to nowhere")
    if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cs") for ch in location):
        raise unparseable
    try:
        target = decoded_url(current.join(location))
    except (httpx.InvalidURL, ValueError, TypeError, UnicodeError) as exc:
        raise unparseable from exc
    if target.scheme not in ("http", "https") or not target.host:
        raise ImageFetchError(
            f"image URL {shown} redirects to a URL that is not http(s) with a host"
        )
    try:
        image_url_kind(str(target))  # the same rules as a manifest's URL (port range, ...)
    except ImageUrlError:
        raise unparseable from None
    return target


class _Body:
    """The body of one answer, read as far as asked within the fetch's deadline: its first
    `keep` bytes, its last TAIL_BYTES bytes and how many bytes came."""

    def __init__(self, resp: httpx.Response, *, deadline: float, keep: int = 0) -> None:
        self._chunks = resp.iter_raw()
        self._deadline = deadline
        self._keep = keep
        self.head = bytearray()
        self.tail = b""
        self.received = 0
        self.ended = False

    def read_to(self, count: int) -> None:
        """Read until `count` bytes came (a chunk may bring more) or the body ends."""
        while not self.ended and self.received < count:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.ended = True
                return
            if time.monotonic() > self._deadline:
                raise httpx.ReadTimeout("the time limit for this fetch ran out")
            self.received += len(chunk)
            if len(self.head) < self._keep:
                self.head += chunk[: self._keep - len(self.head)]
            self.tail = (self.tail + chunk[-TAIL_BYTES:])[-TAIL_BYTES:]


def _read_http_body(
    resp: httpx.Response, *, settings: Settings, deadline: float, url: str
) -> tuple[ImageInfo, _Body]:
    """Read the header (and, without a known size, count up to max_bytes+1) within the deadline.

    The size is the Content-Length of a 200, the total of a 206's Content-Range, or, for a
    206 whose total is unknown (`bytes 0-N/*`) and whose range ends before the one asked for,
    N + 1 (the file ends there); else it stays None."""
    ranged = resp.status_code == 206
    size: int | None = None
    if ranged:
        start, end, size = _content_range(resp, url)
        if start != 0:
            raise ImageFetchError(f"image {url}: the server answered a range not starting at 0")
        if size is None and end + 1 < HEADER_BOUND:
            size = end + 1  # asked for more than it has: the whole file is in this range
    else:
        size = _content_length(resp)
    # Without a known size, keep counting past the header, stopping at max_bytes + 1.
    count_to = HEADER_BOUND if size is not None or ranged else settings.max_image_bytes + 1
    body = _Body(resp, deadline=deadline, keep=HEADER_BOUND)
    body.read_to(count_to)
    received = body.received
    if size is not None and received > size:
        raise ImageFetchError(
            f"image {url}: the server sent more bytes ({received}) than the size it announced "
            f"({size})"
        )
    if ranged and body.ended and received < min(end + 1, HEADER_BOUND):
        raise ImageFetchError(
            f"image {url}: the answer ended after {received} of the {end + 1} bytes of its range"
        )
    info = sniff_image(bytes(body.head))
    if size is None and not ranged:
        size = min(received, count_to)  # the whole body, or max_bytes + 1: "too big"
    return _with_size(info, size), body


def _read_http_tail(
    client: httpx.Client,
    url: httpx.URL,
    *,
    settings: Settings,
    deadline: float,
    shown: str,
    size: int | None = None,
) -> tuple[int, bytes]:
    """(the file's size, its last bytes) from a range request: the last TAIL_BYTES of a file
    of a known `size` by where they are (`Range: bytes=S-E`, which every server that honours
    ranges takes), else a suffix range (`Range: bytes=-N`).

    A 206 says where its range ends: that is the end of the file, whether its total is given
    or `*`. A server that ignores Range sends the whole body: it is read and counted up to
    max_image_bytes + 1 (the size is then max_image_bytes + 1: "too big")."""
    wanted = f"-{TAIL_BYTES}" if size is None else f"{max(0, size - TAIL_BYTES)}-{size - 1}"
    with _get(client, url, f"bytes={wanted}", shown) as (_, resp):
        body = _Body(resp, deadline=deadline)
        if resp.status_code == 206:
            start, end, total = _content_range(resp, shown)
            if total is not None and end + 1 != total:
                raise ImageFetchError(
                    f"image {shown}: the server answered a range for the last bytes that does "
                    "not reach the end of the file"
                )
            length = end - start + 1
            body.read_to(min(length, settings.max_image_bytes) + 1)
            if body.received > length or (body.ended and body.received < length):
                raise ImageFetchError(
                    f"image {shown}: the server sent {body.received} bytes for a range of {length}"
                )
            return end + 1, body.tail
        body.read_to(settings.max_image_bytes + 1)
        if not body.ended:
            return settings.max_image_bytes + 1, body.tail
        return body.received, body.tail


def _read_http_whole(
    client: httpx.Client, url: httpx.URL, size: int, *, deadline: float, shown: str
) -> bytes:
    """The whole file (`size` bytes, at most the size limit), for a look at its image data."""
    with _get(client, url, None, shown) as (_, resp):
        if resp.status_code != 200:
            raise ImageFetchError(f"image {shown}: the server answered a range not asked for")
        body = _Body(resp, deadline=deadline, keep=size + 1)
        body.read_to(size + 1)
        if body.received != size:
            raise ImageFetchError(
                f"image {shown} changed while it was checked (its size was {size} bytes, "
                f"then {body.received})"
            )
        return bytes(body.head)


_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d{1,18})-(\d{1,18})/(\d{1,18}|\*)\s*", re.IGNORECASE)


def _content_range(resp: httpx.Response, url: str) -> tuple[int, int, int | None]:
    """(first byte, last byte, total size or None when `*`) of a 206's Content-Range."""
    match = _CONTENT_RANGE.fullmatch(resp.headers.get("content-range", ""))
    if match is None:
        raise ImageFetchError(f"image {url}: the server answered with an unreadable range")
    start, end = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if end < start:
        raise ImageFetchError(
            f"image {url}: the server answered a range that ends before it starts"
        )
    if total is not None and total <= end:
        raise ImageFetchError(f"image {url}: the server announced an inconsistent size")
    return start, end, total


def _content_length(resp: httpx.Response) -> int | None:
    length = resp.headers.get("content-length", "").strip()
    if length.isdigit() and len(length) <= 18:
        return int(length)
    return None


def _display_url(url: str) -> str:
    """The URL without query string or credentials (presigned URLs carry signatures)."""
    return redact_url(url)


__all__ = [
    "ImageFetchError",
    "ImageInfo",
    "ImageUrlError",
    "check_image_rules",
    "inspect_image",
    "sniff_image",
]
