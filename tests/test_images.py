from __future__ import annotations

import functools
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import s3fs
from hypothesis import example, given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from PIL import Image, ImageFile

from hailuo_batch import images
from hailuo_batch.images import (
    ImageFetchError,
    ImageInfo,
    check_image_rules,
    inspect_image,
    sniff_image,
)
from hailuo_batch.netguard import GuardedTransport, ImageUrlError, address_problem
from hailuo_batch.settings import Settings

MakeImage = Callable[..., Path]

MB = 1024 * 1024


def settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "allow_private_networks": True,
        "fetch_timeout_s": 2.0,
        "connect_timeout_s": 2.0,
        "max_image_bytes": 20 * MB,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def image_bytes(width: int, height: int, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buf, fmt, **kwargs)
    return buf.getvalue()


def facts(info: ImageInfo) -> tuple[str, int, int, int | None]:
    return (info.format, info.width, info.height, info.size_bytes)


# --- rules ----------------------------------------------------------------------------------


def rules(w: int, h: int, fmt: str = "jpeg", size: int | None = 1000) -> list[str]:
    return check_image_rules(ImageInfo(fmt, w, h, size), max_bytes=20 * MB)


def test_a_good_image_breaks_no_rule() -> None:
    assert rules(1280, 720) == []
    assert rules(720, 1280, "png") == []


@pytest.mark.parametrize(
    ("w", "h", "ok"),
    [
        (400, 1000, False),  # exactly 2:5
        (401, 1000, True),
        (1000, 400, False),  # exactly 5:2
        (1000, 401, True),
        (2500, 1000, False),
        (2499, 1000, True),
    ],
)
def test_aspect_ratio_is_strictly_between_2_5_and_5_2(w: int, h: int, ok: bool) -> None:
    problems = rules(w, h)
    assert (problems == []) is ok
    if not ok:
        assert problems == [
            f"aspect ratio {w}x{h} ({w / h:.3f}) must be strictly between 2:5 (0.4) and 5:2 (2.5)"
        ]


@pytest.mark.parametrize(
    ("w", "h", "ok"), [(451, 300, False), (451, 301, True), (300, 451, False), (301, 451, True)]
)
def test_short_side_must_exceed_300(w: int, h: int, ok: bool) -> None:
    problems = rules(w, h)
    assert (problems == []) is ok
    if not ok:
        assert problems == ["short side 300 px is too small: it must be more than 300 px"]


def test_size_limit_is_inclusive() -> None:
    assert check_image_rules(ImageInfo("png", 800, 800, 5000), max_bytes=5000) == []
    [problem] = check_image_rules(ImageInfo("png", 800, 800, 5001), max_bytes=5000)
    assert "5001 bytes" in problem
    assert "5000 bytes" in problem


@pytest.mark.parametrize("fmt", ["webp", "gif", "bmp", "tiff"])
def test_other_formats_are_refused(fmt: str) -> None:
    assert rules(800, 800, fmt) == [f"format {fmt} is not accepted (JPEG or PNG only)"]


def test_several_violations_are_all_reported() -> None:
    problems = check_image_rules(ImageInfo("webp", 1000, 300, 30 * MB), max_bytes=20 * MB)
    assert len(problems) == 4


def test_unreadable_dimensions_are_a_violation() -> None:
    [problem] = rules(0, 0)
    assert "cannot read the image dimensions" in problem


# --- sniffing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name"), [("JPEG", "jpeg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif")]
)
def test_sniff_reads_format_and_dimensions_from_content(fmt: str, name: str) -> None:
    info = sniff_image(image_bytes(640, 360, fmt))
    assert info.format == name
    if name in ("jpeg", "png"):
        assert (info.width, info.height) == (640, 360)
    assert info.size_bytes is None


def test_sniff_only_needs_the_header() -> None:
    data = image_bytes(1920, 1080, "PNG")
    info = sniff_image(data[:64])
    assert (info.format, info.width, info.height) == ("png", 1920, 1080)


_MAGICS = [
    b"DDS " + (124).to_bytes(4, "little"),
    b"8BPS",
    b"\x00\x00\x01\x00",
    b"icns",
    b"qoif",
    b"FORM",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    b"\xff\xd8\xff\xc0",
    b"\xff\xd8\xff\xe1",
]


