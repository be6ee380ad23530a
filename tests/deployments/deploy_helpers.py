"""Helpers for the deployment tests: the Prefect CLI against a test server, process groups."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync

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
