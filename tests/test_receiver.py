"""The callback receiver over real HTTP on loopback, alone and fed by the apixo emulator."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from hailuo_batch.apixo import ApixoClient, GenerateInput, GenerateRequest, Mode, RequestType
from hailuo_batch.apixo import TaskStatus as ApixoTaskStatus
from hailuo_batch.callbacks import CallbackStore
from hailuo_batch.emulator import EmulatorConfig, EmulatorHandle, run_emulator
from hailuo_batch.receiver import ReceiverConfigError, ReceiverHandle, create_app, run_receiver
from hailuo_batch.settings import Settings

pytestmark = pytest.mark.timeout(60)

TOKEN = "cb-SECRET-token-0123456789abcdef"


def envelope(task_id: str, state: str = "success") -> dict[str, Any]:
    data: dict[str, Any] = {"taskId": task_id, "state": state, "createTime": 1}
    if state == "success":
        data["resultJson"] = json.dumps({"resultUrls": [f"https://r/{task_id}.mp4"]})
    return {"code": 200, "message": "success", "data": data}


def settings_for(store_dir: Path, token: str | None = TOKEN) -> Settings:
    return Settings(
        callback_token=SecretStr(token) if token is not None else None,
        callback_store=str(store_dir),
    )


class CountingStore(CallbackStore):
    """A CallbackStore counting writes; optionally failing its first `fail_first` records."""

    def __init__(self, url: str, fail_first: int = 0) -> None:
        super().__init__(url)
        self.writes = 0
        self.fail_first = fail_first
        self._count_lock = threading.Lock()

    def record(self, task_id: str, body: dict[str, Any]) -> bool:
        with self._count_lock:
            if self.fail_first > 0:
                self.fail_first -= 1
                raise OSError("disk on fire")
        new = super().record(task_id, body)
        with self._count_lock:
            self.writes += int(new)
        return new


def files_on_disk(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "callbacks"


@pytest.fixture
def receiver(store_dir: Path) -> Iterator[ReceiverHandle]:
    with run_receiver(settings_for(store_dir)) as handle:
        yield handle


@pytest.fixture
def http(receiver: ReceiverHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=receiver.base_url, timeout=10) as client:
        yield client


# --- refusals -----------------------------------------------------------------------------------


def _too_big() -> Iterator[bytes]:
    yield b'{"data": {"taskId": "task_big", "state": "success", "pad": "'
    for _ in range(80):
        yield b"x" * 1024
    yield b'"}}'


REFUSED: list[tuple[str, str, str, Any, int]] = [
    ("wrong token", "POST", "/callbacks/cb-SECRET-token-0123456789abcdeX", envelope("t1"), 404),
    ("token prefix", "POST", "/callbacks/cb-SECRET-token", envelope("t1"), 404),
    ("no token", "POST", "/callbacks/", envelope("t1"), 404),
    ("extra segment", "POST", f"/callbacks/{TOKEN}/x", envelope("t1"), 404),
    ("GET on the path", "GET", f"/callbacks/{TOKEN}", None, 405),
    ("PUT on the path", "PUT", f"/callbacks/{TOKEN}", envelope("t1"), 405),
    ("bad JSON", "POST", f"/callbacks/{TOKEN}", b'{"data": {"taskId": ', 400),
    ("JSON list", "POST", f"/callbacks/{TOKEN}", b"[1, 2]", 400),
    ("no taskId", "POST", f"/callbacks/{TOKEN}", {"data": {"state": "success"}}, 400),
    ("unsafe taskId", "POST", f"/callbacks/{TOKEN}", envelope("../../etc/x"), 400),
    ("unknown state", "POST", f"/callbacks/{TOKEN}", envelope("t1", "exploded"), 400),
    ("deep nesting", "POST", f"/callbacks/{TOKEN}", b"[" * 60000, 400),
    ("oversized", "POST", f"/callbacks/{TOKEN}", b'{"pad": "' + b"x" * 70000 + b'"}', 413),
    ("oversized, chunked", "POST", f"/callbacks/{TOKEN}", _too_big, 413),
    ("unknown path", "POST", "/hook", envelope("t1"), 404),
    ("trailing slash", "POST", f"/callbacks/{TOKEN}/", envelope("t1"), 404),
    ("TRACE, wrong token", "TRACE", "/callbacks/nope-nope-nope-nope", None, 404),
    ("PROPFIND, wrong token", "PROPFIND", "/callbacks/nope-nope-nope-nope", None, 404),
    ("PROPFIND on the path", "PROPFIND", f"/callbacks/{TOKEN}", None, 405),
    ("trailing slash, wrong token", "POST", "/callbacks/nope-nope-nope-nope/", envelope("t1"), 404),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [r[1:] for r in REFUSED],
    ids=[r[0] for r in REFUSED],
)
def test_refused_requests_touch_nothing(
    http: httpx.Client,
    receiver: ReceiverHandle,
    store_dir: Path,
    method: str,
    path: str,
    body: Any,
    expected: int,
) -> None:
    if callable(body):
        content: Any = body()
    elif isinstance(body, bytes) or body is None:
        content = body
    else:
        content = json.dumps(body).encode()
    resp = http.request(method, path, content=content)
    assert resp.status_code == expected
    assert TOKEN not in resp.text
    assert receiver.store.task_ids() == set()
    assert files_on_disk(store_dir) == []


def _raw_post(base_url: str, declared: int, sent: bytes) -> socket.socket:
    """A client that declares `declared` body bytes and sends only `sent`."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /callbacks/{TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def test_a_body_that_trickles_in_is_answered_408_and_frees_the_connection(
    store_dir: Path,
) -> None:
    """A client that declares 10 bytes and sends 1 held its handler for as long as it liked."""
    with run_receiver(settings_for(store_dir), body_timeout_s=0.5) as handle:
        with _raw_post(handle.base_url, 10, b"{") as sock:
            answer = sock.recv(200).decode("latin-1")
        assert answer.startswith("HTTP/1.1 408"), answer
        assert handle.store.task_ids() == set()