@settings_(max_examples=300, deadline=None)
@given(st.sampled_from(_MAGICS), st.binary(max_size=300))
@example(
    b"DDS " + (124).to_bytes(4, "little"),
    (0x1007).to_bytes(4, "little") + b"\0" * 64 + (32).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"ZZZZ" + b"\0" * 140,
)  # fmt: skip
def test_whatever_pillow_raises_on_a_file_means_it_is_not_an_image(
    magic: bytes, rest: bytes
) -> None:
    """A file that starts like an image and then breaks a plugin (a DDS with a pixel format
    Pillow does not implement raises NotImplementedError) is a verdict, never an exception."""
    info = sniff_image(magic + rest)
    assert info.format in ("unknown", "jpeg", "png") or info.width == 0
    if info.format == "unknown":
        assert check_image_rules(info, max_bytes=MB) == [
            "not a recognisable image (JPEG or PNG only)"
        ]


def test_sniff_of_non_image_bytes_is_unknown() -> None:
    info = sniff_image(b"<html><body>not an image</body></html>")
    assert info.format == "unknown"
    assert check_image_rules(info, max_bytes=MB) == ["not a recognisable image (JPEG or PNG only)"]


# --- local files and file:// ----------------------------------------------------------------


def test_local_file_is_judged_by_content_not_name(make_image: MakeImage) -> None:
    path = make_image(800, 600, "WEBP", name="disguised.jpg")
    info = inspect_image(str(path), settings=settings())
    assert info.format == "webp"
    assert info.size_bytes == path.stat().st_size


