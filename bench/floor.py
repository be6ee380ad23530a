"""The floor of Prefect's cost per batch item: two no-op task runs (submit, poll) per item.

    .venv/bin/python bench/floor.py [--items 1000] [--concurrency 25]

Runs one flow run of N items, each a `submit` and a `poll` task run that do nothing (the poll
sleeps 50 ms), `--concurrency` at a time, against a started `prefect server` (SQLite, temporary
PREFECT_HOME), twice: with Prefect's own server settings and with the project's recording
settings (`hailuo_batch.orchestrator.RECORDING_SETTINGS`). Prints, for each, the CPU seconds
per item of the flow process and of the server (its catch-up after the flow included, until it
is idle) and the task runs the server holds afterwards. Whatever `hailuo-batch run` spends per
item beyond these figures is its own work (HTTP, storage, verification, records).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_batch as bench

from hailuo_batch.orchestrator import RECORDING_SETTINGS


def flow_process(items: int, concurrency: int, log_lines: int) -> None:
    """The flow, in this process: prints its own CPU seconds."""
    from prefect import flow, get_run_logger, task

    @task(task_run_name="submit-{i}")
    async def submit(i: int) -> str:
        for n in range(log_lines):  # what a run log line costs, beside the engine's own
            get_run_logger().info("item %d: line %d of its own", i, n)
        return f"task-{i}"

    @task(task_run_name="poll-{i}")
    async def poll(i: int, task_id: str) -> str:
        await asyncio.sleep(0.05)
        return task_id

    @flow(name="floor")
    async def floor(n: int) -> int:
        slots = asyncio.Semaphore(concurrency)

        async def one(i: int) -> str:
            async with slots:
                return await poll(i, await submit(i))

        return len(await asyncio.gather(*(one(i) for i in range(n))))

    asyncio.run(floor(items))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"cpu {usage.ru_utime + usage.ru_stime:.3f}")


def measure(
    items: int, concurrency: int, server_env: dict[str, str], log_lines: int = 0
) -> tuple[float, float, str]:
    """(flow CPU s per item, server CPU s per item, the task runs the server kept)."""
    work = Path(tempfile.mkdtemp(prefix="hailuo-floor-"))
    with bench.prefect_server(work, server_env) as (server, env):
        time.sleep(3)  # past the server's start-up work
        group = os.getpgid(server.pid)
        before = bench.group_cpu_s(group)
        cmd = [sys.executable, __file__, "--flow", str(items), "--concurrency", str(concurrency)]
        cmd += ["--log-lines", str(log_lines)]
        done = subprocess.run(
            cmd, env={**bench.base_env(), **env}, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            sys.exit(f"the flow failed:\n{done.stderr[-2000:]}")
        flow_cpu = float(done.stdout.split()[-1])
        bench.settle(group)
        server_cpu = bench.group_cpu_s(group) - before
        kept = bench.count_task_runs(env["PREFECT_API_URL"])
    return flow_cpu / items, server_cpu / items, f"{kept['total']} / {kept['completed']} COMPLETED"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=25)
    p.add_argument(
        "--log-lines",
        type=int,
        nargs="+",
        default=[0],
        help="run log lines of its own per item (several: one row each, project settings only)",
    )
    p.add_argument("--flow", type=int, help=argparse.SUPPRESS)  # the flow process itself
    args = p.parse_args()
    if args.flow is not None:
        flow_process(args.flow, args.concurrency, args.log_lines[0])
        return 0
    print(f"{args.items} items, 2 no-op task runs each, {args.concurrency} at a time")
    print("| server settings | log lines / item | CPU s / item: flow | server | total | kept |")
    print("|---|---|---|---|---|---|")
    runs = [("Prefect's defaults", {}, 0)] if args.log_lines == [0] else []
    runs += [("the project's (orchestrator.py)", RECORDING_SETTINGS, n) for n in args.log_lines]
    for label, env, lines in runs:
        flow_s, server_s, kept = measure(args.items, args.concurrency, env, lines)
        total = flow_s + server_s
        row = f"| {label} | {lines} | {flow_s:.4f} | {server_s:.4f} | {total:.4f} | {kept} |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