def test_a_client_that_leaves_mid_body_is_one_log_line_not_a_traceback(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), run_receiver(settings_for(store_dir)) as handle:
        _raw_post(handle.base_url, 100, b'{"data": ').close()
        deadline = time.monotonic() + 10
        while "left before" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "left before its body" in caplog.text
    assert "Traceback" not in caplog.text and "Exception in ASGI" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_wrong_token_looks_like_an_unknown_path(http: httpx.Client) -> None:
    wrong = http.post("/callbacks/nope-nope-nope-nope-nope", json=envelope("t1"))
    unknown = http.post("/nothing-here", json=envelope("t1"))
    assert (wrong.status_code, wrong.text) == (unknown.status_code, unknown.text)


def test_health(http: httpx.Client) -> None:
    resp = http.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


# --- deliveries ---------------------------------------------------------------------------------


def test_a_delivery_is_recorded_and_duplicates_are_harmless(
    http: httpx.Client, receiver: ReceiverHandle, store_dir: Path
) -> None:
    path = f"/callbacks/{TOKEN}"
    resp = http.post(path, json=envelope("task_ok"))
    assert resp.status_code == 200
    assert resp.json() == {"ok": True}
    stored = store_dir / "deliveries" / "task_ok.json"
    first = stored.read_bytes()

    again = http.post(path, json=envelope("task_ok"))
    later_failed = http.post(path, json=envelope("task_ok", "failed"))
    assert again.status_code == later_failed.status_code == 200
    assert stored.read_bytes() == first
    assert files_on_disk(store_dir) == [stored]
    status = receiver.store.get("task_ok")
    assert status is not None and status.result_urls == ["https://r/task_ok.mp4"]


def test_a_delivery_holding_half_a_surrogate_pair_is_recorded(
    http: httpx.Client, receiver: ReceiverHandle
) -> None:
    """`"\\ud800"` is valid JSON (a failMsg cut inside a UTF-16 pair) but not UTF-8: recorded
    escaped, not answered 500 on every retry until the provider gives up delivering."""
    body = '{"code":200,"data":{"taskId":"task_half","state":"failed","failMsg":"cut \\ud800"}}'
    resp = http.post(f"/callbacks/{TOKEN}", content=body.encode("ascii"))
    assert resp.status_code == 200, resp.text
    status = receiver.store.get("task_half")
    assert status is not None and status.state == "failed"


