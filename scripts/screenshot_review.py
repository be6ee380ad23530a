"""Screenshot of a run's review page for the README (docs/img/review-page.png).

Builds a demo run in a fresh local output folder: real H.264 MP4s made by the emulator's
encoder from drawn images, and results with every status (succeeded, failed, skipped, invalid,
uncertain, not submitted). Publishes its posters, contact sheet and review page with
`hailuo_batch.review.publish_review`, then opens `runs/<run_id>/index.html` straight from the
folder (file://) in headless Chromium and saves a screenshot.

    .venv/bin/python scripts/screenshot_review.py [--out docs/img/review-page.png]
                                                  [--keep DIR] [--width 1400 --height 1500]

Needs Debian's `chromium` (`make chromium` installs it).
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hailuo_batch.emulator.video import encode_pan_zoom
from hailuo_batch.results import ItemResult, ItemStatus
from hailuo_batch.review import publish_review
from hailuo_batch.storage import OutputStore, video_key

RUN_ID = "20250614T020000Z-5f3a9c21"
SUCCEEDED = [
    # id, size of the video, hue, prompt, generation ms
    ("harbour-dawn", (854, 480), 20, "slow push-in over a fishing harbour at dawn, mist", 96_400),
    ("city-dusk", (854, 480), 200, "slow parallax over the city at dusk, lights coming on", 88_100),
    ("tall-tower", (270, 480), 120, "camera tilts up the glass tower, clouds reflected", 132_900),
    ("garden-dolly", (480, 480), 80, "a gentle dolly through a walled garden in spring", 101_250),
    ("desert-road", (854, 480), 45, "a long straight road into the desert, heat shimmer", 77_800),
]


def draw(size: tuple[int, int], hue: int, label: str) -> bytes:
    """A gradient with rings and a label (JPEG), so the pan in the video is visible."""
    w, h = size
    x = np.linspace(0, 1, w)[None, :]
    y = np.linspace(0, 1, h)[:, None]
    rgb = np.stack(
        [
            (hue + 180 * x + 0 * y) % 256,
            60 + 150 * y + 0 * x,
            (hue * 3 + 120 * (1 - x) * y) % 256,
        ],
        axis=-1,
    ).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    d = ImageDraw.Draw(img)
    for i in range(5):
        r = min(w, h) // (3 + i)
        cx, cy = (w * (i + 1)) // 6, (h * ((i * 3) % 5 + 1)) // 6
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 255), width=5)
    d.text((24, 24), label, fill=(255, 255, 255), font_size=max(24, h // 14))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def demo_run(store: OutputStore, work: Path) -> list[ItemResult]:
    """Store real videos and return results with every status, as a run would write them."""
    results: list[ItemResult] = []
    for row, (item_id, (w, h), hue, prompt, ms) in enumerate(SUCCEEDED, start=1):
        mp4 = work / f"{item_id}.mp4"
        encode_pan_zoom(draw((w * 2, h * 2), hue, item_id), w, h, 2, 8, mp4)
        stored = store.write_bytes_atomic(video_key(item_id), mp4.read_bytes())
        results.append(
            ItemResult(
                id=item_id,
                row=row,
                status=ItemStatus.SUCCEEDED,
                task_id=f"task-{row:04d}",
                attempts=1 if row != 3 else 2,
                video=stored.url,
                bytes=stored.size,
                sha256=stored.sha256,
                cost_usd=0.19 if row != 3 else 0.38,
                cost_time_ms=ms,
                prompt=prompt,
                run_id=RUN_ID,
            )
        )
    problems = [
        ItemResult(
            id="waves-flaky",
            row=6,
            status=ItemStatus.FAILED,
            task_id="task-0006",
            fail_code="GENERATION_FAILED",
            fail_msg="generation failed after 3 attempts: the model could not keep the "
            "subject consistent across frames",
            attempts=3,
            cost_usd=0.57,
            cost_time_ms=143_000,
            prompt="waves roll in over black sand, spray in the wind, golden hour",
        ),
        ItemResult(
            id="crowd-scene",
            row=7,
            status=ItemStatus.SKIPPED,
            task_id="task-0007",
            fail_code="CONTENT_VIOLATION",
            fail_msg="The prompt or image was flagged by the content policy (not resubmitted)",
            attempts=1,
            cost_usd=0.19,
            prompt='a crowd at a "protest" <b>scene</b> with flags & banners',
        ),
        ItemResult(
            id="too-short",
            row=8,
            status=ItemStatus.INVALID,
            field="image_url",
            fail_msg="image is 451x300",
            errors=["short side 300 px must be above 300 px"],
            prompt="this image is 300 px tall: refused before paying",
        ),
        ItemResult(
            id="lighthouse",
            row=9,
            status=ItemStatus.UNCERTAIN,
            fail_code="AMBIGUOUS_SUBMIT",
            fail_msg="the submit timed out after the request was sent; the provider may have "
            "accepted it",
            uncertain=True,
            attempts=1,
            cost_usd=0.19,
            note="held for a person (HAILUO_UNCERTAIN_POLICY=hold): check the provider's "
            "task list before resubmitting",
            prompt="a lighthouse beam sweeping over a stormy sea at night",
        ),
        ItemResult(
            id="forest-rain",
            row=10,
            status=ItemStatus.NOT_SUBMITTED,
            fail_code="COST_CAP",
            fail_msg="not submitted: the run's cost cap of $1.50 was reached",
            prompt="rain falling through a pine forest, drops on the lens " + "slowly " * 30,
        ),
    ]
    return results + problems


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("chromium not found: `make chromium` installs Debian's chromium")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img/review-page.png"))
    parser.add_argument("--keep", type=Path, help="build the demo output here and keep it")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    chromium = find_chromium()
    with tempfile.TemporaryDirectory(prefix="review-shot-") as tmp:
        work = Path(tmp)
        folder = args.keep or work / "output"
        if folder.exists():
            shutil.rmtree(folder)
        store = OutputStore(str(folder))
        outputs = publish_review(store, RUN_ID, demo_run(store, work))
        page = Path(store.url_for(outputs.page_key))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={work / 'profile'}",
                f"--window-size={args.width},{args.height}",
                "--virtual-time-budget=5000",
                f"--screenshot={args.out.resolve()}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
        )
    print(f"review page: {page}" if args.keep else f"built and removed a demo run in {tmp}")
    print(f"screenshot:  {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
