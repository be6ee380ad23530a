"""ApixoClient over real HTTP against the project's emulator (hailuo_batch.emulator)."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    ApixoClient,
    ApixoError,
    ApixoTransportError,
    AuthenticationError,
    ForbiddenError,
    GenerateInput,
    GenerateRequest,
    NotFoundError,
    RetryPolicy,
    TaskState,
    TaskStatus,
)
from hailuo_batch.emulator import EmulatorConfig, run_emulator

KEY = "emu-key-7f3a9c1e5b2d4680"
FAST = RetryPolicy(max_attempts=5, max_elapsed_s=30.0, base_s=0.01, max_s=0.05)


@pytest.fixture(scope="module")
def files_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("emu-files")
    buf = io.BytesIO()
    Image.new("RGB", (480, 360), (40, 90, 160)).save(buf, format="PNG")
    (d / "in.png").write_bytes(buf.getvalue())
    return d


@pytest.fixture(scope="module")
def emu(files_dir: Path) -> Iterator[Any]:
    config = EmulatorConfig(
        api_key=KEY,
        port=0,
        time_scale=0.01,
        files_dir=str(files_dir),
        slow_s=1.0,
        seed=7,
    )
    with run_emulator(config) as emulator:
        yield emulator


@pytest.fixture
def client(emu: Any) -> Iterator[ApixoClient]:
    # read timeout below the emulator's 'slow' delay, so 'slow' is a timeout
    timeout = httpx.Timeout(0.5, connect=2.0)
    with ApixoClient(KEY, emu.base_url, timeout=timeout, retry=FAST) as c:
        yield c


def request(emu: Any, prompt: str, **kw: Any) -> GenerateRequest:
    args: dict[str, Any] = {
        "mode": "standard-image-to-video",
        "prompt": prompt,
        "image_urls": [f"{emu.base_url}/files/in.png"],
        "duration": 6,
    }
    args.update(kw)
    return GenerateRequest(input=GenerateInput(**args))


def wait_terminal(client: ApixoClient, task_id: str, limit_s: float = 30.0) -> TaskStatus:
    deadline = time.monotonic() + limit_s
    while True:
        status = client.get_status(task_id)
        if status.is_terminal or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def submissions(emu: Any, req: GenerateRequest) -> int:
    """How many times the emulator created a task for this request's prompt."""
    return int(emu.stats()["submissions_by_prompt"].get(req.input.prompt, 0))


def test_submit_poll_download_and_balance(emu: Any, client: ApixoClient) -> None:
    before = client.get_balance()
    req = request(emu, "happy path parallax")
    task_id = client.submit(req)
    status = wait_terminal(client, task_id)
    assert status.state is TaskState.SUCCESS, status
    assert status.task_id == task_id
    assert len(status.result_urls) == 1
    with client.stream_download(status.result_urls[0], chunk_size=4096) as dl:
        data = b"".join(dl.iter_bytes())
        assert dl.content_length in (None, len(data))
    assert data[4:8] == b"ftyp"  # an MP4 file
    after = client.get_balance()
    assert before - after == pytest.approx(0.19)


def test_a_closed_clients_calls_send_nothing_and_end_a_poll(emu: Any) -> None:
    """A stopping run closes its client while a worker thread may still read or retry: those
    calls say the run is stopping (no httpx RuntimeError, whose traceback Prefect prints), are
    never retried, and end the wait for a task instead of reading on."""
    from hailuo_batch.apixo.errors import ClientClosedError
    from hailuo_batch.polling import read_error_end

    c = ApixoClient(KEY, emu.base_url, retry=FAST)
    before = emu.stats()["submissions"]
    c.close()
    for call in (lambda: c.get_status("task_x"), lambda: c.submit(request(emu, "closed"))):
        with pytest.raises(ClientClosedError, match="the run is stopping") as err:
            call()
        assert err.value.attempts == 1
    assert emu.stats()["submissions"] == before
    assert read_error_end(err.value, 0.0, 60.0, str) is err.value


def test_failed_task_reports_fail_code(emu: Any, client: ApixoClient) -> None:
    task_id = client.submit(request(emu, "doomed [fail:NSFW_DETECTED]"))
    status = wait_terminal(client, task_id)
    assert status.state is TaskState.FAILED
    assert status.fail_code == "NSFW_DETECTED"
    assert status.result_urls == []


