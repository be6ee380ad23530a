"""Callback delivery: retries until HTTP 200, abandonment, loss and duplicates."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from emulator_helpers import submit, task_body, wait_done

pytestmark = pytest.mark.timeout(60)


class Receiver:
    """A tiny webhook receiver answering a scripted sequence of status codes (then 200)."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/secret-token"

    def wait_for(self, count: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < count:
            assert time.monotonic() < deadline, f"only {len(self.bodies)} deliveries"
            time.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _callback_task(make_emulator: Any, receiver: Receiver, prompt: str = "hook", **cfg: Any) -> Any:
    emu = make_emulator(callback_retry_s=(30, 120, 600), time_scale=0.001, **cfg)
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        body = task_body(
            emu.base_url, prompt=prompt, request_type="callback", callback_url=receiver.url
        )
        task_id = submit(c, body)
    return emu, task_id


def test_callback_retries_until_http_200(make_emulator: Any, receiver: Receiver) -> None:
    receiver.answers = [500, 204]  # 204 is not a delivery either
    emu, task_id = _callback_task(make_emulator, receiver)
    receiver.wait_for(3)
    time.sleep(0.7)  # longer than the last retry delay (0.6 s): nothing more comes
    assert len(receiver.bodies) == 3
    payload = receiver.bodies[-1]
    assert payload["code"] == 200 and payload["message"] == "success"
    assert payload["data"]["taskId"] == task_id and payload["data"]["state"] == "success"
    assert json.loads(payload["data"]["resultJson"])["resultUrls"]
    cb = emu.stats()["callbacks"]
    assert (cb["delivered"], cb["failed"], cb["attempts"]) == (1, 0, 3)


def test_failed_task_is_called_back_and_delivery_abandoned(
    make_emulator: Any, receiver: Receiver
) -> None:
    receiver.answers = [500, 500, 500, 500, 500]
    emu, _ = _callback_task(make_emulator, receiver, prompt="x [fail:CONTENT_VIOLATION]")
    receiver.wait_for(4)
    deadline = time.monotonic() + 5
    while emu.stats()["callbacks"]["failed"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert len(receiver.bodies) == 4  # first try + 3 retries, then abandoned
    assert receiver.bodies[0]["data"]["failCode"] == "CONTENT_VIOLATION"
    assert emu.stats()["callbacks"]["delivered"] == 0


def test_duplicate_and_lost_deliveries(make_emulator: Any, receiver: Receiver) -> None:
    emu, task_id = _callback_task(make_emulator, receiver, callback_duplicate_rate=1.0)
    receiver.wait_for(2)
    assert [b["data"]["taskId"] for b in receiver.bodies] == [task_id, task_id]
    assert emu.stats()["callbacks"]["duplicates"] == 1

    receiver.bodies.clear()
    lossy, lost_id = _callback_task(make_emulator, receiver, callback_loss_rate=1.0)
    with httpx.Client(base_url=lossy.base_url, headers={"Authorization": "Bearer k"}) as c:
        assert wait_done(c, lost_id)["state"] == "success"  # the status read still works
    time.sleep(0.2)
    assert receiver.bodies == []
    assert lossy.stats()["callbacks"]["lost"] == 1
