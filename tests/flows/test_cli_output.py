"""What `hailuo-batch run` prints, as a real process: `--quiet` and the temporary server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
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


def _submissions(emulator) -> int:
    return int(httpx.get(f"{emulator.base_url}/_emulator/stats").json()["submissions"])


@pytest.mark.parametrize(
    ("case", "extra_args", "extra_env"),
    [
        ("no such credentials block", ["--credentials-block", "nope"], {}),
        ("no such storage block", ["--storage-block", "nope"], {}),
        ("callback mode without its URL", ["--request-type", "callback"],
         {"HAILUO_CALLBACK_TOKEN": "t" * 40}),
    ],
)  # fmt: skip
def test_a_run_that_cannot_open_exits_2_with_one_line_and_pays_nothing(
    flow_env, emulator, tmp_path, images_dir, make_image, case, extra_args, extra_env
):
    """A block, output or callback setting that only fails once the run opens it is a bad
    setting all the same: one line that names it, exit 2, no traceback, no POST."""
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 2))
    env = _env(flow_env, tmp_path, PREFECT_API_URL=str(PREFECT_API_URL.value()), **extra_env)
    env.pop("HAILUO_CALLBACK_URL", None)
    args = [a.format(manifest=m) for a in extra_args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out")]
    done = _cli("run", str(m), *args, env=env)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not start" in errors[0], text[-3000:]
    assert "nothing was submitted" in errors[0]
    assert _submissions(emulator) == 0


def test_a_rerun_of_a_results_file_that_is_not_one_exits_2_with_one_line(flow_env, tmp_path):
    (tmp_path / "not-results.jsonl").write_text('{"id": "a"}\n')
    (tmp_path / "numbers.jsonl").write_text("[1, 2]\n")
    (tmp_path / "empty.jsonl").write_text("")
    env = _env(flow_env, tmp_path, PREFECT_API_URL=str(PREFECT_API_URL.value()))
    for results, expected in [
        (tmp_path / "missing.jsonl", "not found"),
        (tmp_path, "is a folder"),
        (tmp_path / "not-results.jsonl", "line 1 is not a result record"),
        (tmp_path / "numbers.jsonl", "line 1 is not a result record"),
        (tmp_path / "empty.jsonl", "has no rows"),
    ]:
        done = _cli("rerun", str(results), "--output", str(tmp_path / "out"), "-q", env=env)
        text = done.stdout + done.stderr
        assert done.returncode == 2, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expected in errors[0], text[-3000:]


@pytest.mark.parametrize(
    ("sig", "code", "says"),
    [("SIGTERM", 143, "stopped (SIGTERM)"), ("SIGINT", 130, "interrupted (Ctrl-C)")],
)
def test_a_stopped_run_exits_with_a_line_that_says_how_to_resume(
    flow_env, tmp_path, images_dir, make_image, sig, code, says
):
    """A scheduler or `kill` stops a run with SIGTERM, a person with Ctrl-C: exit 143 or 130
    and one line saying how to resume, no traceback (the ledger lets the same command resume
    it)."""
    import signal
    import time

    from hailuo_batch.emulator import EmulatorConfig, run_emulator

    slow = EmulatorConfig(port=0, api_key=flow_env["APIXO_API_KEY"], time_scale=0.5,
                          fps=4, files_dir=str(images_dir), seed=1)  # fmt: skip
    with run_emulator(slow) as emu:
        m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emu, 2))
        env = _env(flow_env, tmp_path, PREFECT_API_URL=str(PREFECT_API_URL.value()),
                   APIXO_BASE_URL=emu.base_url)  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "hailuo_batch.cli", "run", str(m), "--output",
             str(tmp_path / "out"), "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            # as from a terminal: a shell running us in the background ignores SIGINT
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while _submissions(emu) < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out + err)[-3000:]
    assert "Traceback" not in out + err, (out + err)[-3000:]
    assert says in err and "run the same command again to resume" in err
    # --quiet: the one line, not a "Crash detected!" per task the stop cut short above it
    assert "Crash detected" not in err and "Crashed" not in err, err[-3000:]
