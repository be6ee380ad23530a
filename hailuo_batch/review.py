"""Previews for people: a poster frame per stored video, a contact sheet and a review page per run.

- `extract_poster` decodes one frame of an MP4 (PyAV) into a small JPEG (Pillow);
  `store_poster` writes it beside the video under `poster_key(video_key)`.
- `contact_sheet` draws one JPEG grid of labelled tiles (a grey tile naming the status for items
  without a poster).
- `render_review_page` is a pure function from results to one self-contained HTML page: inline
  CSS and a few lines of inline script, no external assets, every user or provider text escaped.
- `publish_review` writes all three into the output store: posters beside the videos,
  `runs/{run_id}/contact-sheet.jpg` and `runs/{run_id}/index.html`, whose links are relative
  (`../../videos/x.mp4`), so the output folder can be opened or synced anywhere.
"""

from __future__ import annotations

import html
import io
import logging
import math
import os
import posixpath
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import av
from PIL import Image, ImageDraw, ImageFont, ImageOps

from hailuo_batch import markdown as md
from hailuo_batch.apixo.models import provider_text
from hailuo_batch.results import LEDGER_BEHIND_REASON, ItemResult, ItemStatus
from hailuo_batch.storage import OutputStore, PresignUnsupported, run_key
from hailuo_batch.video import (
    OPEN_OPTIONS,
    POSTER_AT_S,
    POSTER_MAX_WIDTH,
    is_poster_frame,
    poster_jpeg,
)

logger = logging.getLogger(__name__)

VIDEO_SUFFIX = ".mp4"
# "~" is outside the id alphabet [A-Za-z0-9._-], so a poster's name can never be an item id:
# neither another video's name nor the folder of an item's variant videos (videos/{id}/...).
POSTER_SUFFIX = "~poster.jpg"
PAGE_NAME = "index.html"
CONTACT_SHEET_NAME = "contact-sheet.jpg"

# problem items first, the ones a person must act on at the top
STATUS_ORDER: tuple[ItemStatus, ...] = (
    ItemStatus.UNCERTAIN,
    ItemStatus.FAILED,
    ItemStatus.INVALID,
    ItemStatus.SKIPPED,
    ItemStatus.NOT_SUBMITTED,
    ItemStatus.SUCCEEDED,
)
STATUS_COLOURS: dict[str, str] = {
    ItemStatus.SUCCEEDED: "#1a7f37",
    ItemStatus.SKIPPED: "#bc4c00",
    ItemStatus.FAILED: "#cf222e",
    ItemStatus.INVALID: "#8250df",
    ItemStatus.NOT_SUBMITTED: "#57606a",
    ItemStatus.UNCERTAIN: "#9a6700",
}
_UNKNOWN_COLOUR = "#57606a"
PROMPT_SHOWN_CHARS = 180


class PosterError(ValueError):
    """No poster frame can be taken from these bytes (not a video, no video stream, no frame)."""


# --- posters ------------------------------------------------------------------------------------


def poster_key(video_key: str) -> str:
    """The key of a video's poster, beside it: `videos/x.mp4` -> `videos/x~poster.jpg`.

    Distinct video keys give distinct poster keys, a poster key is never a video key (it ends in
    `.jpg`) and never the folder of one (its name has a `~`, which ids cannot).
    """
    if not video_key.endswith(VIDEO_SUFFIX):
        raise ValueError(f"not a video key (must end in {VIDEO_SUFFIX}): {video_key!r}")
    return video_key[: -len(VIDEO_SUFFIX)] + POSTER_SUFFIX


def extract_poster(
    video: bytes | str | os.PathLike[str],
    *,
    at_s: float = POSTER_AT_S,
    max_width: int = POSTER_MAX_WIDTH,
) -> bytes:
    """A JPEG of the frame shown at `at_s` seconds (the last frame of a shorter video), at most
    `max_width` pixels wide (never enlarged). Decodes from the keyframe before `at_s` only.

    Raises `PosterError` when the bytes or file are not a decodable video.
    """
    source = io.BytesIO(video) if isinstance(video, bytes | bytearray) else os.fspath(video)
    try:
        with av.open(source, mode="r", options=OPEN_OPTIONS) as container:
            demuxer = container.format.name
            if demuxer == "image2" or demuxer.endswith("_pipe"):  # FFmpeg reads stills too
                raise PosterError(f"a still image ({demuxer}), not a video")
            if not container.streams.video:
                raise PosterError("no video stream")
            stream = container.streams.video[0]
            if at_s > 0 and stream.time_base:
                try:
                    container.seek(int(at_s / stream.time_base), stream=stream, backward=True)
                except av.FFmpegError:
                    pass  # not seekable: decode from the start
            chosen = None
            for frame in container.decode(stream):
                chosen = frame
                if is_poster_frame(frame, at_s):
                    break
            if chosen is None:
                raise PosterError("the video has no decodable frame")
            return poster_jpeg(chosen, max_width)
    except PosterError:
        raise
    except (av.FFmpegError, OSError, EOFError, ValueError) as exc:
        raise PosterError(f"cannot decode the video: {exc}") from exc


