"""The command line as a user meets it: help, validation report, exit codes, bad settings."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import prefect.settings
import pytest

from hailuo_batch.cli import _prepare_prefect, build_parser, main, options_from
from hailuo_batch.options import BatchOptions
from hailuo_batch.settings import get_settings


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
    for code in ("130 interrupted", "143 stopped (SIGTERM)"):  # every exit a run can end with
        assert code in out


def test_run_defaults_match_the_flow():
    args = build_parser().parse_args(["run", "m.csv"])
    options = options_from(args, BatchOptions)
    assert (options.mode, options.duration, options.provider, options.concurrency) == (
        "standard-image-to-video",
        6,
        "auto",
        10,
    )
    assert options.request_type == "async" and options.max_cost_usd is None
    assert not options.dry_run
    assert options.max_failure_share is None
    assert options == BatchOptions()  # the flow's own defaults


def test_run_flags_are_the_options_fields():
    args = build_parser().parse_args(
        ["run", "m.csv", "--mode", "pro", "--max-cost", "2.5", "-o", "s3://b/p", "--dry-run"]
    )
    options = options_from(args, BatchOptions)
    assert options.mode == "pro-image-to-video" and options.max_cost_usd == 2.5
    assert options.output == "s3://b/p" and options.dry_run
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions}
    assert set(BatchOptions.model_fields) <= flags


def test_failure_share_and_resubmit_lost_are_parsed_and_checked(capsys):
    args = build_parser().parse_args(["run", "m.csv", "--max-failure-share", "0.25"])
    assert args.max_failure_share == 0.25
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "m.csv", "--max-failure-share", "25%"])
    assert exc.value.code == 2 and "not a share from 0 to 1" in capsys.readouterr().err
    rerun = build_parser().parse_args(["rerun", "out/runs/r/results.jsonl", "--resubmit-lost"])
    assert rerun.resubmit_lost
    assert not build_parser().parse_args(["rerun", "out/runs/r/results.jsonl"]).resubmit_lost


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


S3_OUT = "s3://some-bucket/videos"  # validate only reads the form: local images need s3


def test_validate_reports_each_problem_with_row_and_field(manifest, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(manifest), "--output", S3_OUT])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "row 2 (id short), field 'image_url'" in out and "short side" in out.lower()
    assert "row 3 (id dur), field 'duration'" in out  # a bad row keeps its own id
    assert "4 rows, 2 valid, 2 invalid" in out
    assert "$0.51" in out  # 0.19 (6 s) + 0.32 (10 s)


def test_validate_json_and_clean_manifest_exit_zero(tmp_path, make_image, capsys):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"image_url": str(make_image(800, 600)), "prompt": "p"}) + "\n")
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(path), "--json", "--output", S3_OUT])
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
    assert done.stderr.strip().splitlines() == [
        "error: invalid setting HAILUO_POLL_TIMEOUT_S: Input should be greater than 0 (got '-5')"
    ]
    assert not (tmp_path / "o").exists()


def test_run_without_api_key_fails_before_anything_runs(manifest, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "APIXO_API_KEY"}
    done = cli("run", str(manifest), "--output", str(tmp_path / "o"), "--quiet", env=env)
    assert done.returncode == 2
    assert "APIXO_API_KEY" in done.stderr and "--credentials-block" in done.stderr
    assert not (tmp_path / "o").exists()


# --- bad settings and outputs: exit 2, one line, before the manifest is read -------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder; nothing may appear in it (a mistyped output became a folder)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HAILUO_OUTPUT", raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.mark.parametrize(
    "output",
    [
        "s3:/bucket/x",
        "s3:bucket",
        "gs://bucket/x",
        "htp://bucket/x",
        "S3://bucket/x",
        "memory://x",
        "simplecache::s3://bucket/x",
        "",
        "s3://",
        "/",
    ],
)
@pytest.mark.parametrize("command", ["run", "validate", "rerun"])
def test_a_bad_output_exits_2_before_the_manifest_is_read(
    in_tmp: Path, command: str, output: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # the manifest does not exist: reading it first would say so and exit 1
    with pytest.raises(SystemExit) as exc:
        main([command, "missing.csv", "--output", output])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output") and "missing.csv" not in err
    assert len(err.strip().splitlines()) == 1
    assert list(in_tmp.iterdir()) == []


@pytest.mark.parametrize("flag", ["--credentials-block", "--storage-block"])
@pytest.mark.parametrize("command", ["run", "rerun"])
def test_an_empty_block_name_exits_2_and_is_never_read_as_none(
    in_tmp: Path, flag: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "missing.csv", flag, " "])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {flag} is empty: give a block name, or leave it out"


def test_a_bad_hailuo_output_exits_2_for_run(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HAILUO_OUTPUT", "s3:/bucket/x")
    with pytest.raises(SystemExit) as exc:
        main(["run", "missing.csv"])
    assert exc.value.code == 2
    assert "HAILUO_OUTPUT 's3:/bucket/x'" in capsys.readouterr().err
    assert list(in_tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HAILUO_FAILCODE_POLICY", "{not json"),
        ("HAILUO_FAILCODE_POLICY", '{"NSFW": "ignore"}'),
        ("HAILUO_FETCH_TIMEOUT_S", "inf"),
        ("HAILUO_ALLOW_PRIVATE_NETWORKS", "perhaps"),
        ("APIXO_BASE_URL", "api.apixo.ai"),
        ("APIXO_BASE_URL", "http://127.0.0.1:18787?x=1"),
        ("HAILUO_CALLBACK_URL", "https://hooks.example.com/#top"),
    ],
)
def test_a_malformed_setting_is_one_line_and_exit_2(manifest: Path, name: str, value: str) -> None:
    import os

    env = {**os.environ, name: value}
    done = cli("validate", str(manifest), env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: invalid setting {name}")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_misspelt_variable_is_named(in_tmp: Path, monkeypatch, capsys, make_image) -> None:
    monkeypatch.setenv("HAILUO_FETCH_TIMEOUT", "5")
    path = in_tmp / "m.jsonl"
    path.write_text(json.dumps({"image_url": "https://cdn.example.com/a.jpg", "prompt": "p"}))
    monkeypatch.setenv("HAILUO_ALLOW_PRIVATE_NETWORKS", "0")
    with pytest.raises(SystemExit):
        main(["validate", str(path)])
    assert "HAILUO_FETCH_TIMEOUT (did you mean HAILUO_FETCH_TIMEOUT_S?)" in capsys.readouterr().err


def test_validate_and_a_local_output_refuse_local_images(manifest, in_tmp, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(manifest), "--output", str(in_tmp / "out")])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "row 1 (id ok), field 'image_url'" in out and "s3:// output" in out
    assert not (in_tmp / "out").exists()


def test_a_row_breaking_several_rules_counts_once(tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("id,image_url,prompt,duration\na,,,7\n")
    with pytest.raises(SystemExit) as exc:
        main(["validate", str(path), "--output", S3_OUT])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert out.count("row 1 (id a)") == 3  # image_url, prompt, duration
    assert "1 rows, 0 valid, 1 invalid" in out


@pytest.mark.parametrize(
    "bad",
    [["--max-cost", "-1"], ["--max-cost", "nan"], ["--concurrency", "0"], ["--concurrency", "x"]],
)
def test_bad_numbers_are_bad_usage_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["run", "m.csv", *bad])
    assert exc.value.code == 2
    assert "is not" in capsys.readouterr().err


@pytest.mark.parametrize("stderr", [io.StringIO(), None], ids=["a file", "none (pythonw)"])
@pytest.mark.parametrize(("preset", "expected"), [(None, "false"), ("true", "true")])
def test_logs_to_a_file_are_not_highlighted_unless_asked(
    preset: str | None, expected: str, stderr: io.StringIO | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_LOGGING_COLORS", "unset")  # put back as it was after the test
    if preset is None:
        monkeypatch.delenv("PREFECT_LOGGING_COLORS")
    else:
        monkeypatch.setenv("PREFECT_LOGGING_COLORS", preset)
    monkeypatch.setattr(sys, "stderr", stderr)  # not a terminal: a log file, or none at all
    with prefect.settings.temporary_settings({prefect.settings.PREFECT_API_URL: "http://x/api"}):
        _prepare_prefect(quiet=False)
    assert os.environ["PREFECT_LOGGING_COLORS"] == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "/tmp/m\udcff.csv"],
        ["rerun", "results.jsonl", "--prompt-suffix", "\udcff"],
        ["rerun", "results.jsonl", "--id", "a\udc80b"],
    ],
)
def test_an_argument_that_is_not_utf8_is_refused_with_exit_2(argv, capsys):
    """Bytes the terminal did not send as UTF-8 reach Python as surrogates that no file name,
    log line or API call can take: refused up front, naming the argument."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "is not valid UTF-8" in err and "Traceback" not in err


