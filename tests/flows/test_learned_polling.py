"""Polling that learns the generation time, within a run and from earlier runs into the same
output (`{output}/stats/generation.json`)."""

from __future__ import annotations

import json
import statistics

import httpx
import pytest

from hailuo_batch.emulator import EmulatorConfig
from hailuo_batch.polling import STATS_KEY
from hailuo_batch.settings import get_settings
from tests.flows.flowkit import generate_videos, items, write_csv


@pytest.fixture
def emulator_config(emulator_config: EmulatorConfig) -> EmulatorConfig:
    # generation ~3 s: 60 reads on the 0.05 s schedule below, so the first run reads many times
    # even when a loaded machine slows every read down (then it reads less often, not more)
    return emulator_config.model_copy(
        update={
            "time_scale": 0.025,
            "seed": 3,
            "processing_distribution": "lognormal",
            "processing_sigma": 0.1,
        }
    )


def test_polling_learns_the_generation_time_and_keeps_it_for_the_next_run(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    """The first run reads on the provider's schedule (plus a few dense probes) and keeps what
    it saw in {output}/stats/generation.json; the next run into the same output reads each
    task near its expected end: fewer reads per item, and still little notice lag."""
    monkeypatch.setenv("HAILUO_POLL_INITIAL_S", "0.05")
    monkeypatch.setenv("HAILUO_POLL_INTERVAL_S", "0.05")
    monkeypatch.setenv("HAILUO_POLL_MAX_INTERVAL_S", "0.05")
    get_settings.cache_clear()
    out = tmp_path / "out"

    def run(prefix: str) -> tuple[float, float]:
        rows = items(images_dir, make_image, emulator, 12, prefix=prefix)
        manifest = write_csv(tmp_path / f"{prefix}.csv", rows)
        before = httpx.get(f"{emulator.base_url}/_emulator/stats").json()["status_reads_total"]
        state = generate_videos(
            manifest=str(manifest), output=str(out), concurrency=12, return_state=True
        )
        assert state.is_completed(), state.message
        after = httpx.get(f"{emulator.base_url}/_emulator/stats").json()["status_reads_total"]
        timings = httpx.get(f"{emulator.base_url}/_emulator/timings").json()["tasks"]
        lags = [
            t["notice_lag_s"] / t["generation_s"]
            for t in timings
            if t["prompt"].startswith(prefix) and t["notice_lag_s"] is not None
        ]
        assert len(lags) == 12
        return (after - before) / 12, statistics.mean(lags)

    first_reads, _ = run("first")
    kept = json.loads((out / STATS_KEY).read_text())
    assert len(kept["samples"]) == 12 and all(2.0 < s < 6.0 for s in kept["samples"])
    second_reads, second_lag = run("second")
    assert second_reads < first_reads / 2, (first_reads, second_reads)
    assert second_lag < 0.2