def test_file_urls_are_refused_alike_for_existing_and_missing_files(
    make_image: MakeImage, tmp_path: Path
) -> None:
    """No file-existence oracle: the message does not depend on the file."""
    path = make_image(1024, 768, "PNG")
    assert facts(inspect_image(str(path), settings=settings())) == (
        "png",
        1024,
        768,
        path.stat().st_size,
    )
    messages = []
    for target in (path, tmp_path / "missing.png"):
        with pytest.raises(ImageUrlError) as err:
            inspect_image(target.as_uri(), settings=settings())
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert "'file' is not accepted" in messages[0]


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    """A FIFO would block the check forever; a directory or device is not an image."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageFetchError, match="not a regular file"):
        inspect_image(str(fifo), settings=settings())
    with pytest.raises(ImageFetchError, match="is a directory"):
        inspect_image(str(tmp_path), settings=settings())
    with pytest.raises(ImageFetchError, match="not a regular file"):
        inspect_image("/dev/zero", settings=settings())


def test_jpeg_with_sof_behind_a_large_header_block(make_image: MakeImage) -> None:
    # A 200 KB ICC profile is split into many APP2 segments: SOF sits beyond the first 64 KiB.
    path = make_image(900, 700, "JPEG", icc_profile=b"\0" * 200_000)
    info = inspect_image(str(path), settings=settings())
    assert (info.format, info.width, info.height) == ("jpeg", 900, 700)


def test_huge_file_is_not_read_fully(tmp_path: Path) -> None:
    path = tmp_path / "huge.jpg"
    path.write_bytes(image_bytes(1280, 720))
    with path.open("r+b") as f:
        f.truncate(1024 * MB)  # sparse: 1 GiB on paper
    info = inspect_image(str(path), settings=settings())
    assert facts(info) == ("jpeg", 1280, 720, 1024 * MB)
    assert any("over the limit" in p for p in check_image_rules(info, max_bytes=20 * MB))


def test_missing_local_file_is_a_fetch_error(tmp_path: Path) -> None:
    with pytest.raises(ImageFetchError, match="not found"):
        inspect_image(str(tmp_path / "nope.jpg"), settings=settings())


# --- s3 ---------------------------------------------------------------------------------------


def test_s3_image_size_and_dimensions(s3_env: str) -> None:
    data = image_bytes(1280, 720, "PNG")
    fs = s3fs.S3FileSystem()
    fs.pipe_file(f"{s3_env}/in/a.png", data)
    info = inspect_image(f"s3://{s3_env}/in/a.png", settings=settings())
    assert facts(info) == ("png", 1280, 720, len(data))


def test_missing_s3_object_is_a_fetch_error(s3_env: str) -> None:
    with pytest.raises(ImageFetchError, match="not found"):
        inspect_image(f"s3://{s3_env}/in/missing.jpg", settings=settings())


# --- http -------------------------------------------------------------------------------------


def byte_range(header: str, size: int) -> tuple[int, int]:
    """(first, last) byte of a `bytes=a-b`, `bytes=a-` or `bytes=-n` Range on `size` bytes."""
    first, last = header.split("=", 1)[1].split("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


def noise(width: int, height: int, fmt: str, **kwargs: object) -> bytes:
    """An image of random pixels: barely compressible, so a 1280x720 one is over 1 MiB."""
    import random

    pixels = random.Random(f"{width}x{height}").randbytes(width * height * 3)
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buf, fmt, **kwargs)
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _partial(self, data: bytes, start: int, end: int, total: str | None = None) -> None:
        """A 206 with bytes `start`-`end` of `data` (`total`: the Content-Range's size)."""
        self._head(
            206,
            {"Content-Length": str(end + 1 - start),
             "Content-Range": f"bytes {start}-{end}/{total or len(data)}"},
        )  # fmt: skip
        self.wfile.write(data[start : end + 1])

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        route, _, name = parts.path.strip("/").partition("/")
        query = parse_qs(parts.query)
        data = self.files.get(name, b"")
        try:
            if route == "files" and name in self.files:  # plain, with Content-Length
                self._head(200, {"Content-Length": str(len(data))})
                self.wfile.write(data)
            elif route in ("ranged", "star") and name in self.files and not self.headers["Range"]:
                self._head(200, {"Content-Length": str(len(data))})
                self.wfile.write(data)
            elif route in ("ranged", "star") and name in self.files:  # honours Range
                # "star" does not say the total: `bytes 0-N/*` (legal HTTP)
                start, end = byte_range(self.headers["Range"], len(data))
                self._partial(data, start, end, "*" if route == "star" else None)
            elif route == "headonly" and name in self.files and not self.headers["Range"]:
                self._head(200, {"Content-Length": str(len(data))})
                self.wfile.write(data)
            elif route == "headonly" and name in self.files:  # a range from 0 only, else 416
                start, end = byte_range(self.headers["Range"], len(data))
                if start != 0:
                    self._head(416, {"Content-Range": f"bytes */{len(data)}",
                                     "Content-Length": "0"})  # fmt: skip
                    return
                self._partial(data, start, end)
            elif route == "changing" and name in self.files:  # another file after the head
                rng = self.headers["Range"] or ""
                if rng.startswith("bytes=0-"):
                    self._partial(data, *byte_range(rng, len(data)))
                    return
                other = self.files["shot.png"]  # a complete PNG of another size
                self._head(200, {"Content-Length": str(len(other))})
                self.wfile.write(other)
            elif route == "nolength" and name in self.files:  # close-delimited body
                self._head(200, {"Connection": "close"})
                self.wfile.write(data)
                self.close_connection = True
            elif route == "endless":  # a JPEG header, then zeros forever, no length
                self._head(200, {"Connection": "close"})
                self.wfile.write(self.files["photo.jpg"])
                while True:
                    self.wfile.write(b"\0" * 65536)
            elif route == "slow":  # a length, then one byte at a time, forever
                self._head(200, {"Content-Length": str(50 * MB)})
                while True:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif route in ("empty", "empty-starlette"):  # a Range on a 0-byte file
                total = "bytes */0" if route == "empty" else "*/0"
                self._head(416, {"Content-Range": total, "Content-Length": "0"})
            elif route == "redirect":
                self._head(302, {"Location": query["to"][0], "Content-Length": "0"})
            elif route == "error":
                self._head(503, {"Content-Length": "0"})
            else:
                self._head(404, {"Content-Length": "0"})
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    Handler.files = {
        "photo.jpg": image_bytes(1280, 720),
        "shot.png": image_bytes(720, 1280, "PNG"),
        "anim.webp": image_bytes(800, 800, "WEBP"),
        "big-exif.jpg": image_bytes(900, 700, icc_profile=b"\0" * 200_000),
        "noise.png": noise(1280, 720, "PNG"),
        "noise.jpg": noise(1280, 720, "JPEG", quality=95),
        **{f"cut-{name}": data for name, data in CUT.items()},
        **{f"extra-{name}": data for name, data in WITH_TRAILING_DATA.items()},
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("route", ["files", "ranged", "nolength", "star"])
@pytest.mark.parametrize("name", ["big-exif.jpg", "noise.jpg", "noise.png"])
def test_http_image_info_with_and_without_length(http_base: str, route: str, name: str) -> None:
    data = Handler.files[name]
    info = inspect_image(f"{http_base}/{route}/{name}", settings=settings())
    assert info.size_bytes == len(data)
    assert check_image_rules(info, max_bytes=20 * MB) == []


@pytest.mark.parametrize("name", ["noise.jpg", "noise.png"])
def test_a_range_answer_without_a_total_is_checked_against_the_size_limit(
    http_base: str, name: str
) -> None:
    """A 206 with `Content-Range: bytes 0-N/*` (total unknown, legal HTTP) left the size
    unknown, and unknown passed the size rule: a file over the limit was paid for."""
    data = Handler.files[name]
    limit = len(data) - 1000  # over 1 MiB, so the first range answer does not hold it all
    assert limit > images.HEADER_BOUND
    info = inspect_image(f"{http_base}/star/{name}", settings=settings(max_image_bytes=limit))
    assert info.size_bytes == len(data)
    assert check_image_rules(info, max_bytes=limit) == [
        f"file size {len(data)} bytes is over the limit of {limit} bytes (HAILUO_MAX_IMAGE_BYTES)"
    ]


def test_http_format_by_content(http_base: str) -> None:
    info = inspect_image(f"{http_base}/files/anim.webp", settings=settings())
    assert info.format == "webp"
    assert check_image_rules(info, max_bytes=20 * MB) == [
        "format webp is not accepted (JPEG or PNG only)"
    ]


def test_endless_body_stops_at_the_size_bound(http_base: str) -> None:
    info = inspect_image(f"{http_base}/endless/x", settings=settings(max_image_bytes=2 * MB))
    assert info.format == "jpeg"
    assert info.size_bytes == 2 * MB + 1
    assert any("over the limit" in p for p in check_image_rules(info, max_bytes=2 * MB))


def test_slow_body_hits_the_total_time_limit(http_base: str) -> None:
    # the body would last ~40 minutes: only the time limit ends this fetch
    with pytest.raises(ImageFetchError, match="within the 1 s limit"):
        inspect_image(f"{http_base}/slow/x", settings=settings(fetch_timeout_s=1.0))


def test_http_status_errors(http_base: str) -> None:
    with pytest.raises(ImageFetchError, match=r"not found.*HTTP 404"):
        inspect_image(f"{http_base}/files/missing.jpg", settings=settings())
    with pytest.raises(ImageFetchError, match="HTTP 503"):
        inspect_image(f"{http_base}/error/x", settings=settings())


def test_redirects_are_followed(http_base: str) -> None:
    target = f"{http_base}/files/shot.png"
    info = inspect_image(f"{http_base}/redirect/x?to={target}", settings=settings())
    assert (info.format, info.width, info.height) == ("png", 720, 1280)


def test_loopback_is_refused_unless_allowed(http_base: str) -> None:
    with pytest.raises(ImageFetchError, match="HAILUO_ALLOW_PRIVATE_NETWORKS=1"):
        inspect_image(
            f"{http_base}/files/photo.jpg", settings=settings(allow_private_networks=False)
        )


def loopback_v4_is_public(addr: object) -> str | None:
    """Test policy: the test server on 127.0.0.1 stands in for a public host."""
    return None if str(addr) == "127.0.0.1" else address_problem(addr)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data/", "http://[::1]:9/x", "http://10.0.0.1/x"],
)
def test_redirect_to_a_private_address_is_refused(
    http_base: str, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each hop is checked where it connects: the first hop is allowed, the private one not."""
    monkeypatch.setattr(
        images,
        "GuardedTransport",
        functools.partial(GuardedTransport, address_policy=loopback_v4_is_public),
    )
    with pytest.raises(ImageFetchError, match=r"refused.*HAILUO_ALLOW_PRIVATE_NETWORKS=1"):
        inspect_image(
            f"{http_base}/redirect/x?to={target}", settings=settings(allow_private_networks=False)
        )


def test_image_checks_share_one_tls_context_even_when_started_together() -> None:
    """Building a TLS context costs ~40 ms of CPU: threads that start checking images at the
    same moment must not each build one."""
    import threading

    from hailuo_batch import images

    images._make_ssl_context.cache_clear()
    got: list[object] = []
    barrier = threading.Barrier(8)

    def check() -> None:
        barrier.wait()
        got.append(images._ssl_context())

    threads = [threading.Thread(target=check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in got}) == 1
    assert images._make_ssl_context.cache_info().misses == 1


# --- files too small for the dimensions they declare ------------------------------------------


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR says `width` x `height` over one tiny IDAT: 100000x100000 in ~70 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )  # fmt: skip


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (_png_declaring(100_000, 100_000), "png"),
        (_png_declaring(2**31 - 1, 2**31 - 1), "png"),
        (image_bytes(2000, 1500, "PNG")[:200], "png"),  # cut after its header
        (image_bytes(1600, 1200, "JPEG")[:700], "jpeg"),
        (image_bytes(1600, 1200, "JPEG", progressive=True)[:700], "jpeg"),
    ],
    ids=["png-bomb", "png-max-dimensions", "png-header-only", "jpeg-header-only", "progressive"],
)
def test_a_file_too_small_for_its_dimensions_breaks_a_rule_before_paying(
    data: bytes, name: str, tmp_path: Path
) -> None:
    path = tmp_path / f"x.{name}"
    path.write_bytes(data)
    info = inspect_image(str(path), settings=settings())
    problems = check_image_rules(info, max_bytes=20 * MB)
    assert any("too small to hold" in p and f"{len(data)} bytes" in p for p in problems), problems


@settings_(max_examples=60, deadline=None)
@given(
    w=st.integers(301, 4000),
    h=st.integers(301, 4000),
    fmt=st.sampled_from(["PNG", "JPEG", "JPEG-progressive"]),
    mode=st.sampled_from(["1", "L", "P", "RGB"]),
)
def test_no_complete_image_is_under_its_bound(w: int, h: int, fmt: str, mode: str) -> None:
    """The bound is far below any whole file: the most compressible images there are (one
    flat colour, 1-bit PNG, optimised JPEG tables) are still above it."""
    if fmt.startswith("JPEG") and mode in ("1", "P"):
        mode = "L"
    buf = io.BytesIO()
    kwargs: dict[str, object] = {"optimize": True}
    if fmt == "JPEG-progressive":
        kwargs["progressive"] = True
    if fmt.startswith("JPEG"):
        kwargs["quality"] = 1
    Image.new(mode, (w, h)).save(buf, fmt.split("-")[0], **kwargs)
    data = buf.getvalue()
    info = sniff_image(data)
    assert info.least_bytes is not None and info.least_bytes <= len(data)
    assert info.defects == ()


def test_an_arithmetic_coded_jpeg_has_no_bound() -> None:
    data = bytearray(image_bytes(640, 480, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 1] = 0xC9  # SOF9: arithmetic coding, which can take less than a bit per block
    assert images.least_bytes("jpeg", 640, 480, 0xC9) is None
    assert sniff_image(bytes(data)).least_bytes is None


@pytest.mark.parametrize("segments", [5, 12])
def test_a_jpeg_with_hundreds_of_kb_of_metadata_before_its_size_is_read(
    segments: int, tmp_path: Path
) -> None:
    """ICC profiles, XMP and EXIF come before the frame header, up to 64 KB a segment: a
    complete photo with 320-780 KB of them was refused as 'truncated or unusual'."""
    data = image_bytes(1200, 800, "JPEG")
    app2 = b"\xff\xe2" + (65535).to_bytes(2, "big") + b"ICC_PROFILE\x00" + b"\x00" * 65521
    path = tmp_path / "meta.jpg"
    path.write_bytes(data[:2] + app2 * segments + data[2:])
    info = inspect_image(str(path), settings=settings())
    assert (info.format, info.width, info.height) == ("jpeg", 1200, 800)
    assert check_image_rules(info, max_bytes=20 * MB) == []


@pytest.mark.parametrize("route", ["empty", "empty-starlette"])
def test_an_empty_image_over_http_is_called_empty(http_base: str, route: str) -> None:
    """A Range request on a 0-byte file is answered 416 with `*/0`: the reason says the file
    is empty, as a local empty file's does, not 'HTTP 416'."""
    with pytest.raises(ImageFetchError, match=r"is empty \(0 bytes\)"):
        inspect_image(f"{http_base}/{route}/x.jpg", settings=settings())


# --- decompression bombs ----------------------------------------------------------------------


def _png_of_zeros(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of `width` x `height` black pixels, built fast: rows of
    zeros compress to the same bytes after every full flush, so one block is repeated."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows_per_block = max(1, 4 * MB // (width + 1))
    block = b"\0" * ((width + 1) * rows_per_block)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    parts, adler, left = [b"\x78\xda"], 1, height
    while left:
        n = min(left, rows_per_block)
        raw = block[: (width + 1) * n]
        parts.append(body if n == rows_per_block else deflate.compress(raw) + deflate.flush(
            zlib.Z_FULL_FLUSH))  # fmt: skip
        adler = zlib.adler32(raw, adler)
        left -= n
    parts += [deflate.flush(), struct.pack(">I", adler)]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def test_a_decompression_bomb_is_refused_before_paying(tmp_path: Path) -> None:
    """A valid 30000x30000 PNG of zeros (under 1 MB) broke no rule and was paid for; the
    provider's decoder (and the emulator) refuse it as a decompression bomb."""
    from hailuo_batch.emulator.video import ImageRejected
    from hailuo_batch.emulator.video import inspect_image as provider_check
    from hailuo_batch.manifest import ManifestItem
    from hailuo_batch.validation import preflight

    data = _png_of_zeros(30_000, 30_000)
    assert len(data) < 2 * MB
    with pytest.raises(ImageRejected) as rejected:
        provider_check(data, 20 * MB)
    assert rejected.value.code == "UNSUPPORTED_FORMAT"
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    item = ManifestItem(
        id="bomb", row=1, image_url=str(path), prompt="p", mode="standard-image-to-video",  # type: ignore[arg-type]
        duration=6, provider="auto",  # type: ignore[arg-type]
    )  # fmt: skip
    verdict = preflight(item, settings=settings(), output_is_local=False)
    assert not verdict.ok
    assert verdict.errors == [
        "the image has 900000000 pixels (30000x30000), over the limit of 178956970 pixels "
        "(above it Pillow refuses to decode an image, as a decompression bomb)"
    ]


def test_the_pixel_limit_is_pillows_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500_000)
    assert rules(1000, 1000) == []  # exactly twice the setting: Pillow still opens it
    assert rules(1000, 1001) == [
        "the image has 1001000 pixels (1000x1001), over the limit of 1000000 pixels "
        "(above it Pillow refuses to decode an image, as a decompression bomb)"
    ]


# --- a JPEG without image data ----------------------------------------------------------------


def _jpeg_without_scan(frame: int, width: int = 60_000, height: int = 60_000) -> bytes:
    """SOI, a 3-component frame header of `frame` type claiming `width` x `height`, EOI."""
    import struct

    components = b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    sof = b"\xff" + bytes([frame]) + struct.pack(">HBHHB", 17, 8, height, width, 3) + components
    return b"\xff\xd8" + sof + b"\xff\xd9"


NO_SCAN = "the JPEG has no image data: no start-of-scan marker (FF DA) follows its frame header"


@pytest.mark.parametrize(
    ("frame", "width", "height"),
    [(0xC9, 60_000, 60_000), (0xC3, 60_000, 60_000), (0xC9, 1280, 720), (0xC0, 640, 480)],
    ids=["arithmetic", "lossless", "arithmetic-small", "baseline-small"],
)
def test_a_jpeg_with_no_image_data_is_refused_before_paying(
    frame: int, width: int, height: int, tmp_path: Path
) -> None:
    """23 bytes (SOI, an SOF9 or SOF3 frame header, EOI) passed: arithmetic and lossless
    frames have no least-size bound, and nothing asked for the scan that holds the pixels."""
    from hailuo_batch.manifest import ManifestItem
    from hailuo_batch.validation import preflight

    data = _jpeg_without_scan(frame, width, height)
    path = tmp_path / "empty.jpg"
    path.write_bytes(data)
    item = ManifestItem(
        id="noscan", row=1, image_url=str(path), prompt="p", mode="standard-image-to-video",  # type: ignore[arg-type]
        duration=6, provider="auto",  # type: ignore[arg-type]
    )  # fmt: skip
    verdict = preflight(item, settings=settings(), output_is_local=False)
    assert not verdict.ok
    assert NO_SCAN in verdict.errors


def test_a_scan_marker_in_bytes_appended_after_the_end_does_not_count() -> None:
    data = _jpeg_without_scan(0xC9, 1280, 720) + b"\0\0\xff\xda\x00\x08" + b"\0" * 100
    assert sniff_image(data).defects == (NO_SCAN,)


def test_a_scan_far_behind_the_frame_header_is_looked_for(tmp_path: Path) -> None:
    """A frame header in the first 64 KiB and the scan behind 200 KB of metadata: fine."""
    data = image_bytes(1200, 800, "JPEG")
    sos = data.index(b"\xff\xda")
    app = b"\xff\xe3" + (65535).to_bytes(2, "big") + b"\x00" * 65533
    path = tmp_path / "late-scan.jpg"
    path.write_bytes(data[:sos] + app * 3 + data[sos:])
    info = inspect_image(str(path), settings=settings())
    assert check_image_rules(info, max_bytes=20 * MB) == []


# --- files cut short (an interrupted upload) ---------------------------------------------------


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


CUT = {
    "noise.jpg": _half(noise(1280, 720, "JPEG", quality=95)),
    "noise.png": _half(noise(1280, 720, "PNG")),
    "progressive.jpg": _half(noise(1280, 720, "JPEG", quality=90, progressive=True)),
    "flat.png": _half(image_bytes(1280, 720, "PNG")),
    "no-eoi.jpg": noise(1280, 720, "JPEG", quality=90)[:-2],
}
#: complete images followed by other bytes: a phone's "motion photo" (an MP4 after the
#: JPEG), bytes after a PNG's IEND
WITH_TRAILING_DATA = {
    "motion.jpg": noise(1280, 720, "JPEG", quality=90)
    + b"\0\0\0\x18ftypmp42\0\0\0\0mp42isom"
    + bytes(range(256)) * 1200,
    "after-iend.png": noise(1280, 720, "PNG") + b"\0" * 1000,
    "small-after-iend.png": image_bytes(800, 600, "PNG") + b"trailing text",
}


def _preflight_errors(url: str, **overrides: object) -> list[str]:
    from hailuo_batch.manifest import ManifestItem
    from hailuo_batch.validation import preflight

    item = ManifestItem(
        id="x", row=1, image_url=url, prompt="p", mode="standard-image-to-video",  # type: ignore[arg-type]
        duration=6, provider="auto",  # type: ignore[arg-type]
    )  # fmt: skip
    return preflight(item, settings=settings(**overrides), output_is_local=False).errors


@pytest.mark.parametrize("name", sorted(CUT))
def test_a_local_file_cut_short_is_refused_before_paying(name: str, tmp_path: Path) -> None:
    """Half of a 1280x720 noise JPEG or PNG passed: `least_bytes` is a tiny lower bound, and
    the provider then failed the paid task as UNSUPPORTED_FORMAT (the emulator does too)."""
    from hailuo_batch.emulator.video import ImageRejected
    from hailuo_batch.emulator.video import inspect_image as provider_check

    with pytest.raises(ImageRejected, match="cannot be decoded"):
        provider_check(CUT[name], 20 * MB)
    path = tmp_path / name
    path.write_bytes(CUT[name])
    errors = _preflight_errors(str(path))
    assert len(errors) == 1 and errors[0].startswith("the file is cut short: "), errors
    assert ("IEND" if name.endswith(".png") else "EOI marker, FF D9") in errors[0]


@pytest.mark.parametrize("route", ["files", "ranged", "star", "nolength"])
@pytest.mark.parametrize("name", ["noise.jpg", "noise.png"])
def test_an_http_file_cut_short_is_refused_before_paying(
    http_base: str, route: str, name: str
) -> None:
    """Over HTTP as on disk, whatever the server does with Range (honours it, with or without
    the total, or ignores it and sends the body with or without a length)."""
    errors = _preflight_errors(f"{http_base}/{route}/cut-{name}")
    assert len(errors) == 1 and errors[0].startswith("the file is cut short: "), errors


def test_an_s3_file_cut_short_is_refused_before_paying(s3_env: str) -> None:
    s3fs.S3FileSystem().pipe_file(f"{s3_env}/in/cut.png", CUT["noise.png"])
    errors = _preflight_errors(f"s3://{s3_env}/in/cut.png")
    assert len(errors) == 1 and errors[0].startswith("the file is cut short: "), errors


@pytest.mark.parametrize("name", sorted(WITH_TRAILING_DATA))
def test_a_complete_image_with_bytes_after_it_is_accepted(
    name: str, tmp_path: Path, http_base: str
) -> None:
    """Its last bytes are not IEND or EOI, but its image data is whole: not refused."""
    path = tmp_path / name
    path.write_bytes(WITH_TRAILING_DATA[name])
    assert _preflight_errors(str(path)) == []
    for route in ("files", "ranged", "star", "nolength"):
        assert _preflight_errors(f"{http_base}/{route}/extra-{name}") == [], route


@pytest.mark.parametrize("name", ["noise.jpg", "noise.png", "photo.jpg", "shot.png"])
@pytest.mark.parametrize("route", ["files", "ranged", "star", "nolength"])
def test_a_complete_image_is_not_decoded(
    http_base: str, route: str, name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The common case stays cheap: an image that ends as its format does is never read
    whole nor decoded."""

    def no_decoding(fmt: str, data: bytes) -> str | None:
        raise AssertionError("a complete image was decoded")

    monkeypatch.setattr(images, "_cut_short", no_decoding)
    assert _preflight_errors(f"{http_base}/{route}/{name}") == []
    path = tmp_path / name
    path.write_bytes(Handler.files[name])
    assert _preflight_errors(str(path)) == []


@pytest.mark.parametrize("progressive", [False, True])
def test_a_cut_short_verdict_never_decodes_the_image(
    progressive: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slow path (the file does not end with EOI) walks the JPEG's markers: a large
    progressive image, whose decoder would hold every coefficient in memory, costs nothing
    more than its bytes; restart markers, stuffed zeros and fill bytes are data, not an end."""
    buf = io.BytesIO()
    noise = Image.effect_noise((1600, 1200), 64).convert("RGB")
    noise.save(buf, "JPEG", quality=85, progressive=progressive, restart_marker_blocks=4)
    whole = buf.getvalue()
    assert whole.endswith(b"\xff\xd9")

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert images._cut_short("jpeg", whole + b"\x00" * 40 + b"ftypmp42" * 100) is None
    assert images._cut_short("jpeg", whole[:-2] + b"\xff\xff\xff\xd9") is None  # fill bytes
    for cut in (len(whole) // 2, len(whole) - 2, len(whole) - 1):
        said = images._cut_short("jpeg", whole[:cut])
        assert said is not None and said.startswith("the file is cut short"), cut


@pytest.mark.parametrize("name", ["noise.jpg", "noise.png"])
def test_a_server_that_refuses_the_tails_range_gets_the_whole_file_read(
    http_base: str, name: str
) -> None:
    """A server that honours a range from byte 0 but answers 416 for the last bytes: the check
    reads the whole file instead, accepting a complete image and refusing a cut one, never
    refusing an image over how its server answers ranges."""
    assert _preflight_errors(f"{http_base}/headonly/{name}") == []
    errors = _preflight_errors(f"{http_base}/headonly/cut-{name}")
    assert len(errors) == 1 and errors[0].startswith("the file is cut short: "), errors


def test_an_image_that_changes_between_its_head_and_its_tail_is_refused(http_base: str) -> None:
    """The head said one size; the request for the last bytes got another, complete file (a
    server that ignores that range and serves what is there now): not taken as checked."""
    errors = _preflight_errors(f"{http_base}/changing/noise.png")
    assert len(errors) == 1 and "changed while it was checked" in errors[0], errors
