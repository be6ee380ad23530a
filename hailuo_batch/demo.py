"""`make demo`: a real batch end to end on embedded defaults.

Starts (or reuses) a local Prefect server on 127.0.0.1:4200 and the apixo emulator on loopback,
draws a few sample images, writes a manifest (with one image that breaks a rule, one content
violation and one transient failure), runs the generate-videos flow into ./demo-output/store,
and prints where the videos, the results and the Prefect UI are. The Prefect server is left
running so the UI link works; `make demo-stop` stops it.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hailuo_batch.orchestrator import server_env

DEMO_DIR = Path(os.environ.get("HAILUO_DEMO_DIR", "demo-output")).resolve()
PREFECT_PORT = int(os.environ.get("HAILUO_DEMO_PREFECT_PORT", "4200"))
PREFECT_URL = f"http://127.0.0.1:{PREFECT_PORT}"
PID_FILE = DEMO_DIR / "prefect-server.pid"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_prefect_server() -> None:
    """Start `prefect server start` detached, or reuse one already answering on the port."""
    if _healthy(PREFECT_URL):
        print(f"using the Prefect server already running at {PREFECT_URL}")
        return
    home = DEMO_DIR / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **server_env(os.environ),
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = (DEMO_DIR / "prefect-server.log").open("ab")
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(PREFECT_PORT)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    PID_FILE.write_text(str(proc.pid))
    print(f"starting a Prefect server at {PREFECT_URL} (log: {DEMO_DIR / 'prefect-server.log'})")
    deadline = time.monotonic() + 180
    while not _healthy(PREFECT_URL):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the Prefect server did not start; see {DEMO_DIR / 'prefect-server.log'}")
        time.sleep(1)


def stop_prefect_server() -> None:
    if not PID_FILE.exists():
        print("no demo Prefect server recorded")
        return
    pid = int(PID_FILE.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
        print(f"stopped the demo Prefect server (pid {pid})")
    except ProcessLookupError:
        print("the demo Prefect server was not running")
    PID_FILE.unlink()


def draw_image(path: Path, size: tuple[int, int], hue: int, label: str) -> None:
    """A colourful gradient with shapes and a label, so the generated pan is visible."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size)
    px = img.load()
    assert px is not None
    for y in range(h):
        for x in range(w):
            px[x, y] = ((x * 255 // w + hue) % 256, (y * 255 // h) % 256, (hue * 3) % 256)
    d = ImageDraw.Draw(img)
    for i in range(6):
        r = min(w, h) // (4 + i)
        cx, cy = (w * (i + 1)) // 7, (h * ((i * 3) % 5 + 1)) // 6
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 255), width=4)
    d.text((20, 20), label, fill=(255, 255, 255))
    img.save(path)


def write_samples(images_dir: Path, base_url: str) -> Path:
    images_dir.mkdir(parents=True, exist_ok=True)
    samples = [
        ("city-dusk", (1280, 720), 10, "slow parallax over the city at dusk", "", ".jpg"),
        ("tall-tower", (720, 1280), 90, "camera tilts up the tower", "10", ".png"),
        ("square-garden", (900, 900), 160, "a gentle dolly through the garden", "", ".jpg"),
        (
            "too-short",
            (451, 300),
            200,
            "this image is 300 px tall: refused before paying",
            "",
            ".jpg",
        ),
        (
            "flagged",
            (1024, 768),
            40,
            "a scene the provider refuses [fail:CONTENT_VIOLATION]",
            "",
            ".jpg",
        ),
        ("flaky", (1024, 640), 120, "waves roll in [flaky:GENERATION_FAILED]", "", ".jpg"),
    ]
    manifest = DEMO_DIR / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image_url", "prompt", "duration"])
        for item_id, size, hue, prompt, duration, ext in samples:
            name = f"{item_id}{ext}"
            draw_image(images_dir / name, size, hue, item_id)
            writer.writerow([item_id, f"{base_url}/files/{name}", prompt, duration])
    return manifest


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "stop":
        stop_prefect_server()
        return 0
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    start_prefect_server()
    os.environ.update(
        {
            "PREFECT_API_URL": f"{PREFECT_URL}/api",
            "APIXO_API_KEY": "demo-key",
            "HAILUO_ALLOW_PRIVATE_NETWORKS": "1",
            "HAILUO_POLL_INITIAL_S": "1",
            "HAILUO_POLL_INTERVAL_S": "0.5",
            "HAILUO_POLL_MAX_INTERVAL_S": "1",
            "HAILUO_POLL_TIMEOUT_S": "300",
        }
    )
    from hailuo_batch.emulator import EmulatorConfig, run_emulator

    images = DEMO_DIR / "images"
    config = EmulatorConfig(
        port=0, api_key="demo-key", time_scale=0.02, files_dir=str(images), seed=7, fps=24
    )
    with run_emulator(config) as emu:
        os.environ["APIXO_BASE_URL"] = emu.base_url
        print(f"apixo emulator at {emu.base_url} (time scale 0.02: a 120 s generation takes 2.4 s)")
        manifest = write_samples(images, emu.base_url)
        from flows.batch import run_generate_videos
        from hailuo_batch.settings import get_settings

        get_settings.cache_clear()
        store = DEMO_DIR / "store"
        if store.exists():  # a demo is a fresh batch each time (a real output would resume)
            shutil.rmtree(store)
        state = run_generate_videos(manifest=str(manifest), output=str(store), concurrency=4)
        stats = emu.stats()
    summary = state.result(raise_on_failure=False)
    run_id = state.state_details.flow_run_id
    print()
    print("=" * 72)
    print(f"run state:     {state.name} ({state.type.value}): {state.message or ''}")
    if isinstance(summary, dict):
        print(
            "items:         " + ", ".join(f"{k} {v}" for k, v in summary["by_status"].items() if v)
        )
        print(f"results file:  {summary.get('results')}")
        if summary.get("review_page"):
            print(f"review page:   file://{summary['review_page']}  (posters, videos, reasons)")
    videos = sorted((store / "videos").glob("*.mp4"))
    print(f"videos ({len(videos)}) in {store / 'videos'}:")
    for v in videos:
        print(f"   {v.name}  {v.stat().st_size:,} bytes")
    print(
        f"emulator: {stats['submissions']} submissions, {stats['status_reads_total']} status reads"
    )
    print(
        f"Prefect UI:    {PREFECT_URL}/runs/flow-run/{run_id}  (artifacts tab: table and summary)"
    )
    if isinstance(summary, dict):
        from hailuo_batch.artifacts import report_keys

        summary_key = report_keys(None, str(summary.get("manifest", "")))[1]
        print(f"summary:       {PREFECT_URL}/artifacts/key/{summary_key}  (one key, every run)")
    print(f"all artifacts: {PREFECT_URL}/artifacts")
    print("the Prefect server keeps running for the UI; stop it with `make demo-stop`")
    print("=" * 72)
    return 0 if state.is_completed() and videos else 1


if __name__ == "__main__":
    sys.exit(main())
