"""What `hailuo-batch run` prints, as a real process: `--quiet` and the temporary server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL

from hailuo_batch.cli import TEMPORARY_SERVER_NOTE
from tests.flows.flowkit import items, write_csv

pytestmark = pytest.mark.slow  # real processes: `make test-fast` skips it


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hailuo_batch.cli", *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip


def _env(flow_env: dict[str, str], tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # a Prefect home of its own: no profile of the machine can name an API URL
    return {**env, **flow_env, "PREFECT_HOME": str(tmp_path / "prefect-home"), **extra}


def test_quiet_run_prints_only_the_summary(flow_env, emulator, tmp_path, images_dir, make_image):
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 2))
    env = _env(flow_env, tmp_path, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    done = _cli("run", str(m), "--output", str(tmp_path / "out"), "--quiet", env=env)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "| INFO    |" not in text, text[-3000:]  # no Prefect log lines
    assert "items:    succeeded 2" in done.stdout
    assert "run id:" in done.stdout and "results:" in done.stdout
    assert TEMPORARY_SERVER_NOTE not in text  # a server is configured: nothing to warn about


def test_run_without_a_server_says_it_uses_a_temporary_one(flow_env, tmp_path):
    env = _env(flow_env, tmp_path)
    done = _cli("run", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "out"), env=env)
    assert TEMPORARY_SERVER_NOTE in done.stderr.splitlines(), done.stderr[-3000:]
    assert done.returncode == 1  # the manifest cannot be read: the run failed, and said so
    assert "run failed" in done.stderr
