"""Issue 12 reproduced at a size a test can afford: the Prefect server keeps every task run.

What used to happen. A `prefect server start` passes the events of task runs (pending, running,
completed: ~3 per task run, 2 task runs per item) through its in-memory messaging; each
subscription (the task-run recorder, the event persister, ...) has an `asyncio.Queue` of 10,000
messages and drops, with the warning "Subscription queue is full", whatever arrives while it is
full (`prefect.server.utilities.messaging.memory.Subscription`). A 5,000-item batch sent events
faster than the recorder wrote them: the server ended with 37 % of the task runs, and ~1,900
stuck RUNNING or PENDING (issue 12). The fix is back-pressure in the flow (`RecorderLag`, at most
`HAILUO_MAX_RECORD_LAG` finished task runs not yet recorded by the server) plus child runs.

Why the queue is shrunk. Overflowing 10,000 messages takes thousands of items, minutes and more
than this machine can spare in a test. The server started here therefore loads
`tests/flows/small_broker/sitecustomize.py` (PYTHONPATH), which gives every subscription a queue
of `QUEUE` messages: the same code path (`deliver` drops past `maxsize`) at a limit a few hundred
items overflow. The lag allowed to the flow is scaled down with it (3 x LAG events well below
QUEUE), as the default 1,000 is scaled to 10,000.

The second test is the control: the same batch with the back-pressure out of reach loses task
runs on the same server, so the first test sits at a size that used to lose them. Both count
the server's records only through its REST API, after a bounded catch-up wait.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import prefect.settings
import pytest

from hailuo_batch.emulator import EmulatorConfig
from hailuo_batch.orchestrator import RECORDING_SETTINGS
from hailuo_batch.results import from_jsonl
from tests.deployments.deploy_helpers import (
    REPO,
    PrefectServer,
    started_prefect_server,
    tail,
)
from tests.flows.flowkit import API_KEY, FAST_FLOW_ENV, items, write_csv

pytestmark = pytest.mark.slow  # a real Prefect server and CLI process: `make test-fast` skips it

SMALL_BROKER = Path(__file__).resolve().parent / "small_broker"
#: messages per subscription queue of the test server (Prefect's own: 10,000)
QUEUE = 300
#: items of the batch; without back-pressure this many overflow QUEUE (the control test)
N = 400
#: HAILUO_MAX_RECORD_LAG for the shrunk queue: 3 events per task run, 3 x LAG << QUEUE
LAG = 40
#: HAILUO_ITEMS_PER_FLOW_RUN: the batch runs as child runs, as a large one does
PER_RUN = 200
CONCURRENCY = 10
DROPPED = "Subscription queue is full"
DONE = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.fixture
def small_broker_server(tmp_path: Path) -> Iterator[PrefectServer]:
    """`prefect server start` (SQLite in its own PREFECT_HOME, a free port) whose subscription
    queues hold QUEUE messages; its log says the patch is in place."""
    home = tmp_path / "server-home"
    home.mkdir()
    broker = {"PYTHONPATH": str(SMALL_BROKER), "HAILUO_TEST_BROKER_QUEUE": str(QUEUE)}
    # Prefect's own recorder settings (one event per write), not the project's batched ones
    # (hailuo_batch.orchestrator): the slow recorder of a server of the user's own is what
    # overflows, and what the back-pressure must hold against
    broker |= {name: str(getattr(prefect.settings, name).default()) for name in RECORDING_SETTINGS}
    with started_prefect_server(home, tmp_path / "server.log", broker) as server:
        yield server


@pytest.fixture
def emulator_config(emulator_config: EmulatorConfig) -> EmulatorConfig:
    # no queue, and the provider never refuses: the flow's pace is the server's
    return emulator_config.model_copy(update={"queue_s": 0.0, "concurrency": 1000})


def run_batch(
    server: PrefectServer, emulator: Any, manifest: Path, out: Path, lag: int
) -> subprocess.CompletedProcess[str]:
    """`hailuo-batch run` in its own process against the server and the emulator."""
    env = {
        **server.env,
        "APIXO_API_KEY": API_KEY,
        "APIXO_BASE_URL": emulator.base_url,
        **FAST_FLOW_ENV,
        "HAILUO_MAX_RECORD_LAG": str(lag),
        "HAILUO_ITEMS_PER_FLOW_RUN": str(PER_RUN),
    }
    cmd = [sys.executable, "-m", "hailuo_batch.cli", "run", str(manifest), "--output", str(out),
           "--concurrency", str(CONCURRENCY)]  # fmt: skip
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def _post(api: str, path: str, body: dict[str, Any]) -> Any:
    r = httpx.post(f"{api}{path}", json=body, timeout=30)
    r.raise_for_status()
    return r.json()


def server_task_runs(api: str) -> dict[str, str]:
    """Every task run the server keeps of the (only) batch run and its child runs, by name:
    its state type ('NONE' if it has none)."""
    parents = _post(
        api, "/flow_runs/filter", {"flows": {"name": {"any_": ["generate-videos"]}}, "limit": 10}
    )
    assert len(parents) == 1, [p["name"] for p in parents]
    parent = parents[0]["id"]
    children = _post(
        api,
        "/flow_runs/filter",
        {"flow_runs": {"parent_flow_run_id": {"any_": [parent]}}, "limit": 200},
    )
    run_ids = [parent, *(c["id"] for c in children)]
    # by id first: rows the server records while the pages are read shift them (ids are made
    # by the client, so a late record can land on a page already read), and one row can come
    # back twice
    by_id: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = _post(
            api,
            "/task_runs/filter",
            {"flow_runs": {"id": {"any_": run_ids}}, "sort": "ID_DESC", "limit": 200,
             "offset": offset},
        )  # fmt: skip
        by_id |= {t["id"]: t for t in page}
        if len(page) < 200:
            break
        offset += 200
    runs: dict[str, str] = {}
    for t in by_id.values():
        name = t["name"]
        if name.startswith(("submit_item-", "poll_item-")):  # a default name (see
            name += f"#{t['id']}"  # summarize): 3 hex digits, so two may share one
        assert name not in runs, f"two task runs named {name}"
        runs[name] = t["state_type"] or "NONE"
    return runs


def settled_task_runs(api: str, expected: int, max_wait_s: float = 60) -> dict[str, str]:
    """The server's task runs once it has caught up: every expected one finished, or the counts
    unchanged for 5 s, or `max_wait_s` passed (the server records events asynchronously)."""
    deadline = time.monotonic() + max_wait_s
    last, since = None, time.monotonic()
    while True:
        runs = server_task_runs(api)
        item_runs = {k: v for k, v in runs.items() if k.startswith(("submit-", "poll-"))}
        if len(item_runs) >= expected and all(v in DONE for v in runs.values()):
            return runs
        key = sorted(Counter(runs.values()).items())
        if key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since > 5 or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def summarize(runs: dict[str, str], n: int) -> dict[str, Any]:
    """Figures of the server's records of an n-item batch."""
    # a task run whose only recorded event is its first (Pending) keeps the task's default
    # name (submit_item-<hash>): the rendered name comes with the later events
    submits = {k: v for k, v in runs.items() if k.startswith(("submit-", "submit_item-"))}
    polls = {k: v for k, v in runs.items() if k.startswith(("poll-", "poll_item-"))}
    return {
        "items": n,
        "expected_item_task_runs": 2 * n,
        "submit": len(submits),
        "poll": len(polls),
        "states": dict(Counter(runs.values())),
        "item_states": dict(Counter([*submits.values(), *polls.values()])),
        "other_task_runs": len(runs) - len(submits) - len(polls),
    }


