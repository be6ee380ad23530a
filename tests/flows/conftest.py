"""Fixtures for end-to-end flow tests: Prefect's test harness, the emulator, settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from hailuo_batch.emulator import EmulatorConfig, run_emulator
from hailuo_batch.settings import get_settings
from tests.flows.flowkit import API_KEY, FAST_FLOW_ENV


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect database and server for the whole session."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture
def emulator_config(images_dir: Path) -> EmulatorConfig:
    return EmulatorConfig(
        port=0,
        api_key=API_KEY,
        time_scale=0.002,  # a 120 s generation takes 0.24 s
        fps=4,
        files_dir=str(images_dir),
        seed=1,
    )


@pytest.fixture
def emulator(emulator_config: EmulatorConfig) -> Iterator[object]:
    with run_emulator(emulator_config) as emu:
        yield emu


@pytest.fixture
def flow_env(
    emulator: object, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> Iterator[dict[str, str]]:
    """Settings that point the flow at the emulator with a fast poll schedule."""
    env = {
        "APIXO_API_KEY": API_KEY,
        "APIXO_BASE_URL": emulator.base_url,  # type: ignore[attr-defined]
        **FAST_FLOW_ENV,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()
    os.environ.pop("HAILUO_FAILCODE_POLICY", None)