def store_poster(store: OutputStore, video_key: str) -> str | None:
    """Extract the poster of the stored video `video_key` and write it beside the video.

    Returns the poster's key, or None (logged, never raised) if the video is missing, cannot be
    decoded or the poster cannot be written.
    """
    return _make_poster(store, video_key, reuse=False).key


@dataclass(frozen=True)
class _Poster:
    video_found: bool
    key: str | None = None
    jpeg: bytes | None = None


def _make_poster(store: OutputStore, video_key: str, *, reuse: bool) -> _Poster:
    """Make (or with `reuse`, read back) the poster of a stored video; never raises for a
    missing or bad video or a store error. A stored poster stays right because stored videos
    are never overwritten."""
    try:
        target = poster_key(video_key)
        if reuse and store.exists(video_key):
            try:
                return _Poster(True, target, store.read_bytes(target))
            except FileNotFoundError:
                pass
        data = store.read_bytes(video_key)
    except FileNotFoundError:
        logger.warning("no poster for %s: the video is not in the store", video_key)
        return _Poster(False)
    except (OSError, ValueError) as exc:
        logger.warning("no poster for %s: %s", video_key, exc)
        return _Poster(False)
    try:
        jpeg = extract_poster(data)
        if store.is_local:  # what a download killed while writing this poster left in tmp/
            store.remove_temp_files(target)
        store.write_bytes_atomic(target, jpeg)
    except (OSError, ValueError) as exc:  # PosterError is a ValueError; store errors OSErrors
        logger.warning("no poster for %s: %s", video_key, exc)
        return _Poster(True)
    return _Poster(True, target, jpeg)


def video_store_key(store: OutputStore, video: str | None) -> str | None:
    """The key in `store` of a result's `video` URL (as `store.url_for` wrote it), or None when
    the video is not an `.mp4` under this store's root."""
    if not video:
        return None
    if store.is_local and video.startswith("file://"):
        video = video[len("file://") :]
    root = store.url_for("").rstrip("/") + "/"
    if not video.startswith(root):
        return None
    key = video[len(root) :]
    parts = key.split("/")
    if "\\" in key or any(p in ("", ".", "..") for p in parts) or not key.endswith(VIDEO_SUFFIX):
        return None
    return key


# --- contact sheet ------------------------------------------------------------------------------

TILE_W, TILE_H, LABEL_H, GAP = 192, 108, 22, 4
JPEG_MAX_SIDE = 65_500

#: the review page shows this many items at most (problem items first): a person reviews
#: hundreds of clips, not ten thousand, and posters cost a decode each
MAX_CARDS = 500


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError, TypeError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> str:
    if draw.textlength(text, font=font) <= width:  # type: ignore[arg-type]
        return text
    while text and draw.textlength(text + "…", font=font) > width:  # type: ignore[arg-type]
        text = text[:-1]
    return text + "…"


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


