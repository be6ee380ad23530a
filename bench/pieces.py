"""What each piece of an item's work costs the flow process alone, one piece at a time.

    .venv/bin/python bench/pieces.py [--n 200] [--reads-per-item 9.4]

Against the emulator (bench/run_emulator.py, in its own process, on loopback), in this process,
with no Prefect: CPU seconds (user + system, from getrusage) per call of each piece of an
item's life, in the order the flow does them: the image check, the ledger's claim and records,
the POST, a status read (called directly, and from the event loop through a worker thread as
the flow calls it), the download with its check and storage (with and without the poster the
first 500 videos get), and an empty worker-thread hop for scale. Prints a markdown table and
the sum for one item (reads counted `--reads-per-item` times: the figure bench_batch.py
measured).

The sum is what an item costs with nothing else running: `bench_batch.py` measures the whole
run, where the same work shares two cores with ~100 threads, Prefect's engine and the server.
The difference between the two is contention (thread switches, the GIL), not work.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_batch as bench  # noqa: E402

from hailuo_batch.apixo import ApixoClient, GenerateRequest  # noqa: E402
from hailuo_batch.fetch import fetch_video  # noqa: E402
from hailuo_batch.jobs import blocking  # noqa: E402
from hailuo_batch.ledger import Ledger, LedgerRecord, LedgerState  # noqa: E402
from hailuo_batch.manifest import load_manifest  # noqa: E402
from hailuo_batch.settings import Settings  # noqa: E402
from hailuo_batch.storage import OutputStore  # noqa: E402
from hailuo_batch.validation import preflight  # noqa: E402


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float]] = []

    def measure(self, name: str, n: int, per_item: float, fn: Callable[[], object]) -> None:
        (u0, s0) = cpu()
        fn()
        (u1, s1) = cpu()
        self.rows.append((name, per_item, 1000 * (u1 - u0) / n, 1000 * (s1 - s0) / n))

    def markdown(self) -> str:
        lines = ["| piece | per item | CPU ms / call | user | system | ms / item |"]
        lines.append("|---|---|---|---|---|---|")
        for name, per_item, user, system in self.rows:
            each = user + system
            lines.append(
                f"| {name} | {per_item:g} | {each:.2f} | {user:.2f} | {system:.2f} | "
                f"{each * per_item:.2f} |"
            )
        total = sum((u + s) * k for _, k, u, s in self.rows)
        lines.append(f"| **one item** | | | | | **{total:.1f}** |")
        return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="calls of each piece (200)")
    p.add_argument("--reads-per-item", type=float, default=9.4, help="status reads per item")
    args = p.parse_args()
    n = args.n
    work = Path(tempfile.mkdtemp(prefix="hailuo-pieces-"))
    emu_args = SimpleNamespace(
        seed=1, time_scale=0.01, fps=2, provider_limit=100_000, median_s=120.0, sigma=0.4
    )
    (work / "files").mkdir()
    with bench.emulator(work, emu_args) as (base, _proc):  # type: ignore[arg-type]
        manifest = load_manifest(str(bench.write_inputs(work, base, n)))
        items = manifest.items
        settings = Settings(allow_private_networks=True)  # the emulator is on loopback
        store = OutputStore(str(work / "out"))
        client = ApixoClient(bench.API_KEY, base)
        limiter = anyio.CapacityLimiter(8)

        def hop(fn: Callable[..., object], *a: object) -> object:
            return blocking(fn, *a, limiter=limiter)

        t = Table()
        checked = []
        t.measure(
            "image check (preflight: GET, sniff, decode)", n, 1,
            lambda: checked.extend(preflight(i, settings=settings) for i in items),
        )  # fmt: skip
        requests: list[GenerateRequest] = [c.request for c in checked if c.request is not None]
        if len(requests) < n:
            sys.exit(f"images refused: {next(c.errors for c in checked if not c.ok)}")
        ledger = Ledger(store, "pieces")
        ledger.heartbeat()

        def records() -> None:
            for i in items:
                ledger.claim(i.id)
                ledger.get(i.id)
                rec = LedgerRecord(id=i.id, input_hash=i.input_hash, state=LedgerState.SUBMITTING)
                for state in (LedgerState.SUBMITTED, LedgerState.SUCCEEDED, LedgerState.STORED):
                    rec = ledger.put(rec)
                    rec = rec.model_copy(update={"state": state})
                ledger.still_ours(i.id, rec)
                ledger.put(rec)
                ledger.release(i.id)

        t.measure("ledger: claim, read, 4 records, ownership check, release", n, 1, records)
        ids: list[str] = []
        t.measure("submit (POST)", n, 1, lambda: ids.extend(client.submit(r) for r in requests))
        time.sleep(5)  # every task ends (time scale 0.01: ~1.2 s generations)
        t.measure("status read, direct", n, 0, lambda: [client.get_status(i) for i in ids])

        async def reads() -> None:
            for i in ids:
                await hop(client.get_status, i)

        t.measure(
            "status read, through a worker thread", n, args.reads_per_item,
            lambda: asyncio.run(reads()),
        )  # fmt: skip
        urls = [client.get_status(i).result_urls[0] for i in ids]

        async def downloads(poster: bool) -> None:
            for k, url in enumerate(urls):
                out = await fetch_video(
                    client, store, url, f"videos/{poster}-{k}.mp4", sweep=False,
                    retry_delays=(), log=print, blocking=hop, poster=poster,
                )  # fmt: skip
                if out.stored is None:
                    sys.exit(f"a download failed: {out.error}")

        t.measure(
            "download, check (PyAV), store (fsync)", n, 1, lambda: asyncio.run(downloads(False))
        )
        # the poster's extra: the same pass with the poster, minus the pass without it
        t.measure("download, check, store, poster", n, 0, lambda: asyncio.run(downloads(True)))

        async def hops() -> None:
            for _ in range(n):
                await hop(lambda: None)

        t.measure("empty worker-thread hop", n, 0, lambda: asyncio.run(hops()))
        client.close()
        size = store.size("videos/False-0.mp4")
    print(f"{n} calls of each, emulator on loopback, no Prefect; video {size:,} bytes")
    print(t.markdown())
    print(
        "(per item: the poster is made for the first 500 videos of a run only; the flow's other "
        "worker-thread hops, ~10 per item, are counted inside the pieces above)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
