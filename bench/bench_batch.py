"""Benchmark of the batch flow against the local apixo emulator.

    .venv/bin/python bench/bench_batch.py --items 1000 [--concurrency 50] [--time-scale 0.01]
                                          [--fps 2] [--json]

Runs N items (one shared input image, unique prompts) through `flows.batch.generate_videos` with
a concurrency limit, against the emulator in a separate process whose own limit is generous, so
the limit under test is the flow's. The emulator encodes the one video once (fps kept small) and
serves it from its cache, so the figures measure the pipeline, not the emulator.

Prints the makespan against the ideal (total generation time divided by the concurrency limit),
status reads and submissions per item, CPU seconds per item and the peak RSS of the flow process,
and the item statuses; exits 1 unless every item succeeded.

Prefect's in-memory (ephemeral) event broker drops messages past 10,000 queued, so a `prefect
server` is started on a free loopback port with a temporary PREFECT_HOME (and stopped after)
unless PREFECT_API_URL is already set.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import flows/ and hailuo_batch/
    sys.path.insert(0, str(ROOT))

from hailuo_batch.emulator.config import EmulatorConfig  # noqa: E402

API_KEY = "bench-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user+system, own and reaped children) of every live process in a group."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # the process ended meanwhile
        # fields[0] is the state (field 3 of proc(5)); pgrp is field 5, utime..cstime 14..17
        if int(fields[2]) == pgid:
            total += sum(int(f) for f in fields[11:15])
    return total / CLK_TCK


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started (its own session), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait_for(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{url} did not answer; see {log}")
        time.sleep(0.5)


@contextmanager
def prefect_server(workdir: Path) -> Iterator[subprocess.Popen[bytes] | None]:
    """A started `prefect server` on loopback (PREFECT_API_URL set for this process), or None
    when PREFECT_API_URL already points at one."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    port = free_port()
    home = workdir / "prefect-home"
    home.mkdir()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    log = workdir / "prefect-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("prefect")),
                *("server", "start", "--host", "127.0.0.1", "--port", str(port)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(f"{url}/api/health", proc, log, timeout_s=180)
        os.environ["PREFECT_API_URL"] = f"{url}/api"
        os.environ["PREFECT_HOME"] = str(home)
        yield proc
    finally:
        stop_group(proc)


@contextmanager
def emulator(
    workdir: Path, files: Path, args: argparse.Namespace
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`hailuo-batch emulator` in its own process on a free port; yields (base URL, process)."""
    log = workdir / "emulator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("hailuo-batch")),
                "emulator",
                *("--port", "0", "--api-key", API_KEY, "--seed", "1"),
                *("--time-scale", str(args.time_scale), "--fps", str(args.fps)),
                *("--concurrency", str(args.emulator_concurrency), "--files-dir", str(files)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"serving at (http://\S+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the emulator did not start; see {log}")
            time.sleep(0.1)
        base = m.group(1)
        _wait_for(f"{base}/_emulator/stats", proc, log, timeout_s=30)
        yield base, proc
    finally:
        stop_group(proc)


def write_inputs(files: Path, manifest: Path, base_url: str, items: int) -> None:
    """One shared 640x360 JPEG and an N-row manifest with unique prompts."""
    from PIL import Image, ImageDraw

    files.mkdir(exist_ok=True)
    img = Image.new("RGB", (640, 360), (30, 60, 90))
    draw = ImageDraw.Draw(img)
    for i in range(8):
        draw.ellipse((40 + 60 * i, 60, 140 + 60 * i, 300), outline=(255, 200, 40 * i), width=5)
    img.save(files / "bench.jpg", quality=85)
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image_url", "prompt"])
        for i in range(items):
            writer.writerow([f"bench-{i:05d}", f"{base_url}/files/bench.jpg", f"bench shot {i}"])


def poll_env(time_scale: float) -> dict[str, str]:
    """Poll settings on the emulator's clock: first read about when a task is done."""
    emu = EmulatorConfig()
    return {
        "HAILUO_POLL_INITIAL_S": f"{(emu.queue_s + emu.processing_s) * time_scale:.4f}",
        "HAILUO_POLL_INTERVAL_S": f"{max(0.05, 10 * time_scale):.4f}",
        "HAILUO_POLL_BACKOFF": "1.5",
        "HAILUO_POLL_MAX_INTERVAL_S": f"{max(0.1, 30 * time_scale):.4f}",
        "HAILUO_POLL_TIMEOUT_S": f"{max(300.0, 600 * time_scale):.1f}",
    }


def drain_prefect_workers() -> None:
    """Send the logs and events still queued before the server is stopped."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)


def first_create_time(base: str, results: list[dict[str, Any]]) -> float | None:
    """Wall time (epoch s) of the run's first task creation, from the emulator's createTime."""
    ids = [r["task_id"] for r in results if r.get("task_id")]
    times = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        for task_id in ids:
            answer = c.get("/api/v1/statusTask/hailuo-2-3-fast", params={"taskId": task_id})
            times.append(answer.json()["data"]["createTime"] / 1000)
    return min(times, default=None)


def read_results(url: str) -> list[dict[str, Any]]:
    import fsspec

    with fsspec.open(url, "r") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hailuo-bench-") as tmp:
        workdir = Path(tmp)
        files, manifest = workdir / "files", workdir / "manifest.csv"
        files.mkdir()
        with prefect_server(workdir) as server, emulator(workdir, files, args) as (base, emu):
            write_inputs(files, manifest, base, args.items)
            os.environ.update(
                {
                    "APIXO_BASE_URL": base,
                    "APIXO_API_KEY": API_KEY,
                    "HAILUO_ALLOW_PRIVATE_NETWORKS": "1",
                    # every log still goes to the Prefect API; only the console is quiet
                    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "ERROR",
                    **poll_env(args.time_scale),
                }
            )
            from flows.batch import run_generate_videos
            from hailuo_batch.settings import get_settings

            get_settings.cache_clear()
            groups = {"emulator": emu.pid}
            if server is not None:
                groups["prefect_server"] = server.pid
            cpu_before = {k: group_cpu_s(pid) for k, pid in groups.items()}
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            wall0, t0 = time.time(), time.monotonic()
            state = run_generate_videos(
                manifest=str(manifest),
                output=str(workdir / "store"),
                concurrency=args.concurrency,
            )
            makespan = time.monotonic() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu_others = {k: group_cpu_s(pid) - cpu_before[k] for k, pid in groups.items()}
            drain_prefect_workers()
            stats = httpx.get(f"{base}/_emulator/stats", timeout=30).json()
            summary = state.result(raise_on_failure=False)
            results = read_results(summary["results"]) if isinstance(summary, dict) else []
            first_submit = first_create_time(base, results)

    n = args.items
    statuses = Counter(r["status"] for r in results)
    generation_s = sum(r.get("cost_time_ms") or 0 for r in results) / 1000 * args.time_scale
    ideal = generation_s / args.concurrency
    to_first = first_submit - wall0 if first_submit is not None else None
    cpu_s = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {
        "items": n,
        "concurrency": args.concurrency,
        "time_scale": args.time_scale,
        "flow_state": state.type.value,
        "makespan_s": round(makespan, 2),
        "flow_wall_time_s": summary.get("wall_time_s") if isinstance(summary, dict) else None,
        "ideal_makespan_s": round(ideal, 2),
        "makespan_over_ideal": round(makespan / ideal, 2) if ideal else None,
        "time_to_first_submit_s": round(to_first, 2) if to_first is not None else None,
        "items_phase_s": round(makespan - to_first, 2) if to_first is not None else None,
        "status_reads_per_item": round(stats["status_reads_total"] / n, 2),
        "submissions_per_item": round(stats["submissions"] / n, 3),
        "emulator_peak_in_flight": stats["peak_in_flight"],
        "rejected_429": stats["rejected_429"],
        "cpu_s_per_item": round(cpu_s / n, 4),
        "cpu_s_flow_process": round(cpu_s, 1),
        "cpu_s_emulator": round(cpu_others["emulator"], 1),
        "cpu_s_prefect_server": (
            round(cpu_others["prefect_server"], 1) if "prefect_server" in cpu_others else None
        ),
        "peak_rss_mb": round(r1.ru_maxrss / 1024, 1),
        "statuses": dict(statuses),
    }


def ok(fig: dict[str, Any]) -> bool:
    return fig["flow_state"] == "COMPLETED" and fig["statuses"] == {"succeeded": fig["items"]}


def print_table(fig: dict[str, Any]) -> None:
    rows = [
        ("items", fig["items"]),
        ("concurrency", fig["concurrency"]),
        ("time scale", fig["time_scale"]),
        ("makespan", f"{fig['makespan_s']:.2f} s"),
        ("ideal makespan", f"{fig['ideal_makespan_s']:.2f} s (generation time / concurrency)"),
        ("makespan / ideal", fig["makespan_over_ideal"]),
        ("time to first submit", f"{fig['time_to_first_submit_s']} s (manifest, checks, start)"),
        ("items phase", f"{fig['items_phase_s']} s (first submit to end)"),
        ("status reads / item", fig["status_reads_per_item"]),
        ("submissions / item", fig["submissions_per_item"]),
        ("CPU s / item (flow)", f"{fig['cpu_s_per_item']:.4f}"),
        ("CPU s flow process", fig["cpu_s_flow_process"]),
        ("CPU s emulator", fig["cpu_s_emulator"]),
        ("CPU s prefect server", fig["cpu_s_prefect_server"] or "n/a (PREFECT_API_URL given)"),
        ("peak RSS (flow)", f"{fig['peak_rss_mb']:.1f} MB"),
        ("emulator peak in flight", fig["emulator_peak_in_flight"]),
        ("statuses", ", ".join(f"{k} {v}" for k, v in sorted(fig["statuses"].items()))),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, required=True, help="number of manifest rows")
    p.add_argument("--concurrency", type=int, default=50, help="the flow's limit (default 50)")
    p.add_argument(
        "--time-scale", type=float, default=0.01, help="emulator clock (0.01: 120 s -> 1.2 s)"
    )
    p.add_argument("--fps", type=int, default=2, help="frame rate of emulated videos (default 2)")
    p.add_argument(
        "--emulator-concurrency",
        type=int,
        default=None,
        help="the emulator's per-key limit (default: twice --concurrency)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.items < 1 or args.concurrency < 1:
        p.error("--items and --concurrency must be at least 1")
    args.emulator_concurrency = args.emulator_concurrency or 2 * args.concurrency
    fig = run(args)
    if args.json:
        print(json.dumps(fig, indent=2))
    else:
        print_table(fig)
    if not ok(fig):
        print("FAILED: not every item succeeded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