def contact_sheet(tiles: list[tuple[str, bytes | None, str]], cols: int = 6) -> bytes:
    """One JPEG grid: per tile (label, poster JPEG or None, status) the poster fitted in a
    16:9 box, or a grey box with the status written on it, and below it a status-coloured bar
    and the label. A sheet too tall for JPEG gets more columns."""
    cols = max(1, cols)
    n = max(1, len(tiles))
    cell_h = TILE_H + LABEL_H + GAP
    cols = max(cols, math.ceil(n / ((JPEG_MAX_SIDE - GAP) // cell_h)))
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (GAP + cols * (TILE_W + GAP), GAP + rows * cell_h), (246, 248, 250))
    draw = ImageDraw.Draw(sheet)
    label_font, status_font = _font(13), _font(20)
    for i, (label, jpeg, status) in enumerate(tiles):
        x = GAP + (i % cols) * (TILE_W + GAP)
        y = GAP + (i // cols) * cell_h
        colour = _rgb(STATUS_COLOURS.get(status, _UNKNOWN_COLOUR))
        poster = _open_poster(jpeg) if jpeg else None
        if poster is not None:
            draw.rectangle((x, y, x + TILE_W - 1, y + TILE_H - 1), fill=(20, 20, 20))
            fitted = ImageOps.contain(poster, (TILE_W, TILE_H), Image.Resampling.BILINEAR)
            sheet.paste(
                fitted, (x + (TILE_W - fitted.width) // 2, y + (TILE_H - fitted.height) // 2)
            )
        else:
            draw.rectangle((x, y, x + TILE_W - 1, y + TILE_H - 1), fill=(200, 203, 207))
            word = _fit_text(draw, status.replace("_", " ").upper(), status_font, TILE_W - 8)
            draw.text(
                (x + TILE_W / 2, y + TILE_H / 2), word, fill=colour, font=status_font, anchor="mm"
            )
        draw.rectangle((x, y + TILE_H, x + 5, y + TILE_H + LABEL_H - 1), fill=colour)
        text = _fit_text(draw, label, label_font, TILE_W - 12)
        draw.text(
            (x + 9, y + TILE_H + LABEL_H / 2), text, fill=(36, 41, 47), font=label_font, anchor="lm"
        )
    out = io.BytesIO()
    sheet.save(out, "JPEG", quality=82)
    return out.getvalue()


def _open_poster(jpeg: bytes) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            im.draft("RGB", (TILE_W, TILE_H))  # JPEG: decode at a reduced scale, much faster
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


# --- the review page ----------------------------------------------------------------------------


def _status_rank(status: str) -> int:
    try:
        return STATUS_ORDER.index(ItemStatus(status))
    except ValueError:
        return -1  # a status this code does not know: show it first


def review_order(results: Iterable[ItemResult]) -> list[ItemResult]:
    """Problem items first (uncertain, failed, invalid, skipped, not submitted, succeeded),
    within a status those with something to look at (a possible duplicate charge, not the
    clip paid for, a ledger behind) first, then manifest order."""
    return sorted(
        results,
        key=lambda r: (_status_rank(r.status), not _flagged(r), r.row),
    )


def _flagged(r: ItemResult) -> bool:
    return bool(r.uncertain or r.warning or r.ledger_behind)


def _e(value: object) -> str:
    """`value` as HTML text: markup escaped, and characters that act instead of showing (a
    bidi override that reverses what follows, zero-width spaces) written as their escapes."""
    text = str(value)
    return html.escape(provider_text(text, len(text)), quote=True)


def _safe_href(href: str | None) -> str | None:
    """Relative links and http(s)/file URLs only (no javascript: or data: links)."""
    if not href:
        return None
    scheme = urlsplit(href).scheme.lower()
    return href if scheme in ("", "http", "https", "file") else None


def _short(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit].rstrip() + "…"


def _seconds(ms: int | float) -> str:
    return f"{ms / 1000:,.1f} s"


def _reason_html(r: ItemResult) -> str:
    parts: list[str] = []
    if r.fail_code:
        parts.append(f'<span class="code">{_e(r.fail_code)}</span>')
    if r.field:
        parts.append(f'<span class="field">field <code>{_e(r.field)}</code>:</span>')
    if r.fail_msg:
        parts.append(f'<span class="msg">{_e(r.fail_msg)}</span>')
    if r.warning:  # stored, but not the clip paid for (its length or resolution)
        parts.append(f'<span class="msg">warning: {_e(r.warning)}</span>')
    if r.ledger_behind:
        parts.append(f'<span class="msg">{_e(LEDGER_BEHIND_REASON)}</span>')
    rules = [e for e in r.errors if e and e != r.fail_msg]
    body = " ".join(parts)
    if rules:
        body += "<ul>" + "".join(f"<li>{_e(e)}</li>" for e in rules) + "</ul>"
    if not body:
        return ""
    return f'<div class="reason">{body}</div>'


def _card(r: ItemResult, video: str | None, poster: str | None) -> str:
    status = str(r.status)
    label = status.replace("_", " ")
    if video:
        poster_attr = f' poster="{_e(poster)}"' if poster else ""
        media = f'<video controls preload="none"{poster_attr} src="{_e(video)}"></video>'
    else:
        media = f'<div class="none">{_e(label)}</div>'
    elsewhere = (
        f'<p class="note">video not in this output: {_e(r.video)}</p>'
        if r.video and not video
        else ""
    )
    facts = [f"row {r.row}"]
    if r.cost_time_ms is not None:
        facts.append(f"generation {_seconds(r.cost_time_ms)}")
    facts.append(f"{r.attempts} attempt{'' if r.attempts == 1 else 's'}")
    facts.append(f"${r.cost_usd:,.2f}")
    prompt = ""
    if r.prompt:
        shown = _short(r.prompt, PROMPT_SHOWN_CHARS)
        prompt = f'<p class="prompt" title="{_e(r.prompt)}">{_e(shown)}</p>'
    note = f'<p class="note">{_e(r.note)}</p>' if r.note else ""
    flag = '<span class="flag">may have been paid</span>' if r.uncertain else ""
    link = f'<a class="open" href="{_e(video)}">open video</a>' if video else ""
    task = f'<span class="task">task {_e(r.task_id)}</span>' if r.task_id else ""
    return (
        f'<article class="card" data-status="{_e(status)}">'
        f'<div class="media{"" if video else " empty"}">{media}</div>'
        f'<div class="body">'
        f'<div class="head"><span class="id">{_e(r.id)}</span>'
        f'<span class="pill st-{_e(status)}">{_e(label)}</span>{flag}</div>'
        f"{_reason_html(r)}{note}{elsewhere}{prompt}"
        f'<p class="facts">{_e(" · ".join(facts))} {task}</p>'
        f"{link}</div></article>"
    )


def _css() -> str:
    pills = "".join(
        f".st-{s}{{background:{c}}}"
        f".card[data-status={s}] .none{{color:{c}}}"
        f".hide-{s} .card[data-status={s}]{{display:none}}"
        for s, c in STATUS_COLOURS.items()
    )
    return (
        "*{box-sizing:border-box}"
        "body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',"
        "sans-serif;color:#1f2328;background:#f6f8fa}"
        "header{padding:16px 24px;background:#fff;border-bottom:1px solid #d0d7de}"
        "h1{font-size:20px;margin:0 0 8px}"
        "h1 code{font-size:17px}"
        ".totals{margin:6px 0;color:#424a53}"
        ".chips{display:flex;flex-wrap:wrap;gap:6px;margin:8px 0}"
        ".chip{border:0;border-radius:14px;padding:3px 12px;color:#fff;font:inherit;"
        "font-weight:600;cursor:pointer}"
        ".chip.off{opacity:.35;text-decoration:line-through}"
        ".sheet img{display:block;width:min(100%,820px);max-width:100%;height:auto;"
        "max-height:240px;object-fit:cover;object-position:top left;"
        "border:1px solid #d0d7de;margin-top:6px}"
        "main{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));"
        "gap:14px;padding:16px 24px}"
        ".card{background:#fff;border:1px solid #d0d7de;border-radius:8px;overflow:hidden;"
        "display:flex;flex-direction:column;min-width:0}"
        ".media{position:relative;aspect-ratio:16/9;overflow:hidden;background:#161b22}"
        ".media.empty{aspect-ratio:auto;height:72px}"
        ".media video{position:absolute;inset:0;width:100%;height:100%;object-fit:contain;"
        "background:#161b22}"
        ".none{position:absolute;inset:0;display:flex;align-items:center;justify-content:center;"
        "background:#e6e9ed;font-size:20px;font-weight:700;text-transform:uppercase;"
        "letter-spacing:.06em}"
        ".body{padding:10px 12px;display:flex;flex-direction:column;gap:6px;min-width:0}"
        ".head{display:flex;align-items:center;gap:8px;flex-wrap:wrap}"
        ".id{font:600 14px ui-monospace,SFMono-Regular,Menlo,'DejaVu Sans Mono',monospace;"
        "overflow-wrap:anywhere}"
        ".pill{color:#fff;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600}"
        ".flag{color:#9a6700;border:1px solid #9a6700;border-radius:10px;padding:0 8px;"
        "font-size:12px}"
        ".reason{background:#fff1f0;border-left:4px solid #cf222e;padding:6px 8px;"
        "white-space:pre-wrap;overflow-wrap:anywhere;max-height:12em;overflow:auto}"
        ".card[data-status=skipped] .reason{background:#fff4e5;border-color:#bc4c00}"
        ".card[data-status=invalid] .reason{background:#f6f0ff;border-color:#8250df}"
        ".card[data-status=uncertain] .reason,.card[data-status=not_submitted] .reason"
        "{background:#fff8e1;border-color:#9a6700}"
        ".reason ul{margin:4px 0 0;padding-left:18px;white-space:normal}"
        ".code{font:600 12px ui-monospace,monospace;margin-right:6px}"
        ".note{margin:0;color:#59636e;font-style:italic;overflow-wrap:anywhere}"
        ".prompt{margin:0;color:#1f2328;overflow-wrap:anywhere}"
        ".facts{margin:0;color:#59636e;font-size:13px}"
        ".task{font:12px ui-monospace,monospace;color:#8c959f}"
        ".open{font-size:13px}"
        f"{pills}"
    )


# The status chips hide and show items; the hidden statuses live in the address (#hide=a,b) so a
# filtered view survives a reload and can be shared. The page works without it.
_SCRIPT = """
(function () {
  var chips = document.querySelectorAll('button.chip');
  function show(status, hidden) {
    document.body.classList.toggle('hide-' + status, hidden);
    chips.forEach(function (b) {
      if (b.dataset.status === status) {
        b.classList.toggle('off', hidden);
        b.setAttribute('aria-pressed', String(!hidden));
      }
    });
  }
  var m = /^#hide=([a-z_,]*)$/.exec(location.hash);
  if (m) m[1].split(',').forEach(function (s) { if (s) show(s, true); });
  chips.forEach(function (b) {
    b.addEventListener('click', function () {
      show(b.dataset.status, !document.body.classList.contains('hide-' + b.dataset.status));
      var hidden = [];
      chips.forEach(function (c) {
        if (c.classList.contains('off')) hidden.push(c.dataset.status);
      });
      history.replaceState(null, '', hidden.length ? '#hide=' + hidden.join(',') : '#');
    });
  });
})();
"""


def render_review_page(
    run_id: str,
    results: list[ItemResult],
    *,
    video_href: Callable[[ItemResult], str | None],
    poster_href: Callable[[ItemResult], str | None],
    contact_sheet_href: str | None,
    contact_sheet_size: tuple[int, int] | None = None,
    max_cards: int = MAX_CARDS,
) -> str:
    """The review page of one run: a header with counts by status and totals, then one card
    per item, problem items first (poster and playable video, id, row, coloured status, the
    full reason, the prompt shortened with the full text on hover, generation time, attempts,
    estimated cost). Self-contained: inline CSS and script, links only to the given hrefs.
    `contact_sheet_size` (pixels), when known, keeps a small sheet from being enlarged; a tall
    one shows its top (the problem items) and opens whole on a click."""
    ordered = review_order(results)
    counts = Counter(str(r.status) for r in results)
    known = [str(s) for s in STATUS_ORDER]
    statuses = [s for s in known if counts[s]] + sorted(s for s in counts if s not in known)
    chips = "".join(
        f'<button class="chip st-{_e(s)}" data-status="{_e(s)}" aria-pressed="true" '
        f'title="show or hide {_e(s.replace("_", " "))} items">'
        f"{_e(s.replace('_', ' '))} {counts[s]}</button>"
        for s in statuses
    )
    times = [r.cost_time_ms for r in results if r.cost_time_ms is not None]
    totals = [
        f"{len(results)} item{'' if len(results) == 1 else 's'}",
        f"{sum(1 for r in results if video_href(r))} videos",
        f"estimated cost of this run ${sum(r.run_cost_usd for r in results):,.2f} (these items "
        f"over all runs: ${sum(r.cost_usd for r in results):,.2f}, "
        f"{sum(r.attempts for r in results)} submissions)",
    ]
    if times:
        totals.append(
            f"generation time {_seconds(sum(times))} in total, "
            f"median {_seconds(statistics.median(times))}"
        )
    sheet = _safe_href(contact_sheet_href)
    sheet_html = ""
    if sheet:
        width = f' style="width:{min(contact_sheet_size[0], 820)}px"' if contact_sheet_size else ""
        sheet_html = (
            f'<div class="sheet"><a href="{_e(sheet)}">contact sheet (open it whole)'
            f'<img src="{_e(sheet)}"{width} alt="contact sheet of run {_e(run_id)}"></a></div>'
        )
    cards = "".join(
        _card(r, _safe_href(video_href(r)), _safe_href(poster_href(r))) for r in ordered[:max_cards]
    )
    if not cards:
        cards = "<p>This run has no items.</p>"
    elif len(ordered) > max_cards:
        cards += (
            f'<p class="more">The first {max_cards:,} of {len(ordered):,} items are shown, '
            "problem items first; every item is in the run's results.jsonl and item table.</p>"
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request to wherever the page is served
        f"<title>Review of run {_e(run_id)}</title><style>{_css()}</style></head>"
        "<body><header>"
        f"<h1>Review of run <code>{_e(run_id)}</code></h1>"
        f'<div class="chips">{chips}</div>'
        f'<div class="totals">{_e(" · ".join(totals))}</div>'
        f"{sheet_html}</header>"
        f"<main>{cards}</main>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


# --- publishing into the store ------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewOutputs:
    """Keys written by `publish_review` (relative to the store's root)."""

    page_key: str
    contact_sheet_key: str | None
    posters: dict[str, str] = field(default_factory=dict)  # item id -> poster key


def relative_href(from_key: str, to_key: str) -> str:
    """A URL path from the object `from_key` to `to_key`, percent-encoded."""
    rel = posixpath.relpath(to_key, posixpath.dirname(from_key) or ".")
    return quote(rel, safe="/~")


def publish_review(
    store: OutputStore,
    run_id: str,
    results: Sequence[ItemResult],
    *,
    workers: int = 4,
    max_cards: int = MAX_CARDS,
) -> ReviewOutputs:
    """Write the previews of a run into `store`: a poster beside every video of this store that
    the page shows (an existing poster is kept), `runs/{run_id}/contact-sheet.jpg` and
    `runs/{run_id}/index.html`, for the first `max_cards` items in review order (the page says
    how many it leaves out; its counts and totals cover every item). A missing video gets no
    link and no poster, an undecodable one no poster; neither raises. Errors writing the sheet
    or the page are raised."""
    page = run_key(run_id, PAGE_NAME)
    ordered = review_order(results)[:max_cards]
    keys = {id(r): video_store_key(store, r.video) for r in results}
    wanted = sorted({k for r in ordered if (k := keys[id(r)])})
    made: dict[str, _Poster] = {}
    if wanted:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            found = pool.map(lambda k: _make_poster(store, k, reuse=True), wanted)
            made = dict(zip(wanted, found, strict=True))
    none = _Poster(False)

    def poster_of(r: ItemResult) -> _Poster:
        key = keys[id(r)]
        return made.get(key, none) if key else none

    def video_for(r: ItemResult) -> str | None:
        key = keys[id(r)]
        checked = key in made  # a shown item's video was looked for; others are trusted
        return (
            relative_href(page, key) if key and (poster_of(r).video_found or not checked) else None
        )

    def poster_for(r: ItemResult) -> str | None:
        target = poster_of(r).key
        return relative_href(page, target) if target else None

    sheet_key: str | None = None
    sheet_size: tuple[int, int] | None = None
    if ordered:
        sheet_key = run_key(run_id, CONTACT_SHEET_NAME)
        sheet = contact_sheet([(r.id, poster_of(r).jpeg, str(r.status)) for r in ordered])
        with Image.open(io.BytesIO(sheet)) as im:
            sheet_size = im.size
        store.write_bytes_atomic(sheet_key, sheet)
    text = render_review_page(
        run_id,
        list(results),
        video_href=video_for,
        poster_href=poster_for,
        contact_sheet_href=relative_href(page, sheet_key) if sheet_key else None,
        contact_sheet_size=sheet_size,
        max_cards=max_cards,
    )
    store.write_text_atomic(page, text)
    posters = {r.id: key for r in ordered if (key := poster_of(r).key)}
    return ReviewOutputs(page_key=page, contact_sheet_key=sheet_key, posters=posters)


def review_markdown(store: OutputStore, outputs: ReviewOutputs, *, expires_s: int) -> str:
    """Markdown for the run's summary artifact: where the review page is, and the contact sheet
    embedded through a presigned URL when the store can hand one out (not a local folder)."""
    page = store.url_for(outputs.page_key)
    lines = [
        f"**Review page:** {md.code(page)} (its links are relative: open it in the output "
        "folder, or in a copy of `runs/` and `videos/`)"
    ]
    if outputs.contact_sheet_key and not store.is_local:
        try:
            url = store.presign(outputs.contact_sheet_key, expires_s)
        except (PresignUnsupported, OSError) as exc:
            logger.warning("cannot presign the contact sheet: %s", exc)
        else:
            safe = url.replace("(", "%28").replace(")", "%29").replace(" ", "%20")
            lines += ["", f"![contact sheet]({safe})"]
    return "\n".join(lines) + "\n"
