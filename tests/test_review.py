"""Posters, contact sheet and review page, on real H.264 MP4s (the emulator's encoder), real
local and S3 (moto) stores, and the page loaded in headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from fractions import Fraction
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import av
import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from hailuo_batch import review
from hailuo_batch.emulator.video import encode_pan_zoom
from hailuo_batch.results import ItemResult, ItemStatus, reason
from hailuo_batch.review import (
    PosterError,
    ReviewOutputs,
    contact_sheet,
    extract_poster,
    poster_key,
    publish_review,
    relative_href,
    render_review_page,
    review_markdown,
    review_order,
    store_poster,
    video_store_key,
)
from hailuo_batch.storage import OutputStore
from hailuo_batch.video import verify_mp4

RUN = "20250101T020000Z-abcd1234"


# --- real media ---------------------------------------------------------------------------------


def jpeg(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, "JPEG")
    return out.getvalue()


_MP4_CACHE: dict[tuple[int, int, tuple[int, int, int]], bytes] = {}


def emulator_mp4(
    tmp: Path, width: int = 320, height: int = 180, colour: tuple[int, int, int] = (40, 120, 200)
) -> bytes:
    """A real H.264 MP4 from the emulator's encoder (1 s, 4 fps: fast to make)."""
    if (width, height, colour) not in _MP4_CACHE:
        out = tmp / f"emu-{width}x{height}-{'-'.join(map(str, colour))}.mp4"
        encode_pan_zoom(jpeg(640, 360, colour), width, height, 1, 4, out)
        _MP4_CACHE[(width, height, colour)] = out.read_bytes()
    return _MP4_CACHE[(width, height, colour)]


COLOURS = ((220, 30, 30), (30, 200, 30), (30, 30, 220))  # red, green, blue


