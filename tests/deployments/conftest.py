"""Fixtures for the deployment tests: a real `prefect server` on loopback, the apixo emulator
with Pillow-made images.

Everything started here runs in its own process group and is stopped in a `finally`, whatever
the tests do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from deploy_helpers import (
    API_KEY,
    PREFECT,
    PrefectServer,
    free_port,
    picture,
    stop_group,
    tail,
)

from hailuo_batch.emulator import EmulatorConfig, EmulatorHandle, run_emulator


def _clean_env(home: Path, api: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "APIXO_"))}
    env = {k: v for k, v in env.items() if not k.startswith("HAILUO_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    if api:
        env["PREFECT_API_URL"] = api
    return env


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1 (SQLite in a temp PREFECT_HOME, a free port)."""
    root = tmp_path_factory.mktemp("prefect")
    home = root / "home"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    server = PrefectServer(url, home, log, _clean_env(home, f"{url}/api"))
    proc = server.spawn(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log,
        _clean_env(home, None),
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start:\n{tail(log)}")
            time.sleep(0.3)
        yield server
    finally:
        for p in reversed(server.started):
            stop_group(p)


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