def test_a_failed_recording_answers_500_so_the_provider_retries(store_dir: Path) -> None:
    store = CountingStore(str(store_dir), fail_first=1)
    with (
        run_receiver(settings_for(store_dir), store) as handle,
        httpx.Client(timeout=10) as client,
    ):
        first = client.post(handle.callback_url, json=envelope("task_r"))
        assert first.status_code == 500
        assert store.get("task_r") is None
        second = client.post(handle.callback_url, json=envelope("task_r"))
        assert second.status_code == 200
        assert store.get("task_r") is not None


def test_restart_keeps_recorded_deliveries(store_dir: Path) -> None:
    with run_receiver(settings_for(store_dir)) as first, httpx.Client(timeout=10) as client:
        assert client.post(first.callback_url, json=envelope("task_keep")).status_code == 200
    stored = (store_dir / "deliveries" / "task_keep.json").read_bytes()

    store = CountingStore(str(store_dir))  # a new process would build a new store and app
    with run_receiver(settings_for(store_dir), store) as second, httpx.Client(timeout=10) as c:
        status = second.store.get("task_keep")
        assert status is not None and status.task_id == "task_keep"
        assert c.post(second.callback_url, json=envelope("task_keep")).status_code == 200
        assert c.post(second.callback_url, json=envelope("task_new")).status_code == 200
    assert store.writes == 1  # only task_new
    assert (store_dir / "deliveries" / "task_keep.json").read_bytes() == stored
    assert CallbackStore(str(store_dir)).task_ids() == {"task_keep", "task_new"}


@pytest.mark.parametrize("token", [None, "", "Zq7xK-tooshort", "has space 0123456789abcdef"])
def test_refuses_to_start_without_a_usable_token(store_dir: Path, token: str | None) -> None:
    with pytest.raises(ReceiverConfigError, match="HAILUO_CALLBACK_TOKEN") as info:
        create_app(settings_for(store_dir, token))
    if token:
        assert token not in str(info.value)


