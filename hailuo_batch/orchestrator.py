"""Settings for a Prefect server that records a batch's task runs (Prefect-free).

Every item is two Prefect task runs (submit, poll), and each task run reaches the server as
about three events (pending, running, completed) that its task-run recorder turns into rows.
Prefect 3.8's defaults record them one event per database write
(`PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE=1`): a no-op item then costs the
server ~60 ms of CPU on SQLite, more than the whole flow's share. Reading and writing in
batches of 200, flushed at least every second, costs ~20 ms (`bench/floor.py`); task runs
appear in the UI at most a second later. The event persister gets the same treatment.

Every Prefect server this project starts (the CLI's temporary one, `make demo`'s, the
benchmarks', the deployment tests', `deployments/docker-compose.yaml`) runs with these
settings; the README says how to give them to a server of your own. A value already in the
environment wins. A run on a server that records one event at a time says so in its log
(`recording_advice`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Prefect server settings (environment variables) for recording many short task runs.
RECORDING_SETTINGS: dict[str, str] = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
}


def server_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`RECORDING_SETTINGS`, each overridden by the value `environ` already gives it."""
    return {name: environ.get(name, value) for name, value in RECORDING_SETTINGS.items()}


def recording_advice(server_settings: Mapping[str, Any]) -> str | None:
    """What to tell the user of a run whose Prefect server records task runs one event per
    database write (Prefect's default), from the server's `GET /admin/settings`; None when its
    recorder batches, or when the settings do not say (Prefect Cloud has no such endpoint)."""
    try:
        recorder = server_settings["server"]["services"]["task_run_recorder"]
        batch_size = int(recorder["batch_size"])
    except (KeyError, TypeError, ValueError):
        return None
    if batch_size > 1:
        return None
    return (
        "the Prefect server records task runs one event per database write (Prefect's default): "
        "each item costs it about three times the CPU it needs. Start it with "
        + " ".join(f"{name}={value}" for name, value in RECORDING_SETTINGS.items())
        + " (README: 'Prefect server settings')"
    )