def _many_invalid_rows(tmp_path: Path, n: int = 5000) -> Path:
    m = tmp_path / "many.csv"
    rows = "".join(f"r{i},ftp://x/{i}.jpg,p\n" for i in range(n))  # refused before any I/O
    m.write_text("id,image_url,prompt\n" + rows)
    return m


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`hailuo-batch validate m.csv | head -1`: the reader leaves, the command stops, no
    traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hailuo_batch.cli", "validate", str(_many_invalid_rows(tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader leaves
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]


def test_output_to_a_full_device_is_one_error_line(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("this system has no /dev/full")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "hailuo_batch.cli", "validate", str(_many_invalid_rows(tmp_path))],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert "error:" in done.stderr and "No space left" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["run", "--help"], ["rerun", "--help"], ["validate", "--help"],
     ["emulator", "--help"], ["receiver", "--help"]],
)  # fmt: skip
@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_help_that_cannot_be_written_is_an_error_not_a_success(argv, unbuffered):
    """argparse drops help it cannot write and exits 0: a script checking the exit code would
    take a full disk for success. Buffered or not, it is one error line and exit 1."""
    if not os.path.exists("/dev/full"):
        pytest.skip("this system has no /dev/full")
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "hailuo_batch.cli", *argv],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, check=False, env=env,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("error:") == 1 and "No space left" in done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr


def test_a_usage_error_is_exit_2_even_when_stderr_cannot_take_it():
    if not os.path.exists("/dev/full"):
        pytest.skip("this system has no /dev/full")
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "hailuo_batch.cli", "no-such-command"],
            stdout=subprocess.PIPE, stderr=full, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 2


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["emulator", "--balance", "nan"], "not a finite number"),
        (["emulator", "--time-scale", "inf"], "not a finite number"),
        (["emulator", "--fault-rate", "1e309"], "not a finite number"),
        (["emulator", "--port", "99999"], "not a port"),
        (["receiver", "--port", "-1"], "not a port"),
        (["emulator", "--time-scale", "-1"], "--time-scale:"),
        (["emulator", "--fault-rate", "2"], "--fault-rate:"),
        (["emulator", "--host", "host.invalid", "--port", "0"], "cannot serve on host.invalid"),
        (["emulator", "--host", "\u00e4..x", "--port", "0"], "not a valid host name"),
        (["emulator", "--balance", "1e308"], "--balance: Input should be less than"),
        (["emulator", "--balance", "-1"], "--balance: Input should be greater than"),
        (["emulator", "--files-dir", "/no/such/folder"], "--files-dir: '/no/such/folder' does not"),
        (["emulator", "--files-dir", "/dev/null"], "--files-dir: '/dev/null' is not a folder"),
    ],
)
def test_bad_server_flags_are_one_line_and_exit_2(argv, says):
    done = cli(*argv)
    assert done.returncode == 2, done.stderr[-2000:]
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_a_server_on_a_port_already_taken_says_so(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        emulator = cli("emulator", "--port", port)
        env = {**os.environ, "HAILUO_CALLBACK_TOKEN": "t" * 40,
               "HAILUO_CALLBACK_STORE": str(tmp_path / "callbacks")}  # fmt: skip
        receiver = cli("receiver", "--port", port, env=env)
    for done in (emulator, receiver):
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Address already in use" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["\u00e4..x", "\u00e4" * 70, "a" * 64 + ".example"])
def test_a_receiver_host_no_resolver_could_take_is_one_line(tmp_path, host):
    env = {**os.environ, "HAILUO_CALLBACK_TOKEN": "t" * 40,
           "HAILUO_CALLBACK_STORE": str(tmp_path / "callbacks")}  # fmt: skip
    done = cli("receiver", "--host", host, "--port", "0", env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("suffix", ["\x07", "ok\x00", "x" * 100_001])
def test_a_prompt_suffix_that_no_prompt_could_hold_is_a_bad_flag(suffix, capsys):
    """Appended to every rerun prompt: refused up front, naming the flag, rather than making
    every item invalid."""
    with pytest.raises(SystemExit) as done:
        main(["rerun", "results.jsonl", "--prompt-suffix", suffix])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--prompt-suffix" in err and "Traceback" not in err


def test_validate_json_reports_a_whole_file_problem_as_json(tmp_path, capsys):
    """A script that reads `validate --json` gets JSON on stdout for a file it cannot use too."""
    (tmp_path / "empty.csv").write_text("id,image_url,prompt\n")
    with pytest.raises(SystemExit) as done:
        main(["validate", str(tmp_path / "empty.csv"), "--json"])
    assert done.value.code == 1
    out = json.loads(capsys.readouterr().out)
    assert out["manifest"].endswith("empty.csv") and "has no rows" in out["error"]


@pytest.mark.parametrize("under", ["", "/sub"])
def test_a_receiver_whose_store_is_a_file_names_the_store_not_the_port(tmp_path, under):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    env = {**os.environ, "HAILUO_CALLBACK_TOKEN": "t" * 40,
           "HAILUO_CALLBACK_STORE": f"{afile}{under}"}  # fmt: skip
    done = cli("receiver", "--port", "0", env=env)
    assert done.returncode == 2, done.stderr
    assert "HAILUO_CALLBACK_STORE" in done.stderr and "cannot start on" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["validate", "{manifest}"]])