def queue_peaks(log: str) -> dict[str, int | str]:
    """How deep each subscription's queue got (to a tenth of QUEUE), or 'dropped', by
    topic/consumer, from the small broker's lines in the server log."""
    peaks: dict[str, int | str] = {}
    for line in log.splitlines():
        if line.startswith("hailuo test broker: ") and " queue " in line:
            label, what = line.removeprefix("hailuo test broker: ").split(" queue ", 1)
            if what.startswith("full"):
                peaks[label] = "dropped"
            elif peaks.get(label) != "dropped":
                peaks[label] = max(int(what.rsplit(" ", 1)[1]), int(peaks.get(label, 0)))
    return peaks


def run_and_count(
    server: PrefectServer,
    emulator: Any,
    tmp_path: Path,
    images_dir: Path,
    make_image: Any,
    lag: int,
) -> tuple[dict[str, Any], dict[str, str], list[Any]]:
    """An N-item batch through the CLI, then the server's records once it caught up:
    (figures, task runs by name, results lines)."""
    manifest = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, N))
    out = tmp_path / "out"
    started = time.monotonic()
    done = run_batch(server, emulator, manifest, out, lag=lag)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # a server on Prefect's recorder defaults: the run's log says how to make it cheaper, once
    # (the batch run; its parts do not repeat it)
    assert done.stderr.count("records task runs one event per database write") == 1, done.stderr
    batch_s = time.monotonic() - started
    runs = settled_task_runs(server.api, expected=2 * N)
    log = server.log.read_text(errors="replace")
    assert f"subscription queues of {QUEUE} messages" in log, tail(server.log)  # patch applied
    results = list((out / "runs").glob("*/results.jsonl"))
    assert len(results) == 1
    summary = json.loads((results[0].parent / "summary.json").read_text())
    figures = summarize(runs, N) | {
        "lag": lag, "queue": QUEUE, "batch_s": round(batch_s, 1),
        "held_for_prefect_s": summary["held_for_prefect_s"],
        "drops": log.count(DROPPED), "queue_peaks": queue_peaks(log),
    }  # fmt: skip
    return figures, runs, from_jsonl(results[0].read_text())


