"""Helpers for the deployment tests: the Prefect CLI against a test server, process groups."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync

from hailuo_batch.orchestrator import RECORDING_SETTINGS

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
API_KEY = "sk-deploy-test-SECRET-0123456789"
POOL = "hailuo-process"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM the process group started for `proc`, then SIGKILL what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    else:  # the leader is gone; children of its group may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class PrefectServer:
    """A running `prefect server` and the environment that points the CLI at it."""

    url: str
    home: Path
    log: Path
    env: dict[str, str]
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    def run(self, *commands: list[str], env: dict[str, str] | None = None) -> list[str]:
        """Run commands from the repo against this server, all at once (each `prefect` CLI call
        spends seconds importing); fail with the output of any that fails. Returns outputs."""
        procs = [
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env={**self.env, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for cmd in commands
        ]
        outputs = []
        try:
            for cmd, proc in zip(commands, procs, strict=True):
                out, _ = proc.communicate(timeout=180)
                assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out}"
                outputs.append(out)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return outputs

    def cli(self, *args: str, env: dict[str, str] | None = None) -> str:
        """`prefect ARGS` against this server."""
        return self.run([PREFECT, *args], env=env)[0]

    def spawn(self, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start a long-running process (in its own group, with exactly `env`) from the repo.

        The caller stops it; whatever is still running when the server fixture ends is stopped
        there too.
        """
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                args,
                cwd=REPO,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc


def clean_env(home: Path, api: str | None = None) -> dict[str, str]:
    """This process's environment without Prefect's, apixo's or this project's settings, with
    its own PREFECT_HOME (and PREFECT_API_URL `api`)."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "APIXO_", "HAILUO_"))
    }
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


@contextmanager
def started_prefect_server(
    home: Path, log: Path, server_env: dict[str, str] | None = None
) -> Iterator[PrefectServer]:
    """`prefect server start` on 127.0.0.1 and a free port (SQLite in `home`, the project's
    recording settings and then `server_env` on top of `clean_env`), healthy before it is
    yielded; it and what it started stop after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = PrefectServer(url, home, log, clean_env(home, f"{url}/api"))
    proc = server.spawn(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log,
        {**clean_env(home), **RECORDING_SETTINGS, **(server_env or {})},
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


def picture(path: Path, size: tuple[int, int], hue: int) -> None:
    """A small gradient picture with shapes, so the emulator's pan has something to move."""
    img = Image.new("RGB", size, (hue, 90, 160))
    draw = ImageDraw.Draw(img)
    for i in range(0, size[0], 60):
        draw.ellipse((i, i % size[1], i + 50, i % size[1] + 50), outline=(255, 255, 255), width=3)
    img.save(path)


@contextmanager
def prefect_api(api_url: str) -> Iterator[None]:
    """Run flows of this process against `api_url`; logs and events are flushed there on exit
    (as `prefect_test_harness` does), so nothing leaks into later tests."""
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            yield
        finally:

            async def _drain() -> None:
                try:
                    result = APILogWorker.instance().drain()
                    if inspect.isawaitable(result):
                        await result
                except RuntimeError:
                    pass  # never started
                result = EventsWorker.drain_all()
                if inspect.isawaitable(result):
                    await result

            run_coro_as_sync(_drain())