def timed_colour_mp4(path: Path) -> Path:
    """2 s at 4 fps: red for t < 0.5 s, green for 0.5 <= t < 1 s, blue from 1 s on."""
    with av.open(str(path), mode="w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=4, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for i in range(8):
            colour = COLOURS[min(i // 2, 2)]
            pixels = np.full((360, 640, 3), colour, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 4)
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode(None):
            box.mux(packet)
    return path


def dominant(jpeg_bytes: bytes, xy: tuple[int, int] | None = None) -> tuple[int, int, int]:
    with Image.open(io.BytesIO(jpeg_bytes)) as opened:
        im = opened.convert("RGB")
        px = im.getpixel(xy or (im.width // 2, im.height // 2))
    assert isinstance(px, tuple)
    return (int(px[0]), int(px[1]), int(px[2]))


def nearest_colour(px: tuple[int, int, int]) -> tuple[int, int, int]:
    return min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(c, px, strict=True)))


def image_size(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.size


# --- posters ------------------------------------------------------------------------------------


def test_poster_is_a_small_jpeg_of_the_video(tmp_path: Path) -> None:
    data = emulator_mp4(tmp_path, 1280, 720)
    poster = extract_poster(data)
    assert image_size(poster) == ("JPEG", (480, 270))
    # the frame shows the video's picture (the emulator pans over a blue-ish image)
    r, _g, b = dominant(poster)
    assert b > 150 and r < 100


def test_poster_is_taken_at_the_asked_time_from_bytes_or_a_path(tmp_path: Path) -> None:
    path = timed_colour_mp4(tmp_path / "colours.mp4")
    assert nearest_colour(dominant(extract_poster(path, at_s=0))) == COLOURS[0]
    assert nearest_colour(dominant(extract_poster(path))) == COLOURS[1]  # default 0.5 s
    assert nearest_colour(dominant(extract_poster(path.read_bytes(), at_s=1.2))) == COLOURS[2]
    # past the end: the last frame, not an error
    assert nearest_colour(dominant(extract_poster(str(path), at_s=60))) == COLOURS[2]


@pytest.mark.parametrize("at_s", [0, 0.25, 0.5, 1.2, 60])
def test_the_video_check_makes_the_same_poster_in_its_one_pass(tmp_path: Path, at_s: float) -> None:
    # the download's check decodes on to the poster's frame (fetch stores it beside the video):
    # the same JPEG the review page would make by reading the video back and seeking
    path = timed_colour_mp4(tmp_path / "colours.mp4")
    info = verify_mp4(path, poster_at_s=at_s)
    assert info.poster is not None
    assert info.poster == extract_poster(path, at_s=at_s)
    wide = emulator_mp4(tmp_path, 1280, 720)
    assert verify_mp4(io.BytesIO(wide), poster_at_s=at_s).poster == extract_poster(wide, at_s=at_s)
    assert verify_mp4(path).poster is None  # not asked: nothing decoded past the first frame


def test_poster_is_never_enlarged_and_keeps_the_aspect(tmp_path: Path) -> None:
    small = extract_poster(emulator_mp4(tmp_path, 320, 180), max_width=480)
    assert image_size(small)[1] == (320, 180)
    portrait = extract_poster(emulator_mp4(tmp_path, 360, 640), max_width=180)
    assert image_size(portrait)[1] == (180, 320)


@pytest.mark.parametrize(
    "data",
    [b"", b"not a video at all" * 100, jpeg(64, 64, (1, 2, 3))],
    ids=["empty", "text", "a-jpeg"],
)
def test_poster_of_something_that_is_not_a_video_is_a_poster_error(data: bytes) -> None:
    with pytest.raises(PosterError):
        extract_poster(data)


def test_poster_of_a_missing_file_is_a_poster_error(tmp_path: Path) -> None:
    with pytest.raises(PosterError):
        extract_poster(tmp_path / "nope.mp4")


ID = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=12)  # the id alphabet, small
VARIANT = st.text(alphabet="0123456789abcdef-", min_size=1, max_size=14)
VIDEO_KEY = st.one_of(
    ID.map(lambda i: f"videos/{i}.mp4"),
    st.tuples(ID, VARIANT).map(lambda t: f"videos/{t[0]}/{t[1]}.mp4"),
)


@given(a=VIDEO_KEY, b=VIDEO_KEY)
def test_poster_keys_never_collide_with_videos_or_each_other(a: str, b: str) -> None:
    pa, pb = poster_key(a), poster_key(b)
    assert pa.endswith(".jpg") and pa.rsplit("/", 1)[0] == a.rsplit("/", 1)[0]  # beside it
    assert pa not in (a, b)
    assert (pa == pb) == (a == b)
    # a poster file can never sit where a folder of variant videos must go (locally a file
    # there would make the video unwritable)
    assert not b.startswith(pa + "/")
    assert not pa.startswith(b + "/")


def test_poster_key_examples_and_refusals() -> None:
    assert poster_key("videos/x.mp4") == "videos/x~poster.jpg"
    assert poster_key("videos/x.jpg/0123abcd.mp4") == "videos/x.jpg/0123abcd~poster.jpg"
    with pytest.raises(ValueError):
        poster_key("videos/x.mov")


@pytest.fixture
def local_store(tmp_path: Path) -> OutputStore:
    return OutputStore(str(tmp_path / "out"))


@pytest.fixture
def s3_store(s3_env: str) -> OutputStore:
    return OutputStore(f"s3://{s3_env}/prefix")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> OutputStore:
    return request.getfixturevalue(f"{request.param}_store")


def test_store_poster_writes_beside_the_video(store: OutputStore, tmp_path: Path) -> None:
    store.write_bytes_atomic("videos/clip-1.mp4", emulator_mp4(tmp_path))
    assert store_poster(store, "videos/clip-1.mp4") == "videos/clip-1~poster.jpg"
    assert image_size(store.read_bytes("videos/clip-1~poster.jpg"))[0] == "JPEG"
    assert store.list("videos") == ["videos/clip-1.mp4", "videos/clip-1~poster.jpg"]


def test_store_poster_of_a_missing_or_broken_video_is_none(store: OutputStore) -> None:
    assert store_poster(store, "videos/missing.mp4") is None
    store.write_bytes_atomic("videos/broken.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500)
    assert store_poster(store, "videos/broken.mp4") is None
    assert store.list("videos") == ["videos/broken.mp4"]  # no poster written for it


def test_video_key_of_a_result_url(local_store: OutputStore, tmp_path: Path) -> None:
    assert video_store_key(local_store, local_store.url_for("videos/a.mp4")) == "videos/a.mp4"
    assert (
        video_store_key(local_store, "file://" + local_store.url_for("videos/a/b.mp4"))
        == "videos/a/b.mp4"
    )
    other = OutputStore(str(tmp_path / "out-2"))  # a sibling folder sharing the root's prefix
    assert video_store_key(local_store, other.url_for("videos/a.mp4")) is None
    assert video_store_key(local_store, local_store.url_for("") + "/videos/../x.mp4") is None
    assert video_store_key(local_store, local_store.url_for("runs/r/results.jsonl")) is None
    assert video_store_key(local_store, "https://cdn.example/v.mp4") is None
    assert video_store_key(local_store, None) is None


# --- contact sheet ------------------------------------------------------------------------------


def test_contact_sheet_shows_posters_and_grey_status_tiles() -> None:
    red, blue = jpeg(480, 270, (220, 30, 30)), jpeg(480, 270, (30, 30, 220))
    tiles = [
        ("a", red, "succeeded"),
        ("b", None, "failed"),
        ("c", blue, "succeeded"),
        ("d", None, "skipped"),
        ("e", b"corrupt", "succeeded"),
    ]
    sheet = contact_sheet(tiles, cols=3)
    fmt, (w, h) = image_size(sheet)
    cell_w, cell_h = review.TILE_W + review.GAP, review.TILE_H + review.LABEL_H + review.GAP
    assert fmt == "JPEG" and (w, h) == (review.GAP + 3 * cell_w, review.GAP + 2 * cell_h)

    def centre(i: int) -> tuple[int, int]:
        x = review.GAP + (i % 3) * cell_w + review.TILE_W // 2
        return x, review.GAP + (i // 3) * cell_h + review.TILE_H // 4  # above the status word

    assert nearest_colour(dominant(sheet, centre(0))) == COLOURS[0]
    assert nearest_colour(dominant(sheet, centre(2))) == COLOURS[2]
    for grey in (1, 3, 4):  # no poster, or one that cannot be read: a grey tile
        r, g, b = dominant(sheet, centre(grey))
        assert max(r, g, b) - min(r, g, b) < 20 and 170 < r < 230

    def bar(i: int) -> tuple[int, int, int]:  # the status bar left of the label
        x = review.GAP + (i % 3) * cell_w + 2
        return dominant(sheet, (x, review.GAP + (i // 3) * cell_h + review.TILE_H + 10))

    green, red_bar = bar(0), bar(1)
    assert green[1] > green[0] + 40 and red_bar[0] > red_bar[1] + 80

    def ink(i: int, y0: int, y1: int) -> int:
        """Dark pixels in a band of tile i: where the label (or status word) is drawn."""
        with Image.open(io.BytesIO(sheet)) as im:
            x = review.GAP + (i % 3) * cell_w
            y = review.GAP + (i // 3) * cell_h
            band = im.convert("L").crop((x + 8, y + y0, x + review.TILE_W, y + y1))
            return sum(1 for v in band.tobytes() if v < 120)

    assert ink(0, review.TILE_H, review.TILE_H + review.LABEL_H) > 10  # the id label
    assert ink(1, review.TILE_H // 3, 2 * review.TILE_H // 3) > 20  # the status word


def test_a_sheet_too_tall_for_jpeg_gets_more_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(review, "JPEG_MAX_SIDE", 1000)
    _, (w, h) = image_size(contact_sheet([(str(i), None, "failed") for i in range(100)], cols=6))
    assert h <= 1000 and w > 6 * review.TILE_W


def test_contact_sheet_of_one_tile_is_one_tile_wide() -> None:
    _, (w, _h) = image_size(contact_sheet([("only", None, "invalid")]))
    assert w == review.TILE_W + 2 * review.GAP


# --- the page -----------------------------------------------------------------------------------


class Page(HTMLParser):
    """The parts of the page a person sees, parsed as a browser would."""

    VOID = ("br", "img", "meta", "source", "input", "hr", "link")

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cards: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._stack: list[tuple[str, str]] = []  # (tag, class) of the open elements
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "article":
            self.cards.append({"status": a.get("data-status"), "text": [], "attrs": [], "by": {}})
        if tag not in self.VOID:
            self._stack.append((tag, a.get("class") or ""))
        if self.cards:
            self.cards[-1]["attrs"].append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if not self.cards or not self._stack or self._stack[-1][0] in ("script", "style"):
            return
        self.cards[-1]["text"].append(data)
        cls = next((c for _, c in reversed(self._stack) if c), "")
        self.cards[-1]["by"].setdefault(cls, []).append(data)

    def card_text(self, i: int) -> str:
        return " ".join(self.cards[i]["text"])

    def card_part(self, i: int, cls: str) -> str:
        return " ".join(self.cards[i]["by"].get(cls, []))

    def card_of(self, item_id: str) -> int:
        return next(i for i in range(len(self.cards)) if self.card_part(i, "id") == item_id)

    def attr(self, i: int, tag: str, name: str) -> str | None:
        for t, a in self.cards[i]["attrs"]:
            if t == tag and name in a:
                return a[name]
        return None

    def refs(self) -> list[str]:
        """Every URL the page makes a browser load or link to."""
        out = []
        for tag, a in self.tags:
            for name in ("src", "href", "poster"):
                if a.get(name) and tag in ("img", "video", "a", "script", "source"):
                    out.append(str(a[name]))
        return out


def result(id: str, row: int, status: ItemStatus, **kw: Any) -> ItemResult:
    return ItemResult(id=id, row=row, status=status, **kw)


NASTY = '<script>alert("x")</script> & \'quotes\' "double" — ünïcødé 視頻 🎬'


def nasty_results() -> list[ItemResult]:
    return [
        result(
            "ok-1",
            1,
            ItemStatus.SUCCEEDED,
            prompt="a calm lake at dawn",
            video="v",
            cost_time_ms=94_200,
            attempts=1,
            cost_usd=0.19,
            task_id="t-1",
        ),
        result(
            "bad-2",
            2,
            ItemStatus.FAILED,
            prompt=NASTY + " " + "very long " * 400,
            fail_code="GENERATION_FAILED",
            fail_msg="provider said: " + NASTY,
            attempts=3,
            cost_usd=0.57,
        ),
        result(
            "inv-3",
            3,
            ItemStatus.INVALID,
            prompt="x",
            field="image_url",
            fail_msg="image is 200x900",
            errors=["short side 200 px must be above 300 px", "aspect ratio 0.22 below 2:5"],
        ),
        result(
            "skip-4",
            4,
            ItemStatus.SKIPPED,
            prompt="p",
            fail_code="CONTENT_VIOLATION",
            fail_msg="content policy",
        ),
        result("unc-5", 5, ItemStatus.UNCERTAIN, uncertain=True, note="POST timed out after send"),
        result("ok-0", 0, ItemStatus.SUCCEEDED, prompt="first row", video="v", cost_time_ms=1000),
    ]


def render(results: list[ItemResult], **kw: Any) -> str:
    args: dict[str, Any] = {
        "video_href": lambda r: f"../../videos/{r.id}.mp4" if r.video else None,
        "poster_href": lambda r: f"../../videos/{r.id}~poster.jpg" if r.video else None,
        "contact_sheet_href": "contact-sheet.jpg",
    }
    args.update(kw)
    return render_review_page(RUN, results, **args)


def test_page_shows_one_card_per_item_problems_first() -> None:
    page = Page(render(nasty_results()))
    statuses = [c["status"] for c in page.cards]
    assert statuses == ["uncertain", "failed", "invalid", "skipped", "succeeded", "succeeded"]
    # manifest order within a status
    assert [page.card_part(i, "id") for i in (4, 5)] == ["ok-0", "ok-1"]
    header = "".join(page.text).split("ok-0")[0]
    for label in ("uncertain 1", "failed 1", "invalid 1", "skipped 1", "succeeded 2", "6 items"):
        assert label in header
    assert "over all runs: $0.76" in header and "2 videos" in header


def test_a_stored_video_to_look_at_says_why_and_comes_before_clean_ones() -> None:
    """A clip shorter than paid for, and one whose ledger record could not be written, are
    'succeeded' but not fine: their cards say why and lead the successes."""
    results = [
        result("ok-0", 0, ItemStatus.SUCCEEDED, video="v"),
        result("short-1", 1, ItemStatus.SUCCEEDED, video="v",
               warning="the clip is 3.0 s long, 6 s paid for"),
        result("behind-2", 2, ItemStatus.SUCCEEDED, video="v", ledger_behind=True),
    ]  # fmt: skip
    page = Page(render(results))
    assert [page.card_part(i, "id") for i in range(3)] == ["short-1", "behind-2", "ok-0"]
    assert "warning: the clip is 3.0 s long, 6 s paid for" in page.card_text(0)
    assert "keep this run's results file" in page.card_text(1)
    assert "keep this run's results file" in reason(results[2])


def test_the_header_says_what_this_run_cost_apart_from_earlier_runs() -> None:
    """A resumed run paid nothing: its page must not show the items' lifetime cost as its."""
    resumed = [r.model_copy(update={"run_cost_usd": 0.0}) for r in nasty_results() if r.cost_usd]
    header = "".join(Page(render(resumed)).text)
    assert "estimated cost of this run $0.00" in header
    assert "over all runs: $" in header and "submissions" in header


def test_page_card_has_video_poster_reason_prompt_and_figures() -> None:
    page = Page(render(nasty_results()))
    ok = page.card_of("ok-1")
    assert page.attr(ok, "video", "src") == "../../videos/ok-1.mp4"
    assert page.attr(ok, "video", "poster") == "../../videos/ok-1~poster.jpg"
    assert page.attr(ok, "video", "preload") == "none"
    assert page.attr(ok, "video", "controls") is None  # present (boolean attribute)
    text = page.card_text(ok)
    assert "row 1" in text and "generation 94.2 s" in text and "1 attempt" in text
    assert "$0.19" in text and "a calm lake at dawn" in text
    inv = next(i for i, c in enumerate(page.cards) if c["status"] == "invalid")
    inv_text = page.card_text(inv)
    assert "image_url" in inv_text and "short side 200 px must be above 300 px" in inv_text
    assert "aspect ratio 0.22 below 2:5" in inv_text and page.attr(inv, "video", "src") is None
    unc = page.card_text(0)
    assert "POST timed out after send" in unc and "may have been paid" in unc


def test_page_escapes_user_and_provider_text() -> None:
    text = render(nasty_results())
    page = Page(text)
    assert [t for t, _ in page.tags].count("script") == 1  # only the page's own filter script
    bad = next(i for i, c in enumerate(page.cards) if c["status"] == "failed")
    # the full reason, as text, exactly
    assert "provider said: " + NASTY in page.card_text(bad)
    # the prompt is shortened on the card, the full text is in the title, exactly
    prompt = next(a for t, a in page.cards[bad]["attrs"] if a.get("class") == "prompt")
    assert prompt["title"] == nasty_results()[1].prompt
    shown = page.card_text(bad).split(NASTY)[-1]
    assert "very long" in shown and len(shown) < 400 and "…" in shown


def test_page_is_self_contained_and_refuses_script_links() -> None:
    text = render(
        nasty_results(),
        video_href=lambda r: "javascript:alert(1)" if r.id == "ok-1" else None,
        poster_href=lambda r: "data:image/png;base64,AAAA",
    )
    page = Page(text)
    assert "javascript:" not in text and "data:image" not in text
    assert page.refs() == ["contact-sheet.jpg", "contact-sheet.jpg"]
    assert not any(t == "script" and a.get("src") for t, a in page.tags)
    assert [a for t, a in page.tags if t == "link"] == [{"rel": "icon", "href": "data:,"}]
    assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere


def test_page_of_a_run_without_items() -> None:
    page = Page(render([], contact_sheet_href=None))
    assert page.cards == [] and "This run has no items." in "".join(page.text)


def test_review_order_puts_unknown_statuses_first() -> None:
    rs = [result("a", 1, ItemStatus.SUCCEEDED), result("b", 2, ItemStatus.FAILED)]
    assert [r.id for r in review_order(rs)] == ["b", "a"]


def test_relative_href() -> None:
    page = "runs/r1/index.html"
    assert relative_href(page, "videos/a.mp4") == "../../videos/a.mp4"
    assert relative_href(page, "videos/a b#?.mp4") == "../../videos/a%20b%23%3F.mp4"
    assert relative_href(page, "runs/r1/contact-sheet.jpg") == "contact-sheet.jpg"


# --- publishing ---------------------------------------------------------------------------------


def stored_run(store: OutputStore, tmp: Path) -> list[ItemResult]:
    """A run with mixed statuses whose videos are really in `store`."""
    blue, red = emulator_mp4(tmp), emulator_mp4(tmp, colour=(220, 30, 30))
    store.write_bytes_atomic("videos/ok-a.mp4", blue)
    store.write_bytes_atomic("videos/ok-b/0123456789ab.mp4", red)  # a changed row's variant
    store.write_bytes_atomic("videos/broken.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 300)
    url = store.url_for
    return [
        result("ok-a", 1, ItemStatus.SUCCEEDED, video=url("videos/ok-a.mp4"), prompt="blue"),
        result(
            "ok-b", 2, ItemStatus.SUCCEEDED, video=url("videos/ok-b/0123456789ab.mp4"), prompt="r"
        ),
        result("gone", 3, ItemStatus.SUCCEEDED, video=url("videos/gone.mp4")),
        result("broken", 4, ItemStatus.SUCCEEDED, video=url("videos/broken.mp4")),
        result("elsewhere", 5, ItemStatus.SUCCEEDED, video="s3://other-bucket/videos/e.mp4"),
        result("bad", 6, ItemStatus.FAILED, fail_code="GENERATION_FAILED", fail_msg="<b>no</b>"),
        result("inv", 7, ItemStatus.INVALID, fail_msg="short side 200 px"),
    ]


def test_publish_review_writes_posters_sheet_and_page(store: OutputStore, tmp_path: Path) -> None:
    results = stored_run(store, tmp_path)
    out = publish_review(store, RUN, results)
    assert out == ReviewOutputs(
        page_key=f"runs/{RUN}/index.html",
        contact_sheet_key=f"runs/{RUN}/contact-sheet.jpg",
        posters={"ok-a": "videos/ok-a~poster.jpg", "ok-b": "videos/ok-b/0123456789ab~poster.jpg"},
    )
    assert nearest_colour(dominant(store.read_bytes(out.posters["ok-b"]))) == COLOURS[0]
    fmt, (w, _h) = image_size(store.read_bytes(f"runs/{RUN}/contact-sheet.jpg"))
    assert fmt == "JPEG" and w == review.GAP + 6 * (review.TILE_W + review.GAP)

    page = Page(store.read_text(out.page_key))
    assert len(page.cards) == len(results)
    # every link on the page leads to an object in the store, relative to the page
    for ref in page.refs():
        key = unquote(urljoin(f"/{out.page_key}", ref))[1:]
        assert store.exists(key), ref
    assert page.attr(page.card_of("gone"), "video", "src") is None  # missing video: no dead link
    assert page.attr(page.card_of("broken"), "video", "poster") is None  # undecodable: no poster
    assert page.attr(page.card_of("broken"), "video", "src") == "../../videos/broken.mp4"
    assert page.attr(page.card_of("elsewhere"), "video", "src") is None  # not in this store
    assert "<b>no</b>" in page.card_text(page.card_of("bad"))


def test_publish_review_keeps_existing_posters(local_store: OutputStore, tmp_path: Path) -> None:
    results = stored_run(local_store, tmp_path)
    publish_review(local_store, "r1", results)
    poster = Path(local_store.url_for("videos/ok-a~poster.jpg"))
    marker = jpeg(8, 8, (0, 255, 0))
    poster.write_bytes(marker)  # stands for a poster made earlier
    out = publish_review(local_store, "r2", results)
    assert out.posters["ok-a"] == "videos/ok-a~poster.jpg" and poster.read_bytes() == marker
    assert local_store.exists("runs/r1/index.html") and local_store.exists("runs/r2/index.html")


def test_a_large_runs_page_shows_the_first_problem_items_and_says_so(
    local_store: OutputStore, tmp_path: Path
) -> None:
    """Past `max_cards` items the page, its posters and its sheet stop (a 10,000-item run
    would otherwise decode every video and hold a gigantic sheet); counts still cover all."""
    results = stored_run(local_store, tmp_path)
    out = publish_review(local_store, "big", results, max_cards=3)
    page = Page(local_store.read_text(out.page_key))
    assert len(page.cards) == 3  # problem items first: inv, bad, then the first success
    assert page.card_of("inv") is not None and page.card_of("bad") is not None
    assert out.posters == {"ok-a": "videos/ok-a~poster.jpg"}
    assert not local_store.exists("videos/ok-b/0123456789ab~poster.jpg")  # not shown: no decode
    text = local_store.read_text(out.page_key)
    assert "The first 3 of 7 items are shown" in text and "7 items" in text
    fmt, (w, _h) = image_size(local_store.read_bytes("runs/big/contact-sheet.jpg"))
    assert fmt == "JPEG" and w == review.GAP + 3 * (review.TILE_W + review.GAP)  # 3 tiles


def test_publish_review_of_no_results(local_store: OutputStore) -> None:
    out = publish_review(local_store, "empty", [])
    assert out == ReviewOutputs(f"runs/empty/{review.PAGE_NAME}", None, {})
    assert "This run has no items." in local_store.read_text(out.page_key)


def test_markdown_embeds_a_presigned_contact_sheet_on_s3(
    s3_store: OutputStore, tmp_path: Path
) -> None:
    out = publish_review(s3_store, RUN, stored_run(s3_store, tmp_path))
    md = review_markdown(s3_store, out, expires_s=600)
    assert f"`{s3_store.url_for(out.page_key)}`" in md
    url = md.split("![contact sheet](", 1)[1].split(")", 1)[0]
    answer = httpx.get(url)  # what the Prefect UI's browser does with the image
    assert answer.status_code == 200
    assert image_size(answer.content)[0] == "JPEG"


def test_markdown_of_a_local_store_names_the_page_and_embeds_nothing(
    local_store: OutputStore,
) -> None:
    out = publish_review(local_store, "r", [result("a", 1, ItemStatus.FAILED)])
    md = review_markdown(local_store, out, expires_s=600)
    assert local_store.url_for(out.page_key) in md and "![" not in md


# --- in a real browser --------------------------------------------------------------------------


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, list[tuple[str, str, int]]]]:
    """The folder `tmp_path/site` over http on 127.0.0.1, with a log of (method, path, code)."""
    root = tmp_path / "site"
    root.mkdir()
    log: list[tuple[str, str, int]] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            log.append((self.command, urlsplit(self.path).path, int(code)))

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, log
    finally:
        server.shutdown()
        server.server_close()


def dump_dom(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, as headless Chromium built it."""
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


@pytest.fixture
def chromium() -> str:
    found = find_chromium()
    if found is None:
        pytest.skip(
            "CHROMIUM NOT INSTALLED: the review page was not tested in a browser. "
            "`make chromium` installs Debian's chromium (apt-get install chromium)"
        )
    return found


def test_review_page_loads_in_headless_chromium(
    chromium: str, served: tuple[str, Path, list[tuple[str, str, int]]], tmp_path: Path
) -> None:
    base, root, log = served
    store = OutputStore(str(root))
    results = stored_run(store, tmp_path)
    out = publish_review(store, RUN, results)
    page_url = f"{base}/{out.page_key}"
    page = Page(dump_dom(chromium, page_url, tmp_path / "profile"))
    assert len(page.cards) == len(results)  # the browser built every card
    assert {c["status"] for c in page.cards} == {"succeeded", "failed", "invalid"}

    answered = {(path, code) for method, path, code in log if method == "GET"}
    assert (f"/{out.page_key}", 200) in answered
    posters = [a["poster"] for t, a in page.tags if t == "video" and a.get("poster")]
    videos = [a["src"] for t, a in page.tags if t == "video" and a.get("src")]
    assert len(posters) == 2 and len(videos) == 3  # ok-a, ok-b and the undecodable one
    for ref in [*posters, "contact-sheet.jpg"]:  # images the browser must have loaded itself
        path = unquote(urlsplit(urljoin(page_url, ref)).path)
        assert (path, 200) in answered, (ref, log)
    for ref in videos:  # preload="none": the browser fetches these only on play; we check them
        with urllib.request.urlopen(urljoin(page_url, ref)) as answer:
            assert answer.status == 200
            assert answer.headers["Content-Type"] == "video/mp4"
            assert answer.read(12)[4:8] == b"ftyp"
    assert not [entry for entry in log if entry[2] >= 400], log


def test_review_page_hides_the_statuses_named_in_its_address(
    chromium: str, local_store: OutputStore, tmp_path: Path
) -> None:
    out = publish_review(local_store, RUN, nasty_results())
    url = Path(local_store.url_for(out.page_key)).as_uri() + "#hide=succeeded,skipped"
    page = Page(dump_dom(chromium, url, tmp_path / "profile"))  # opened from the folder
    body = next(a for t, a in page.tags if t == "body")
    assert set(str(body.get("class")).split()) == {"hide-succeeded", "hide-skipped"}
    pressed = {a["data-status"]: a["aria-pressed"] for t, a in page.tags if t == "button"}
    assert pressed == {
        "uncertain": "true",
        "failed": "true",
        "invalid": "true",
        "skipped": "false",
        "succeeded": "false",
    }
    assert len(page.cards) == len(nasty_results())  # hidden by the stylesheet, still there
    style = "".join(d for d in page.text if ".card" in d)
    assert ".hide-succeeded .card[data-status=succeeded]{display:none}" in style


def test_page_shows_characters_that_act_as_their_escapes() -> None:
    """A prompt with a right-to-left override would show its rest reversed, and zero-width
    spaces hide in plain sight: the page writes them as escapes. Emoji joiners stay."""
    prompt = "cat \u202etxt.exe\u202c in\u200b a box 👩\u200d👩\u200d👧"
    page = Page(render([result("p-1", 1, ItemStatus.SUCCEEDED, prompt=prompt, video="v")]))
    text = page.card_text(0)
    assert "\u202e" not in text and "\u200b" not in text
    assert "\\u202etxt.exe\\u202c" in text and "in\\u200b a box" in text
    assert "👩\u200d👩\u200d👧" in text