def test_past_the_servers_queue_limit_every_task_run_is_recorded_and_completed(
    small_broker_server, emulator, tmp_path, images_dir, make_image
):
    figures, runs, lines = run_and_count(
        small_broker_server, emulator, tmp_path, images_dir, make_image, lag=LAG
    )
    print("server records:", figures)  # shown with -s
    res = {r.id: r for r in lines}
    assert sorted(res) == sorted(f"i{k}" for k in range(N))  # one line per row
    assert all(r.status == "succeeded" for r in res.values())

    submits = sorted(k for k in runs if k.startswith("submit-"))
    assert submits == sorted(f"submit-i{k}" for k in range(N)), figures
    polls = Counter(k.split("-")[1] for k in runs if k.startswith("poll-"))  # poll-{id}-{task}
    assert polls == {f"i{k}": 1 for k in range(N)}, figures  # a submit and a poll per item
    assert all(v == "COMPLETED" for v in runs.values()), figures  # none RUNNING or PENDING


def test_the_same_batch_without_back_pressure_loses_task_runs(
    small_broker_server, emulator, tmp_path, images_dir, make_image
):
    """The control: what the test above sees if the flow does not wait for the server.

    Same server, same batch, HAILUO_MAX_RECORD_LAG out of reach. Measured on the 2-core
    development machine (5 runs of 400 items at concurrency 10, another job running): the server
    kept 394 to 778 of the 800 item task runs, 375 to 754 of them COMPLETED, the others left
    RUNNING or PENDING; 142 to 2,161 events dropped, the task-run recorder's queue full each time.
    (With back-pressure, the test above: 800 of 800 COMPLETED, no drop, that queue at most
    150 deep.) So the harness does see a loss at this size, and the test above passes because
    of the back-pressure, not because the batch is too small to matter.

    How much is lost depends on how much faster the flow sends events than the server writes
    them, i.e. on the machine. Where the recorder's queue never filled, this test cannot show a
    loss and is skipped, saying so: it then also means the test above proved little there.
    """
    figures, _, lines = run_and_count(
        small_broker_server, emulator, tmp_path, images_dir, make_image, lag=1_000_000
    )
    print("server records:", figures)  # shown with -s
    assert len(lines) == N and all(r.status == "succeeded" for r in lines)  # the run is fine
    if figures["queue_peaks"].get("events/TaskRunRecorder") != "dropped":
        pytest.skip(f"the server's task-run recorder kept up on this machine: {figures}")
    completed = figures["item_states"].get("COMPLETED", 0)
    assert completed < 2 * N, figures  # it dropped events: its records of the batch are short