def test_logs_never_show_the_token(
    caplog: pytest.LogCaptureFixture, store_dir: Path, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    with run_receiver(settings_for(store_dir)) as handle, httpx.Client(timeout=10) as client:
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # uvicorn set them up
            caplog.set_level(logging.DEBUG, logger=name)
        client.post(handle.callback_url, json=envelope("task_log"))
        client.post(handle.callback_url, json=envelope("task_log"))
        client.post(handle.callback_url, content=b"{oops")
        client.get(handle.callback_url)
        client.post(handle.callback_url.replace(TOKEN, TOKEN[:-1] + "Q"), json=envelope("x"))
        client.get(f"{handle.base_url}/healthz?token={TOKEN}")
        client.get(f"{handle.base_url}/{TOKEN}")
    assert CallbackStore(str(store_dir)).task_ids() == {"task_log"}
    ours = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    lines = [json.loads(r.getMessage()) for r in ours if r.name == "hailuo_batch.receiver"]
    assert len(lines) == 7
    assert [line["recorded"] for line in lines if "recorded" in line] == [True, False]
    assert {line["path"] for line in lines} >= {"/callbacks/<redacted>", "/<redacted>"}
    for record in ours:
        text = record.getMessage() + str(record.args) + str(record.__dict__)
        assert TOKEN not in text
        assert TOKEN[:-1] not in text  # nor a near miss


# --- end to end with the emulator ---------------------------------------------------------------


@pytest.fixture
def emulator_factory(
    tmp_path: Path, make_image: Callable[..., Path]
) -> Iterator[Callable[..., EmulatorHandle]]:
    make_image(640, 480, name="files/in.jpg")
    with ExitStack() as stack:

        def make(**overrides: Any) -> EmulatorHandle:
            settings: dict[str, Any] = {
                "port": 0,
                "time_scale": 0.001,
                "fps": 4,
                "seed": 3,
                "files_dir": str(tmp_path / "files"),
                "cache_dir": str(tmp_path / "video-cache"),
                **overrides,
            }
            return stack.enter_context(run_emulator(EmulatorConfig(**settings)))

        yield make


def submit_callback_tasks(emu: EmulatorHandle, callback_url: str, prompts: list[str]) -> list[str]:
    with ApixoClient("emulator-key", emu.base_url) as client:
        return [
            client.submit(
                GenerateRequest(
                    request_type=RequestType.CALLBACK,
                    callback_url=callback_url,
                    input=GenerateInput(
                        mode=Mode.STANDARD,
                        prompt=prompt,
                        image_urls=[f"{emu.base_url}/files/in.jpg"],
                        duration=6,
                    ),
                )
            )
            for prompt in prompts
        ]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def statuses(emu: EmulatorHandle, task_ids: list[str]) -> dict[str, ApixoTaskStatus]:
    with ApixoClient("emulator-key", emu.base_url) as client:
        return {t: client.get_status(t) for t in task_ids}


def test_emulator_deliveries_with_duplicates_are_recorded_once(
    emulator_factory: Callable[..., EmulatorHandle], store_dir: Path
) -> None:
    emu = emulator_factory(callback_duplicate_rate=1.0)
    store = CountingStore(str(store_dir))
    prompts = ["parallax"] * 4 + ["parallax [fail:CONTENT_VIOLATION]"]
    with run_receiver(settings_for(store_dir), store) as handle:
        task_ids = submit_callback_tasks(emu, handle.callback_url, prompts)
        wait_until(lambda: emu.stats()["callbacks"].get("duplicates", 0) == 5, "duplicates")
        wait_until(lambda: emu.stats()["callbacks"].get("attempts", 0) == 10, "all deliveries")
    assert store.writes == 5
    reader = CallbackStore(str(store_dir))  # what the flow sees
    assert reader.task_ids() == set(task_ids)
    truth = statuses(emu, task_ids)
    recorded = reader.poll_new(set())
    for task_id in task_ids:
        assert recorded[task_id].is_terminal
        assert recorded[task_id].state == truth[task_id].state
        assert recorded[task_id].fail_code == truth[task_id].fail_code
    assert sorted(s.state.value for s in recorded.values()) == ["failed"] + ["success"] * 4


def test_a_receiver_down_at_first_is_caught_up_by_the_retry(
    emulator_factory: Callable[..., EmulatorHandle], store_dir: Path
) -> None:
    # Retries after 0.3 s, 1.2 s and 6 s (scaled by 0.001).
    emu = emulator_factory(callback_retry_s=(300.0, 1200.0, 6000.0))
    with socket.socket() as probe:  # a port with nobody listening yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = settings_for(store_dir)
    callback_url = f"http://127.0.0.1:{port}/callbacks/{TOKEN}"
    task_ids = submit_callback_tasks(emu, callback_url, ["parallax", "parallax"])
    wait_until(lambda: emu.stats()["callbacks"].get("attempts", 0) >= 2, "first attempts")
    assert CallbackStore(str(store_dir)).task_ids() == set()
    with run_receiver(settings, port=port) as handle:
        wait_until(lambda: handle.store.task_ids() == set(task_ids), "retried deliveries")
    callbacks = emu.stats()["callbacks"]
    assert callbacks["delivered"] == 2
    assert callbacks["attempts"] >= 4
    for task_id in task_ids:
        status = CallbackStore(str(store_dir)).get(task_id)
        assert status is not None and status.state.value == "success"


def test_the_start_line_masks_a_token_a_mis_set_base_url_holds() -> None:
    from pydantic import SecretStr

    from hailuo_batch.receiver import _without_token
    from hailuo_batch.settings import Settings

    token = "Zq3vX9kLmTp4RwYb2NcD"
    settings = Settings(callback_token=SecretStr(token))
    shown = _without_token(f"https://hooks.example.com/callbacks/{token}", settings)
    assert shown is not None and token not in shown and shown.endswith("/callbacks/<redacted>")
    assert _without_token("https://hooks.example.com", settings) == "https://hooks.example.com"
