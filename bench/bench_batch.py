"""Throughput benchmark: the flow, the plain script a user would write instead, and callback mode.

    .venv/bin/python bench/bench_batch.py --items 1000 [10000] [--quick]
        [--modes script,flow,callback] [--provider-limit 25] [--concurrency 100]
        [--median-s 120] [--sigma 0.4] [--time-scale 0.05] [--seed 1] [--fps 2] [--profile] [--json]

Each mode runs N items (one shared input image, unique prompts) against a fresh apixo emulator in
its own process, whose generation times are lognormal (median `--median-s`, log-sd `--sigma`,
plus its 5 s queue) and which answers 429 past `--provider-limit` tasks in flight. Nobody is
told that limit: every subject gets `--concurrency` (default 100, an upper bound a user who does
not know the limit would give) and otherwise default settings.

- `script`: `bench/plain_script.py` (asyncio + httpx, a semaphore of `--concurrency`, the
  provider's fixed 60 s / 15 s poll, Retry-After on 429, download to a local folder).
- `flow`: `hailuo-batch run MANIFEST --output DIR --concurrency C` in a subprocess, against a
  `prefect server` started for this mode (temporary PREFECT_HOME, its own session).
- `callback`: the same with `--request-type callback` and `hailuo-batch receiver` in a
  subprocess (deliveries recorded in a local folder).

The time scale. The emulator multiplies every provider-side duration by `--time-scale` (0.05:
a 120 s generation takes 6 s). Every party's schedule on that clock is multiplied by the same
factor and nothing else is tuned: the script's 60/15/10 s constants (TIME_SCALE), and for the
flow every `HAILUO_*_S` setting's *default* (poll schedule, poll timeout, not-found grace,
retry backoff, callback check and backstop, item table interval, and any duration setting added
later), except client-side transport timeouts and the run lease (`SCALE_EXCLUDED`). Counts per
item (reads, checks, table versions) are then what they would be at real speed; CPU seconds per
item too, as long as no process is CPU-bound (see the `cpu busy` column).

Measured per mode (see `COLUMNS`): makespan against the ideal (sum of the tasks' generation
times, create to end on the emulator's clock, divided by the provider limit), time to the first
submission (from the subject's launch), status reads and 429 rejections per item, notice lag
(mean and p95 over items of: the first status read or callback delivery that reported the
task ended, minus its end, divided by its generation time; from the emulator's record of
timings), CPU seconds per item of each process (from /proc, a process group each; the subject
by wait4), and the subject's peak RSS. The Prefect server's CPU includes its catch-up after the
flow ends (until it is idle, at most 60 s), and the task runs it holds are counted through its
API afterwards.

Prints a markdown table and writes everything as JSON to bench/results/. Exits 1 unless every
item of every mode stored its video.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import hailuo_batch/
    sys.path.insert(0, str(ROOT))

from hailuo_batch.orchestrator import server_env  # noqa: E402

API_KEY = "bench-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BIN = Path(sys.executable).parent
MODES = ("script", "flow", "callback")

#: `*_s` settings left at their defaults: the client's own transport timeouts (the emulator does
#: not scale the matching ones either), and the run lease, whose renewal must not be made to
#: race a busy CPU.
SCALE_EXCLUDED = frozenset(
    {
        "connect_timeout_s",
        "read_timeout_s",
        "fetch_timeout_s",
        "lease_ttl_s",
        "presign_expiry_s",
        "store_retry_delay_s",
    }
)


# --- processes ------------------------------------------------------------------------------


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


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started (its own session), SIGKILL if it lingers."""
    if proc.returncode is not None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def spawn(
    cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{url} did not answer; see {log}")
        time.sleep(0.3)


def base_env() -> dict[str, str]:
    """The environment of every subprocess: ours without HAILUO_*/APIXO_*/PREFECT_* variables."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("HAILUO_", "APIXO_", "PREFECT_"))
    }


def export_ref(ref: str, into: Path) -> Path:
    """The project's files at git `ref` (`git archive`), for a measurement of one commit while
    the working tree changes; the subjects import from there (PYTHONPATH)."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "hailuo_batch", "flows", "blocks"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


@contextmanager
def prefect_server(
    workdir: Path, extra: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """A started `prefect server` on loopback with a temporary PREFECT_HOME (and the `extra`
    variables, `--server-env`); yields the process and the PREFECT_* variables a client needs."""
    port = free_port()
    home = workdir / "prefect-home"
    home.mkdir()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    log = workdir / "prefect-server.log"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn(cmd, log, {**base_env(), **env, **(extra or {})})
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", proc, log, timeout_s=180)
        yield proc, {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    finally:
        stop_group(proc)


@contextmanager
def emulator(
    workdir: Path, args: argparse.Namespace
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The emulator (bench/run_emulator.py) on a free port; yields (base URL, process)."""
    config = {
        "port": 0,
        "api_key": API_KEY,
        "seed": args.seed,
        "time_scale": args.time_scale,
        "fps": args.fps,
        "concurrency": args.provider_limit,
        "files_dir": str(workdir / "files"),
        "processing_distribution": "lognormal",
        "processing_s": args.median_s,
        "processing_sigma": args.sigma,
        "timings_file": str(workdir / "timings.json"),
        "balance_usd": 1_000_000.0,
    }
    log = workdir / "emulator.log"
    cmd = [sys.executable, str(BENCH / "run_emulator.py"), json.dumps(config)]
    proc = spawn(cmd, log, base_env())
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(r"serving at (http://\S+)", log.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the emulator did not start; see {log}")
            time.sleep(0.1)
        base = m.group(1)
        wait_http(f"{base}/_emulator/stats", proc, log, timeout_s=30)
        yield base, proc
    finally:
        stop_group(proc)


@contextmanager
def receiver(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str]]]:
    """`hailuo-batch receiver` on a free port; yields it and the HAILUO_CALLBACK_* variables."""
    port = free_port()
    env = {
        "HAILUO_CALLBACK_TOKEN": secrets.token_urlsafe(24),
        "HAILUO_CALLBACK_STORE": str(workdir / "callbacks"),
        "HAILUO_CALLBACK_URL": f"http://127.0.0.1:{port}",
    }
    log = workdir / "receiver.log"
    cmd = [str(BIN / "hailuo-batch"), "receiver", "--port", str(port)]
    proc = spawn(cmd, log, {**base_env(), **env})
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, log, timeout_s=60)
        yield proc, env
    finally:
        stop_group(proc)


@dataclass
class Exited:
    wall_s: float
    returncode: int
    cpu_s: float
    maxrss_mb: float


def wait_rusage(proc: subprocess.Popen[bytes], t0: float, timeout_s: float) -> Exited:
    """Reap the subject with wait4: its exit status, CPU (own and reaped children) and peak RSS."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            wall = time.monotonic() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Exited(
                wall_s=wall,
                returncode=proc.returncode,
                cpu_s=usage.ru_utime + usage.ru_stime,
                maxrss_mb=usage.ru_maxrss / 1024,
            )
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            sys.exit(f"the subject ran past {timeout_s:.0f} s and was killed")
        time.sleep(0.05)


def settle(pgid: int, quiet_cpu_s: float = 0.05, max_s: float = 60.0) -> float:
    """Wait until a process group is idle (under `quiet_cpu_s` CPU in each of two straight
    seconds, at most `max_s`); return how long that took."""
    t0 = time.monotonic()
    last, quiet = group_cpu_s(pgid), 0
    while quiet < 2 and time.monotonic() - t0 < max_s:
        time.sleep(1.0)
        now = group_cpu_s(pgid)
        quiet = quiet + 1 if now - last < quiet_cpu_s else 0
        last = now
    return time.monotonic() - t0


# --- inputs and settings ----------------------------------------------------------------------


def write_inputs(workdir: Path, base_url: str, items: int) -> Path:
    """One shared 640x360 JPEG and an N-row manifest with unique prompts."""
    from PIL import Image, ImageDraw

    files = workdir / "files"
    files.mkdir(exist_ok=True)
    img = Image.new("RGB", (640, 360), (30, 60, 90))
    draw = ImageDraw.Draw(img)
    for i in range(8):
        draw.ellipse((40 + 60 * i, 60, 140 + 60 * i, 300), outline=(255, 200, 40 * i), width=5)
    img.save(files / "bench.jpg", quality=85)
    manifest = workdir / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image_url", "prompt"])
        for i in range(items):
            writer.writerow([f"bench-{i:05d}", f"{base_url}/files/bench.jpg", f"bench shot {i}"])
    return manifest


def duration_defaults() -> dict[str, float]:
    """Each `*_s` setting's default, by variable name (run with the measured source's path)."""
    from hailuo_batch.settings import ENV_PREFIX, Settings

    return {
        ENV_PREFIX + name.upper(): float(info.default)
        for name, info in sorted(Settings.model_fields.items())
        if name.endswith("_s")
        and name not in SCALE_EXCLUDED
        and isinstance(info.default, int | float)
        and not isinstance(info.default, bool)
    }


def scaled_settings(time_scale: float, source: Path | None) -> dict[str, str]:
    """Every HAILUO_*_S duration setting at its default x time_scale (see SCALE_EXCLUDED), read
    from the settings of the source measured."""
    if source is None:
        defaults = duration_defaults()
    else:
        code = "import json, bench_batch; print(json.dumps(bench_batch.duration_defaults()))"
        defaults = json.loads(
            subprocess.run(
                [sys.executable, "-c", code],
                env={**base_env(), "PYTHONPATH": f"{source}{os.pathsep}{BENCH}"},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    return {name: f"{default * time_scale:.6g}" for name, default in defaults.items()}


# --- one mode -------------------------------------------------------------------------------


@dataclass
class Subject:
    cmd: list[str]
    env: dict[str, str]
    groups: dict[str, int] = field(default_factory=dict)  # other processes measured: name -> pgid
    prefect_api: str | None = None


def run_mode(mode: str, items: int, args: argparse.Namespace, workroot: Path) -> dict[str, Any]:
    workdir = workroot / f"{mode}-{items}"
    workdir.mkdir()
    out = workdir / "out"
    with ExitStack() as stack:
        base, emu = stack.enter_context(emulator(workdir, args))
        manifest = write_inputs(workdir, base, items)
        env = {**base_env(), "APIXO_BASE_URL": base, "APIXO_API_KEY": API_KEY}
        if args.source is not None:
            env["PYTHONPATH"] = str(args.source)
        groups = {"emulator": emu.pid}
        api = None
        if mode == "script":
            env["TIME_SCALE"] = str(args.time_scale)
            cmd = [sys.executable, str(BENCH / "plain_script.py"), str(manifest), str(out)]
            cmd += ["--concurrency", str(args.concurrency)]
        else:
            server, prefect_env = stack.enter_context(prefect_server(workdir, args.server_settings))
            groups["prefect_server"] = server.pid
            api = prefect_env["PREFECT_API_URL"]
            env.update(prefect_env)
            env.update(scaled_settings(args.time_scale, args.source))
            env.update(kv.split("=", 1) for kv in args.flow_env)
            env["HAILUO_ALLOW_PRIVATE_NETWORKS"] = "1"  # the emulator serves the image on loopback
            cmd = [str(BIN / "hailuo-batch"), "run", str(manifest), "--output", str(out)]
            cmd += ["--concurrency", str(args.concurrency)]
            if mode == "callback":
                recv, callback_env = stack.enter_context(receiver(workdir))
                groups["receiver"] = recv.pid
                env.update(callback_env)
                cmd += ["--request-type", "callback"]
            if args.profile:
                prof = workdir / "flow.prof"
                cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), *cmd]
        subject = Subject(cmd, env, groups, api)
        fig = measure(mode, items, subject, workdir, base, args)
        if args.profile and mode != "script":
            fig["profile"] = profile_summary(workdir / "flow.prof", args.results_dir, mode, items)
        if args.py_spy and mode != "script":
            fig["py_spy"] = py_spy_summary(workdir / "flow.pyspy", args.results_dir, mode, items)
        fig["workdir"] = str(workdir)
    return fig


def measure(
    mode: str, items: int, subject: Subject, workdir: Path, base: str, args: argparse.Namespace
) -> dict[str, Any]:
    log = workdir / f"{mode}.log"
    cpu0 = {k: group_cpu_s(pid) for k, pid in subject.groups.items()}
    busy0, total0 = machine_jiffies()
    wall0, t0 = time.time(), time.monotonic()
    proc = spawn(subject.cmd, log, subject.env, cwd=workdir)
    spy = None
    if args.py_spy and mode != "script":
        raw = workdir / "flow.pyspy"
        spy_cmd = [args.py_spy, "record", "--pid", str(proc.pid), "--rate", "50"]
        spy_cmd += ["--format", "raw", "--output", str(raw), "--nonblocking"]
        spy = spawn(spy_cmd, workdir / "py-spy.log", base_env())
    expected_s = items * args.time_scale * (args.median_s + 5) * 1.2 / args.provider_limit
    exited = wait_rusage(proc, t0, timeout_s=max(600.0, 20 * expected_s))
    cpu = {k: group_cpu_s(pid) - cpu0[k] for k, pid in subject.groups.items()}
    busy1, total1 = machine_jiffies()
    machine_busy = (busy1 - busy0) / max(1, total1 - total0)
    if spy is not None:
        spy.wait(timeout=120)
    catch_up_s = None
    if "prefect_server" in subject.groups:
        catch_up_s = settle(subject.groups["prefect_server"])
        cpu["prefect_server"] = (
            group_cpu_s(subject.groups["prefect_server"]) - cpu0["prefect_server"]
        )
    with httpx.Client(base_url=base, timeout=120) as c:
        timings = c.get("/_emulator/timings").json()
        stats = c.get("/_emulator/stats").json()
    task_runs = count_task_runs(subject.prefect_api) if subject.prefect_api else None
    stored = sum(1 for _ in (workdir / "out").rglob("*.mp4")) if (workdir / "out").exists() else 0
    return figures(mode, items, args, wall0, exited, cpu, catch_up_s, timings, stats, stored) | {
        "prefect_task_runs": task_runs,
        # the whole machine's CPU use over the makespan: above `cpu_busy`, others were running
        "machine_busy": round(machine_busy, 3),
        "log_tail": log.read_text(errors="replace")[-1500:] if exited.returncode else "",
    }


def count_task_runs(api: str) -> dict[str, Any]:
    """Task runs the Prefect server holds after the run, by state type; and whether the run
    graph of every flow run loads (the UI refuses graphs past 10,000 nodes)."""
    counts: dict[str, Any] = {}
    with httpx.Client(base_url=api, timeout=60) as c:
        counts["total"] = int(c.post("/task_runs/count", json={}).json())
        for state in ("COMPLETED", "FAILED", "RUNNING", "PENDING", "SCHEDULED", "CRASHED"):
            body = {"task_runs": {"state": {"type": {"any_": [state]}}}}
            counts[state.lower()] = int(c.post("/task_runs/count", json=body).json())
        runs = c.post("/flow_runs/filter", json={"limit": 200}).json()
        graphs = [c.get(f"/flow_runs/{r['id']}/graph-v2") for r in runs]
        counts["flow_runs"] = len(runs)
        counts["graphs_loaded"] = sum(1 for g in graphs if g.status_code == 200)
        counts["largest_graph_nodes"] = max(
            (len(g.json().get("nodes", [])) for g in graphs if g.status_code == 200), default=0
        )
    return counts


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def figures(
    mode: str,
    items: int,
    args: argparse.Namespace,
    wall0: float,
    exited: Exited,
    cpu: dict[str, float],
    catch_up_s: float | None,
    timings: dict[str, Any],
    stats: dict[str, Any],
    stored: int,
) -> dict[str, Any]:
    tasks = timings["tasks"]
    ended = [t for t in tasks if t["ended"] is not None]
    generation = sum(t["generation_s"] for t in ended)
    ideal = generation / args.provider_limit
    lags = [t["notice_lag_s"] / t["generation_s"] for t in ended if t["notice_lag_s"] is not None]
    # the first status read that reported the end (in callback mode: the flow's confirming read)
    read_lags = [
        (t["read_end"] - t["ended"]) / t["generation_s"]
        for t in ended
        if t.get("read_end") is not None
    ]
    first_created = min((t["created"] for t in tasks), default=None)
    last_event = max((t["downloaded"] or t["reported"] or t["ended"] for t in ended), default=None)
    cpu_all = exited.cpu_s + sum(cpu.values())
    return {
        "mode": mode,
        "items": items,
        "returncode": exited.returncode,
        "stored": stored,
        "tasks_created": len(tasks),
        "tasks_ended": len(ended),
        "makespan_s": round(exited.wall_s, 2),
        "ideal_s": round(ideal, 2),
        "makespan_over_ideal": round(exited.wall_s / ideal, 3) if ideal else None,
        "first_submit_s": round(first_created - wall0, 2) if first_created else None,
        "items_phase_s": round(last_event - first_created, 2) if last_event else None,
        "reads_per_item": round(stats["status_reads_total"] / items, 2),
        "rejections_per_item": round(stats["rejected_429"] / items, 3),
        "peak_in_flight": stats["peak_in_flight"],
        "lag_mean": round(statistics.fmean(lags), 4) if lags else None,
        "lag_p95": round(q, 4) if (q := quantile(lags, 0.95)) is not None else None,
        "lag_max": round(max(lags), 4) if lags else None,
        "unreported": len(ended) - len(lags),
        "read_lag_mean": round(statistics.fmean(read_lags), 4) if read_lags else None,
        "read_lag_p95": round(q, 4) if (q := quantile(read_lags, 0.95)) is not None else None,
        "reported_via": {
            via: sum(1 for t in ended if t["reported_via"] == via) for via in ("status", "callback")
        },
        "generation_median_s": round(statistics.median(t["generation_s"] for t in ended), 3)
        if ended
        else None,
        "cpu_s": {"subject": round(exited.cpu_s, 2), **{k: round(v, 2) for k, v in cpu.items()}},
        "cpu_s_per_item": {
            "subject": round(exited.cpu_s / items, 4),
            **{k: round(v / items, 4) for k, v in cpu.items()},
        },
        # share of the two cores the measured processes used over the makespan
        "cpu_busy": round(cpu_all / exited.wall_s / (os.cpu_count() or 1), 3),
        "prefect_catch_up_s": round(catch_up_s, 1) if catch_up_s is not None else None,
        "peak_rss_mb": round(exited.maxrss_mb, 1),
    }


def profile_summary(prof: Path, results_dir: Path, mode: str, items: int) -> list[str]:
    """The top of a cProfile of the flow process, by cumulative time, kept next to the results."""
    import io
    import pstats

    if not prof.exists():
        return ["no profile written"]
    results_dir.mkdir(parents=True, exist_ok=True)
    kept = results_dir / f"profile-{mode}-{items}.prof"
    shutil.copy(prof, kept)
    buf = io.StringIO()
    pstats.Stats(str(prof), stream=buf).sort_stats("tottime").print_stats(25)
    return buf.getvalue().splitlines()


#: where the flow process's time goes: (label, substring of a frame "function (file:line)")
SPY_GROUPS = [
    ("prefect task engine", "prefect/task_engine.py"),
    ("prefect flow engine", "prefect/flow_engine.py"),
    ("prefect events", "prefect/events/"),
    ("prefect logging", "prefect/logging/"),
    ("prefect client (API calls)", "prefect/client/"),
    ("prefect parameter walk (visit_collection)", "visit_collection"),
    ("pydantic", "pydantic"),
    ("httpx/httpcore", "httpcore/"),
    ("asyncio event loop", "asyncio/base_events.py"),
    ("hailuo_batch", "hailuo_batch/"),
    ("flows/", " (flows/"),
    ("ledger", "hailuo_batch/ledger.py"),
    ("storage", "hailuo_batch/storage.py"),
    ("image checks", "hailuo_batch/images.py"),
    ("artifacts", "hailuo_batch/artifacts.py"),
]


#: leaf frames of a thread waiting (py-spy counts some waits as active): left out of the shares
SPY_WAITS = (
    "Condition.wait (",
    "EpollSelector.select (",
    "Event.wait (",
    "_wait_for_tstate_lock (",
)


def py_spy_summary(raw: Path, results_dir: Path, mode: str, items: int) -> dict[str, Any]:
    """Shares of py-spy samples (all threads, waits excluded) under each of SPY_GROUPS, and the
    functions with the most samples on top of the stack; the raw stacks kept in results_dir."""
    if not raw.exists():
        return {"error": "no py-spy output"}
    results_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(raw, results_dir / f"pyspy-{mode}-{items}.txt")
    total = waiting = 0
    inclusive = dict.fromkeys((label for label, _ in SPY_GROUPS), 0)
    leaves: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        leaf = stack.rsplit(";", 1)[-1]
        if leaf.startswith(SPY_WAITS):
            waiting += count
            continue
        total += count
        for label, needle in SPY_GROUPS:
            if needle in stack:
                inclusive[label] += count
        leaves[leaf] = leaves.get(leaf, 0) + count
    if not total:
        return {"error": "no samples"}
    top = sorted(leaves.items(), key=lambda kv: -kv[1])[:20]
    return {
        "samples": total,
        "waiting_samples_left_out": waiting,
        "inclusive_share": {k: round(v / total, 3) for k, v in inclusive.items()},
        "top_self": [[name, round(n / total, 3)] for name, n in top],
    }


# --- output ---------------------------------------------------------------------------------

COLUMNS = [
    ("mode", "what ran"),
    ("items", "manifest rows"),
    ("stored", "videos stored"),
    ("makespan / ideal", "subject wall time (launch to exit) / ideal"),
    ("makespan", "seconds"),
    ("ideal", "sum of generation times (create to end) / provider limit, seconds"),
    ("1st submit", "launch to the first task created, seconds"),
    ("reads/item", "status reads per item"),
    ("429/item", "429 rejections per item"),
    ("lag mean", "notice lag / generation time, mean over items"),
    ("lag p95", "notice lag / generation time, 95th percentile"),
    ("read lag p95", "the same for the first status read that reported the end"),
    ("CPU/item subject", "CPU s per item: flow or script process (and its children)"),
    ("CPU/item server", "CPU s per item: Prefect server, catch-up included"),
    ("CPU/item emulator", "CPU s per item: emulator"),
    ("CPU/item receiver", "CPU s per item: callback receiver"),
    ("cpu busy", "all those processes' CPU / (makespan x cores)"),
    ("machine busy", "the whole machine's CPU use over the makespan (more: others ran too)"),
    ("peak RSS", "subject's peak resident memory, MB"),
    (
        "task runs kept",
        "task runs the Prefect server holds after the run / of them COMPLETED / left RUNNING or "
        "PENDING; graphs: flow runs whose run graph loads / flow runs",
    ),
]


def row(fig: dict[str, Any]) -> list[str]:
    per = fig["cpu_s_per_item"]

    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    return [
        fig["mode"],
        f"{fig['items']:,}",
        f"{fig['stored']:,}",
        f"**{num(fig['makespan_over_ideal'], '.2f')}x**",
        num(fig["makespan_s"], ".1f"),
        num(fig["ideal_s"], ".1f"),
        num(fig["first_submit_s"], ".1f"),
        num(fig["reads_per_item"], ".2f"),
        num(fig["rejections_per_item"], ".2f"),
        f"{num(fig['lag_mean'], '.0%')}"
        + (f" ({fig['unreported']} unrep.)" if fig["unreported"] else ""),
        num(fig["lag_p95"], ".0%"),
        num(fig.get("read_lag_p95"), ".0%"),
        num(per.get("subject"), ".4f"),
        num(per.get("prefect_server"), ".4f"),
        num(per.get("emulator"), ".4f"),
        num(per.get("receiver"), ".4f"),
        num(fig["cpu_busy"], ".0%"),
        num(fig.get("machine_busy"), ".0%"),
        num(fig["peak_rss_mb"], ".0f"),
        _kept(fig.get("prefect_task_runs")),
    ]


def _kept(t: dict[str, Any] | None) -> str:
    if not t:
        return "n/a"
    stuck = t.get("running", 0) + t.get("pending", 0)
    graphs = f"; graphs {t['graphs_loaded']}/{t['flow_runs']}" if "flow_runs" in t else ""
    return f"{t['total']:,} / {t.get('completed', 0):,} / {stuck}{graphs}"


def markdown(figs: list[dict[str, Any]]) -> str:
    head = [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row(f)) + " |" for f in figs]
    return "\n".join(lines)


def machine(ref: str | None) -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    try:
        import prefect

        prefect_version = prefect.__version__
    except ImportError:
        prefect_version = None
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", ref or "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "flows", "hailuo_batch"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if ref:
        dirty = ""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "python": platform.python_version(),
        "prefect": prefect_version,
        "commit": commit + ("+uncommitted changes in flows/ or hailuo_batch/" if dirty else ""),
        "load_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[1000], help="sizes (default 1000)")
    p.add_argument("--quick", action="store_true", help="development: 100 items, time scale 0.02")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of script,flow,callback")
    p.add_argument("--provider-limit", type=int, default=25, help="emulator's 429 limit (25)")
    p.add_argument("--concurrency", type=int, default=100, help="every subject's bound (100)")
    p.add_argument("--median-s", type=float, default=120.0, help="median generation s (120)")
    p.add_argument("--sigma", type=float, default=0.4, help="lognormal log-sd (0.4)")
    p.add_argument("--time-scale", type=float, default=0.05, help="provider clock (0.05)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fps", type=int, default=2, help="frame rate of the emulated videos (2)")
    p.add_argument("--profile", action="store_true", help="cProfile the flow process")
    p.add_argument(
        "--py-spy",
        metavar="PATH",
        help="py-spy executable: sample the flow process (50 Hz, non-blocking) and summarise",
    )
    p.add_argument(
        "--ref",
        help="measure the flow and CLI of this git commit (default: the working tree as it is)",
    )
    p.add_argument("--results-dir", type=Path, default=BENCH / "results")
    p.add_argument("--keep", action="store_true", help="keep the work folders (logs, outputs)")
    p.add_argument(
        "--flow-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the flow modes, e.g. HAILUO_MAX_RECORD_LAG=100000000 (repeatable)",
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for the Prefect server on top of hailuo_batch.orchestrator's "
        "(repeatable), e.g. PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE=1",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.time_scale = [100], 0.02
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes takes a comma list of {', '.join(MODES)}")
    if min(args.items) < 1 or args.concurrency < 1 or args.provider_limit < 1:
        p.error("--items, --concurrency and --provider-limit must be at least 1")

    started = time.strftime("%Y%m%d-%H%M%S")
    setup = {
        "provider_limit": args.provider_limit,
        "concurrency": args.concurrency,
        "median_s": args.median_s,
        "sigma": args.sigma,
        "time_scale": args.time_scale,
        "seed": args.seed,
        "fps": args.fps,
        "ref": args.ref,
    }
    print(
        f"provider limit {args.provider_limit} (unknown to the subjects), --concurrency "
        f"{args.concurrency}, generation lognormal median {args.median_s:g} s sigma "
        f"{args.sigma:g} + 5 s queue, time scale {args.time_scale:g}",
        flush=True,
    )
    host = machine(args.ref)
    figs: list[dict[str, Any]] = []
    workroot = Path(tempfile.mkdtemp(prefix="hailuo-bench-"))
    args.source = export_ref(args.ref, workroot / "source") if args.ref else None
    setup["scaled_settings"] = scaled_settings(args.time_scale, args.source)
    setup["flow_env"] = args.flow_env
    # the project's recording settings for every server it starts, then --server-env on top
    args.server_settings = {
        **server_env(os.environ),
        **dict(kv.split("=", 1) for kv in args.server_env),
    }
    setup["server_env"] = args.server_settings
    try:
        for items in args.items:
            for mode in modes:
                print(f"-- {mode}, {items} items ...", flush=True)
                fig = run_mode(mode, items, args, workroot)
                figs.append(fig)
                print(markdown([fig]).splitlines()[-1], flush=True)
                if fig["returncode"]:
                    print(fig["log_tail"], file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
    table = markdown(figs)
    print()
    print(table)
    print()
    for name, meaning in COLUMNS:
        print(f"- {name}: {meaning}")
    result: dict[str, Any] = {"started": started, "setup": setup, "machine": host}
    result |= {"table": table, "runs": figs}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    sizes = "-".join(str(n) for n in args.items)
    path = args.results_dir / f"bench-{sizes}-{started}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {path}" + (f"; work folders kept in {workroot}" if args.keep else ""))
    if args.json:
        print(json.dumps(figs, indent=2))
    bad = [f for f in figs if f["stored"] != f["items"] or f["returncode"]]
    for f in bad:
        print(f"FAILED: {f['mode']} stored {f['stored']} of {f['items']} (exit {f['returncode']})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
