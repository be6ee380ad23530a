"""Lognormal generation times and the record of task timings (GET /_emulator/timings)."""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from emulator_helpers import read, submit, task_body, wait_done
from test_emulator_callbacks import Receiver

from hailuo_batch.emulator import EmulatorConfig, run_emulator
from hailuo_batch.emulator.contract import SubmitRequest
from hailuo_batch.emulator.state import EmulatorState

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def hook() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _request(i: int) -> SubmitRequest:
    return SubmitRequest(
        request_type="async",
        callback_url=None,
        provider="auto",
        mode="standard-image-to-video",
        prompt=f"shot {i}",
        image_url="http://127.0.0.1:1/files/a.jpg",
        duration=6,
    )


def _processing_s(config: EmulatorConfig, n: int) -> list[float]:
    state = EmulatorState(config)
    return [state.create_task(f"key{i}", _request(i)).cost_ms / 1000 for i in range(n)]


def test_lognormal_processing_times_have_the_configured_median_and_spread() -> None:
    config = EmulatorConfig(
        processing_distribution="lognormal", processing_s=100, processing_sigma=0.5, seed=3
    )
    times = _processing_s(config, 2000)
    logs = [math.log(t) for t in times]
    assert statistics.median(times) == pytest.approx(100, rel=0.06)
    assert statistics.stdev(logs) == pytest.approx(0.5, rel=0.06)
    assert max(times) > 100 * math.exp(2 * 0.5)  # a long right tail, unlike the uniform spread
    assert _processing_s(config, 50) == times[:50]  # the seed decides every draw


def test_default_processing_times_stay_uniform_within_the_spread() -> None:
    config = EmulatorConfig(seed=3)
    assert config.processing_distribution == "uniform"
    times = _processing_s(config, 500)
    assert all(96 <= t <= 144 for t in times)  # 120 s +- 20 %
    lognormal = EmulatorConfig(seed=3, processing_distribution="lognormal")
    assert _processing_s(lognormal, 5) != times[:5]


def test_lognormal_sigma_zero_is_the_median_exactly() -> None:
    config = EmulatorConfig(processing_distribution="lognormal", processing_sigma=0, seed=1)
    assert set(_processing_s(config, 20)) == {120.0}


def test_timings_record_the_first_read_that_reports_the_end(make_emulator: Any) -> None:
    emu = make_emulator(time_scale=0.002)  # pending 10 ms, processing about 0.24 s
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        t0 = time.time()
        read_task = submit(c, task_body(emu.base_url, prompt="read me"))
        unread_task = submit(c, task_body(emu.base_url, prompt="never read"))
        assert read(c, read_task)["state"] in ("pending", "processing")
        record = c.get("/_emulator/timings").json()
        first = {t["task_id"]: t for t in record["tasks"]}[read_task]
        assert first["reported"] is None and first["ended"] is None
        data = wait_done(c, read_task)
        reported_at = time.time()
        time.sleep(0.05)
        again = read(c, read_task)  # a later read changes nothing
        video = httpx.get(json.loads(again["resultJson"])["resultUrls"][0])
        assert video.status_code == 200
        time.sleep(0.4)  # the unread task ends meanwhile
        record = c.get("/_emulator/timings").json()
    assert record["time_scale"] == 0.002 and record["concurrency"] == 20
    assert record["processing_distribution"] == "uniform"
    tasks = {t["task_id"]: t for t in record["tasks"]}
    assert [t["task_id"] for t in record["tasks"]][-2:] == [read_task, unread_task]
    seen = tasks[read_task]
    assert seen["state"] == "success" and seen["reported_via"] == "status"
    assert t0 <= seen["created"] < seen["started"] < seen["ended"] <= seen["reported"]
    assert seen["reported"] <= reported_at + 0.01
    assert seen["notice_lag_s"] == pytest.approx(seen["reported"] - seen["ended"], abs=1e-6)
    assert 0 <= seen["notice_lag_s"] < 0.1  # read every 20 ms until it ended
    assert seen["generation_s"] == pytest.approx(seen["ended"] - seen["created"], abs=1e-6)
    assert seen["ended"] == pytest.approx(data["completeTime"] / 1000, abs=0.002)
    assert seen["cost_ms"] == data["costTime"]
    assert seen["reported"] < seen["downloaded"]
    assert seen["read_end"] == seen["reported"] and seen["delivered"] is None
    unread = tasks[unread_task]
    assert unread["state"] == "success" and unread["ended"] is not None
    assert unread["reported"] is None and unread["notice_lag_s"] is None
    assert unread["reported_via"] is None and unread["downloaded"] is None
    assert unread["read_end"] is None and unread["delivered"] is None
    assert emu.timings()["tasks"][-1]["task_id"] == unread_task


def test_a_callback_delivery_is_a_report(make_emulator: Any, hook: Receiver) -> None:
    emu = make_emulator(time_scale=0.001)
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        body = task_body(
            emu.base_url, prompt="hook", request_type="callback", callback_url=hook.url
        )
        task_id = submit(c, body)
        hook.wait_for(1)
        time.sleep(0.05)
        wait_done(c, task_id)  # a read after the delivery does not replace it
    (entry,) = [t for t in emu.timings()["tasks"] if t["task_id"] == task_id]
    assert entry["reported_via"] == "callback"
    assert 0 <= entry["notice_lag_s"] < 1.0
    assert entry["delivered"] == entry["reported"] < entry["read_end"]  # the read came later


def test_a_refused_delivery_is_no_report(make_emulator: Any, hook: Receiver) -> None:
    hook.answers = [500, 500, 500, 500]
    emu = make_emulator(time_scale=0.001, callback_retry_s=(1.0,))
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        body = task_body(
            emu.base_url, prompt="hook", request_type="callback", callback_url=hook.url
        )
        task_id = submit(c, body)
        hook.wait_for(2)
        time.sleep(0.05)
    (entry,) = [t for t in emu.timings()["tasks"] if t["task_id"] == task_id]
    assert entry["ended"] is not None and entry["reported"] is None
    assert entry["delivered"] is None


def test_the_record_is_written_to_a_file_when_the_emulator_stops(
    files_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "timings.json"
    config = EmulatorConfig(
        port=0,
        time_scale=0.001,
        fps=4,
        seed=7,
        files_dir=str(files_dir),
        cache_dir=str(cache_dir),
        timings_file=str(out),
        processing_distribution="lognormal",
    )
    with run_emulator(config) as emu:
        with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
            task_id = submit(c, task_body(emu.base_url))
            wait_done(c, task_id)
        assert not out.exists()
    record = json.loads(out.read_text())
    assert record["processing_distribution"] == "lognormal"
    assert [t["task_id"] for t in record["tasks"]] == [task_id]
    assert record["tasks"][0]["reported_via"] == "status"
    assert not list(tmp_path.glob("*.part"))
