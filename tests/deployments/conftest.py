"""Fixtures for the deployment tests: a real `prefect server` on loopback, the apixo emulator
with Pillow-made images.

Everything started here runs in its own process group and is stopped in a `finally`, whatever
the tests do.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_helpers import (
    API_KEY,
    PrefectServer,
    picture,
    started_prefect_server,
)

from hailuo_batch.emulator import EmulatorConfig, EmulatorHandle, run_emulator


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1 (SQLite in a temp PREFECT_HOME, a free port)."""
    root = tmp_path_factory.mktemp("prefect")
    home = root / "home"
    home.mkdir()
    with started_prefect_server(home, root / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("images")
    picture(d / "dusk.jpg", (640, 360), 20)
    picture(d / "tower.png", (360, 640), 140)
    picture(d / "garden.jpg", (480, 480), 200)
    return d


@pytest.fixture(scope="session")
def emulator(images_dir: Path) -> Iterator[EmulatorHandle]:
    config = EmulatorConfig(
        port=0, api_key=API_KEY, time_scale=0.002, fps=4, files_dir=str(images_dir), seed=3
    )
    with run_emulator(config) as emu:
        yield emu
