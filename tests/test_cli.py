"""The command line as a user meets it: help, validation report, exit codes, bad settings."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hailuo_batch.cli import build_parser, main


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hailuo_batch.cli", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["run", "rerun", "validate", "emulator", "receiver"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hailuo-batch " + command in out


def test_top_level_help_lists_commands_and_settings(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for word in ("run", "rerun", "validate", "emulator", "receiver", "APIXO_API_KEY"):
        assert word in out


def test_run_defaults_match_the_flow():
    args = build_parser().parse_args(["run", "m.csv"])
    assert (args.mode, args.duration, args.provider, args.concurrency) == (
        "standard",
        6,
        "auto",
        10,
    )
    assert args.request_type == "async" and args.max_cost is None and not args.dry_run


@pytest.fixture
def manifest(tmp_path: Path, make_image) -> Path:
    good = make_image(640, 360)
    short = make_image(451, 300)
    rows = [
        {"id": "ok", "image_url": str(good), "prompt": "fine", "duration": ""},
        {"id": "short", "image_url": str(short), "prompt": "too short", "duration": ""},
        {"id": "dur", "image_url": str(good), "prompt": "bad duration", "duration": "7"},
        {"id": "ten", "image_url": str(good), "prompt": "ten seconds", "duration": "10"},
    ]
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_validate_reports_each_problem_with_row_and_field(manifest, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(manifest)])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "row 2 (id short), field 'image_url'" in out and "short side" in out.lower()
    assert "row 3" in out and "field 'duration'" in out
    assert "4 rows, 2 valid, 2 invalid" in out
    assert "$0.51" in out  # 0.19 (6 s) + 0.32 (10 s)


def test_validate_json_and_clean_manifest_exit_zero(tmp_path, make_image, capsys):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"image_url": str(make_image(800, 600)), "prompt": "p"}) + "\n")
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(path), "--json"])
    assert exc.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["valid"] == 1 and report["problems"] == [] and report["estimated_cost_usd"] == 0.19
    )


def test_unreadable_manifest_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(tmp_path / "missing.csv")])
    assert exc.value.code == 1
    assert "missing.csv" in capsys.readouterr().err


def test_bad_setting_fails_before_anything_runs(manifest, tmp_path):
    import os

    env = {**os.environ, "HAILUO_POLL_TIMEOUT_S": "-5", "APIXO_API_KEY": "k"}
    done = cli("run", str(manifest), "--output", str(tmp_path / "o"), env=env)
    assert done.returncode == 2
    assert "invalid setting" in done.stderr and "poll_timeout_s" in done.stderr
    assert not (tmp_path / "o").exists()


def test_run_without_api_key_fails_before_anything_runs(manifest, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "APIXO_API_KEY"}
    done = cli("run", str(manifest), "--output", str(tmp_path / "o"), "--quiet", env=env)
    assert done.returncode == 2
    assert "APIXO_API_KEY" in done.stderr and "--credentials-block" in done.stderr
    assert not (tmp_path / "o").exists()