def test_a_closed_stdout_is_no_traceback(tmp_path, argv):
    """`hailuo-batch ... >&-`: Python starts with no sys.stdout at all."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image_url,prompt\na,https://example.com/a.jpg,p\n")
    args = [a.format(manifest=manifest) for a in argv]
    done = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.close(1); sys.stdout = None; "
         "from hailuo_batch.cli import main; main(sys.argv[1:])", *args],
        stderr=subprocess.PIPE, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert "Traceback" not in done.stderr and "AttributeError" not in done.stderr, done.stderr
    assert done.returncode in (0, 1)


def test_a_stream_that_cannot_encode_a_character_writes_an_escape(tmp_path):
    """`PYTHONIOENCODING=ascii` (or the POSIX locale without coercion): a row naming `café`
    is still reported, with the character escaped, not a UnicodeEncodeError."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image_url,prompt\ncafé,https://example.com/a.jpg,p\n", "utf-8")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run(
        [sys.executable, "-m", "hailuo_batch.cli", "validate", str(manifest)],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    text = done.stdout + done.stderr
    assert "Traceback" not in text and "UnicodeEncodeError" not in text, text
    assert "caf\\xe9" in text and done.returncode == 1


@pytest.fixture
def silent_server() -> str:
    """An http base URL whose server accepts every connection and never answers."""
    import socket
    import threading

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                held.append(sock.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("name", ["hang.csv", "hang.json"])
def test_a_manifest_url_that_never_answers_is_given_up_on_and_named(
    silent_server: str, name: str
) -> None:
    """`validate http://.../hang.csv` (and a run) waited forever: fsspec's http reader has no
    time limit. HAILUO_FETCH_TIMEOUT_S now bounds each request, and the error says what to check."""
    import time

    env = {**os.environ, "HAILUO_FETCH_TIMEOUT_S": "1"}
    began = time.monotonic()
    done = cli("validate", f"{silent_server}/{name}", env=env)
    assert time.monotonic() - began < 30
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: manifest {silent_server}/{name} did not answer within 1 s")
    assert "HAILUO_FETCH_TIMEOUT_S" in line and "server is up" in line


def test_a_misspelt_apixo_variable_is_named(in_tmp: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("APIXO_BASE_UR", "http://127.0.0.1:18787")
    path = in_tmp / "m.jsonl"
    path.write_text(json.dumps({"image_url": "https://cdn.example.com/a.jpg", "prompt": "p"}))
    with pytest.raises(SystemExit):
        main(["validate", str(path)])
    err = capsys.readouterr().err
    assert "warning: APIXO_BASE_UR (did you mean APIXO_BASE_URL?) is not a setting" in err


@pytest.mark.parametrize("under", ["", "/sub"])
@pytest.mark.parametrize("where", ["--output", "HAILUO_OUTPUT", "HAILUO_CALLBACK_STORE"])
def test_an_output_that_is_a_file_is_refused_before_anything_starts(
    manifest: Path, tmp_path: Path, where: str, under: str
) -> None:
    """`run m.json --output some-file` said, after a Prefect server had started, 'the run could
    not start (FileExistsError: ...)'. It is now a bad setting, before anything starts."""
    afile = tmp_path / "a-file"
    afile.write_text("x")
    target = f"{afile}{under}"
    env = {**os.environ, "APIXO_API_KEY": "k", "APIXO_BASE_URL": "http://127.0.0.1:9"}
    argv = ["run", str(manifest), "-q", "--dry-run"]
    if where == "--output":
        argv += ["--output", target]
    else:
        env[where] = target
        argv += [] if where == "HAILUO_OUTPUT" else ["--output", str(tmp_path / "out")]
    env.pop("PREFECT_API_URL", None)
    done = cli(*argv, env=env)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()  # no note of a temporary Prefect server either
    what = "is a file" if not under else f"is inside {str(afile)!r}, which is a file"
    assert f"{where} {target!r} {what}: it must be a folder" in line
    assert afile.read_text() == "x" and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("api", "says"),
    [
        ("http://127.0.0.1:1/api", "the Prefect API at http://127.0.0.1:1/api/ did not answer"),
        ("garbage", "PREFECT_API_URL 'garbage' is not an http(s) URL"),
    ],
)
def test_an_unreachable_or_malformed_prefect_api_is_one_line_and_exit_2(
    manifest: Path, tmp_path: Path, api: str, says: str
) -> None:
    """A ~100-line traceback ending 'RuntimeError: Failed to reach API at ...' and exit 1 were
    all a person got; now one line says what to do, and nothing was paid."""
    env = {**os.environ, "PREFECT_API_URL": api, "APIXO_API_KEY": "k",
           "APIXO_BASE_URL": "http://127.0.0.1:9"}  # fmt: skip
    done = cli("run", str(manifest), "-o", str(tmp_path / "out"), "-q", "--dry-run", env=env)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {says}")
    assert "unset PREFECT_API_URL" in line and "run on a temporary server" in line
    assert not (tmp_path / "out").exists()
