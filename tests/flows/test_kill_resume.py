"""Kill a real `hailuo-batch run` process (SIGKILL) mid-batch, resume it, and check from the
emulator's own counters that nothing was paid twice (or is reported uncertain) and every video
is stored once, with the bytes the provider served."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from hailuo_batch.emulator import EmulatorConfig
from hailuo_batch.results import from_jsonl
from hailuo_batch.review import POSTER_SUFFIX
from tests.flows.flowkit import items, served_sha256, write_csv

pytestmark = pytest.mark.slow  # real processes and servers: `make test-fast` skips it

N = 6


@pytest.fixture
def emulator_config(images_dir: Path, request: pytest.FixtureRequest) -> EmulatorConfig:
    # a 120 s generation takes 3 s, slow faults take 1.5 s: time to kill in every phase; the
    # polling phase gets 10 s generations so every item sits in `submitted` at the same time
    phase = request.node.callspec.params["phase"]
    return EmulatorConfig(
        port=0,
        api_key=None,
        time_scale=0.025,
        processing_s=400.0 if phase == "polling" else 120.0,
        processing_spread=0.0,
        fps=4,
        files_dir=str(images_dir),
        seed=3,
        slow_s=1.5,
    )


def _run_cli(
    manifest: Path, out: Path, env: dict[str, str], concurrency: int = 3
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "hailuo_batch.cli", "run", str(manifest), "--output", str(out),
         "--concurrency", str(concurrency), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _wait_for(cond: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 90
    while not cond():
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            pytest.fail(f"run ended before {what}: exit {proc.returncode}\n{out[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _partial_files(out: Path) -> list[Path]:
    leftovers = [
        p
        for p in (out / "videos").glob("*")
        if (not p.name.endswith(".mp4") and not p.name.endswith(POSTER_SUFFIX)) or ".part" in p.name
    ]
    # temporaries live in {output}/tmp/, named after their percent-encoded key
    return leftovers + [p for p in (out / "tmp").rglob("videos%2F*") if p.is_file()]


@pytest.mark.parametrize("phase", ["submitting", "polling", "streaming"])
def test_sigkill_then_resume_pays_once_and_stores_everything(
    phase, flow_env, emulator, tmp_path, images_dir, make_image
):
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, N))
    out = tmp_path / "out"
    env = {**os.environ, **flow_env, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "HAILUO_LEASE_TTL_S": "2", "HAILUO_POLL_INITIAL_S": "1"}  # fmt: skip
    stats = emulator.stats

    def ledger_states() -> list[str]:
        return [json.loads(p.read_text())["state"] for p in (out / "ledger").glob("*.json")]

    if phase == "submitting":
        emulator.script_faults("submit", "slow", count=N)  # each POST takes 1.5 s to be accepted

        def killed_at() -> bool:  # a POST is on its way: recorded as submitting, not answered
            return "submitting" in ledger_states()
    elif phase == "polling":

        def killed_at() -> bool:  # every taskId is recorded and status reads have begun
            return ledger_states().count("submitted") == N and stats()["status_reads_total"] >= 1
    else:
        emulator.script_faults("download", "trickle", count=1)  # the first video streams slowly

        def killed_at() -> bool:
            return sum(stats()["downloads"].values()) >= 1

    proc = _run_cli(m, out, env, concurrency=N if phase == "polling" else 3)
    _wait_for(killed_at, proc, phase)
    if phase == "streaming":
        time.sleep(0.5)  # well inside the 1.5 s trickle: bytes are flowing into the store
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_states = sorted(ledger_states())
    assert not (out / "runs").exists() or not list((out / "runs").glob("*/results.jsonl"))

    resumed = _run_cli(m, out, env)
    log = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, log[-4000:]

    results_files = list((out / "runs").glob("*/results.jsonl"))
    assert len(results_files) == 1
    res = {r.id: r for r in from_jsonl(results_files[0].read_text())}
    assert len(res) == N  # the final results file is complete
    by_prompt = stats()["submissions_by_prompt"]
    for k in range(N):
        r = res[f"i{k}"]
        assert r.status == "succeeded", (r.id, r.status, r.fail_msg, r.note)
        # submitted exactly once, or reported uncertain (the kill hit between POST and record)
        assert by_prompt[f"p{k}"] == 1 or (by_prompt[f"p{k}"] == 2 and r.uncertain), (r.id, r.note)
        data = (out / "videos" / f"i{k}.mp4").read_bytes()
        assert len(data) == r.bytes
        assert (
            hashlib.sha256(data).hexdigest()
            == r.sha256
            == served_sha256(emulator.base_url, r.task_id)
        )
    assert not _partial_files(out)
    if phase == "polling":  # known taskIds were polled, never resubmitted
        notes = {r.id: (r.attempts, r.uncertain, r.note) for r in res.values()}
        assert stats()["submissions"] == N, (notes, killed_states, log[-3000:])
    if phase == "submitting":
        assert any(r.uncertain for r in res.values())  # the window was hit and reported