def test_rejected_submit_is_forbidden_and_not_retried(emu: Any, client: ApixoClient) -> None:
    req = request(emu, "refused [reject:403]")
    with pytest.raises(ForbiddenError):
        client.submit(req)
    assert submissions(emu, req) <= 1


@pytest.mark.parametrize("kind", ["429", "body429", "503"])
def test_submit_retries_refusals_and_creates_one_task(
    emu: Any, client: ApixoClient, kind: str
) -> None:
    req = request(emu, f"retry after {kind}")
    emu.script_faults("submit", kind, 2)
    task_id = client.submit(req)
    assert wait_terminal(client, task_id).state is TaskState.SUCCESS
    assert submissions(emu, req) == 1


@pytest.mark.parametrize("kind", ["500", "body500", "drop", "drop_after_create", "slow"])
def test_submit_ambiguous_is_raised_not_retried(emu: Any, client: ApixoClient, kind: str) -> None:
    req = request(emu, f"ambiguous after {kind}")
    emu.script_faults("submit", kind, 1)
    with pytest.raises(AmbiguousSubmitError) as ei:
        client.submit(req)
    assert ei.value.attempts == 1
    # at most the one task the faulted request may have created; never a second
    assert submissions(emu, req) <= 1
    if kind == "drop_after_create":
        assert submissions(emu, req) == 1


@pytest.mark.parametrize("kind", ["500", "503", "429", "body500", "body429", "drop", "slow"])
def test_status_retries_transient_faults(emu: Any, client: ApixoClient, kind: str) -> None:
    task_id = client.submit(request(emu, f"status fault {kind}"))
    reads_before = emu.stats()["status_reads"].get(task_id, 0)
    emu.script_faults("status", kind, 2)
    status = client.get_status(task_id)
    assert status.task_id == task_id
    assert emu.stats()["status_reads"].get(task_id, 0) - reads_before >= 1


def test_status_unknown_task_is_not_found(client: ApixoClient) -> None:
    with pytest.raises(NotFoundError):
        client.get_status("task_does_not_exist")


def test_balance_retries(emu: Any, client: ApixoClient) -> None:
    emu.script_faults("balance", "503", 1)
    emu.script_faults("balance", "drop", 1)
    assert isinstance(client.get_balance(), float)


def test_download_retries_open_and_reports_truncation(emu: Any, client: ApixoClient) -> None:
    task_id = client.submit(request(emu, "download faults"))
    status = wait_terminal(client, task_id)
    url = status.result_urls[0]
    emu.script_faults("download", "503", 1)
    emu.script_faults("download", "429", 1)
    with client.stream_download(url) as dl:
        assert b"".join(dl.iter_bytes())[4:8] == b"ftyp"
    emu.script_faults("download", "truncate", 1)
    with pytest.raises(ApixoTransportError), client.stream_download(url, chunk_size=1024) as dl:
        for _ in dl.iter_bytes():
            pass


def test_wrong_key_is_authentication_error(emu: Any) -> None:
    with ApixoClient("wrong-key", emu.base_url, retry=FAST) as bad:
        with pytest.raises(AuthenticationError):
            bad.get_balance()
        with pytest.raises(AuthenticationError):
            bad.submit(request(emu, "never created"))


def test_key_never_leaks_over_real_http(
    emu: Any, client: ApixoClient, caplog: pytest.LogCaptureFixture
) -> None:
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        emu.script_faults("status", "500", 1)
        task_id = client.submit(request(emu, "leak check"))
        client.get_status(task_id)
        emu.script_faults("submit", "drop_after_create", 1)
        with pytest.raises(AmbiguousSubmitError) as ei:
            client.submit(request(emu, "leak check 2"))
        texts += [str(ei.value), repr(ei.value), str(ei.value.cause), repr(ei.value.cause)]
        with pytest.raises(ApixoError) as ei2:
            client.get_status("task_missing")
        texts += [str(ei2.value), repr(ei2.value)]
    texts += [r.getMessage() for r in caplog.records]
    texts += [repr(client)]
    assert any(r.name.startswith("httpcore") for r in caplog.records)  # low-level logs captured
    assert any(r.name == "hailuo_batch.apixo" for r in caplog.records)  # the retry was logged
    assert [t for t in texts if KEY in t] == []
