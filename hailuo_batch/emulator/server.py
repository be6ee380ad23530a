"""Running the emulator: in a background thread (`run_emulator`) or in the foreground (`serve`)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from hailuo_batch.emulator.app import Emulator, create_app
from hailuo_batch.emulator.config import EmulatorConfig
from hailuo_batch.sockets import bind_tcp, serve_in_thread

log = logging.getLogger(__name__)

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def _base_url(config: EmulatorConfig, sock: socket.socket) -> str:
    if config.public_base_url:
        return config.public_base_url.rstrip("/")
    host = _WILDCARDS.get(config.host, config.host)
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(emulator: Emulator, log_level: str) -> uvicorn.Server:
    uconfig = uvicorn.Config(
        emulator.asgi,
        lifespan="on",
        log_level=log_level,
        access_log=emulator.config.access_log,
        timeout_graceful_shutdown=2,
        timeout_keep_alive=30,
        backlog=2048,
    )
    return uvicorn.Server(uconfig)


class EmulatorHandle:
    """A running emulator: its address plus in-process control (also over /_emulator/...)."""

    def __init__(self, emulator: Emulator, base_url: str) -> None:
        self._emulator = emulator
        self.base_url = base_url
        self.config = emulator.config

    def stats(self) -> dict[str, Any]:
        """Counters; see GET /_emulator/stats."""
        return self._emulator.state.stats()

    def script_faults(self, route: str, kind: str, count: int = 1) -> None:
        """Give the next `count` requests of `route` ("submit", "status", "balance",
        "download" or "any") the fault `kind` (see `hailuo_batch.emulator.faults`)."""
        state = self._emulator.state
        with state.lock:
            state.faults.script(route, kind, count)

    def clear_faults(self) -> None:
        state = self._emulator.state
        with state.lock:
            state.faults.clear()

    def reset_stats(self) -> None:
        self._emulator.state.reset_stats()

    def timings(self) -> dict[str, Any]:
        """The record of task timings; see GET /_emulator/timings."""
        return self._emulator.state.timings()

    def set_balance(self, usd: float) -> None:
        self._emulator.state.set_balance(usd)

    @property
    def video_encodes(self) -> int:
        """How many videos this emulator actually encoded (cache misses)."""
        return self._emulator.worker.cache.encodes


@contextmanager
def run_emulator(config: EmulatorConfig | None = None) -> Iterator[EmulatorHandle]:
    """Serve the emulator from a background thread until the block exits."""
    config = config or EmulatorConfig()
    sock = bind_tcp(config.host, config.port, backlog=2048)
    base_url = _base_url(config, sock)
    emulator = create_app(config)
    emulator.state.base_url = base_url
    server = _uvicorn_server(emulator, "warning")
    with serve_in_thread(server, sock, "apixo emulator"):
        yield EmulatorHandle(emulator, base_url)


def serve(config: EmulatorConfig | None = None) -> None:
    """Serve the emulator in the foreground until interrupted (Ctrl-C)."""
    config = config or EmulatorConfig()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per image fetch
    sock = bind_tcp(config.host, config.port, backlog=2048)
    base_url = _base_url(config, sock)
    emulator = create_app(config)
    emulator.state.base_url = base_url
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    log.info(
        "apixo emulator serving at %s (time_scale=%s, fault_rate=%s)",
        base_url,
        config.time_scale,
        config.fault_rate,
    )
    try:
        _uvicorn_server(emulator, "info").run(sockets=[sock])
    finally:
        sock.close()
