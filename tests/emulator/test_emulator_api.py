"""The request side of the contract: auth, validation, envelopes, balance, concurrency."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from emulator_helpers import BALANCE, STATUS, SUBMIT, read, submit, task_body

from hailuo_batch.emulator import EmulatorHandle

pytestmark = pytest.mark.timeout(60)


def _error(resp: httpx.Response, code: int) -> dict[str, Any]:
    """The refusal envelope, with the same code in the status line and the body."""
    assert resp.status_code == code, resp.text
    body: dict[str, Any] = resp.json()
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert body["data"] is None or isinstance(body["data"]["error"], str)
    return body


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic a2V5"}, {"Authorization": "k"}])
def test_missing_key_is_401_on_every_endpoint(emu: EmulatorHandle, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=emu.base_url, headers=headers) as c:
        _error(c.post(SUBMIT, json=task_body(emu.base_url)), 401)
        _error(c.get(STATUS, params={"taskId": "task_x"}), 401)
        _error(c.get(BALANCE), 401)
    assert emu.stats()["submissions"] == 0


def test_configured_key_is_the_only_one_accepted(make_emulator: Any) -> None:
    emu = make_emulator(api_key="right-key")
    with httpx.Client(base_url=emu.base_url) as c:
        wrong = c.get(BALANCE, headers={"Authorization": "Bearer wrong-key"})
        body = _error(wrong, 401)
        assert "key" not in str(body["data"])  # the key is never echoed
        right = c.get(BALANCE, headers={"Authorization": "Bearer right-key"})
        assert right.json() == {"code": 200, "message": "success", "data": 1000.0}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b["input"].update(mode="text-to-video"), "Invalid mode type"),
        (lambda b: b["input"].update(duration=7), "duration"),
        (lambda b: b["input"].update(duration="eight"), "duration"),
        (lambda b: b["input"].pop("duration"), "duration"),
        (lambda b: b["input"].update(prompt="  "), "prompt"),
        (lambda b: b["input"].update(image_urls=[]), "image_urls"),
        (
            lambda b: b["input"].update(image_urls=["http://a/1.jpg", "http://a/2.jpg"]),
            "image_urls",
        ),
        (lambda b: b["input"].update(image_urls=["ftp://a/1.jpg"]), "image_urls"),
        (lambda b: b.update(provider="cheapest"), "provider"),
        (lambda b: b.update(request_type="sync"), "request_type"),
        (lambda b: b.update(request_type="callback"), "callback_url"),
        (lambda b: b.update(callback_url="http://hook.example/cb"), "callback_url"),
        (lambda b: b.pop("input"), "input"),
    ],
)
def test_invalid_bodies_are_400_with_the_reason(
    emu: EmulatorHandle, client: httpx.Client, mutate: Any, message: str
) -> None:
    body = task_body(emu.base_url)
    mutate(body)
    refused = _error(client.post(SUBMIT, json=body), 400)
    assert message in refused["message"]
    assert message in refused["data"]["error"]
    assert emu.stats()["submissions"] == 0
    assert emu.stats()["balance_usd"] == 1000.0


def test_non_json_body_is_400(client: httpx.Client) -> None:
    _error(
        client.post(SUBMIT, content=b"{not json", headers={"Content-Type": "application/json"}), 400
    )


@pytest.mark.parametrize("duration", [6, 10, "6", "10", 10.0])
def test_duration_accepts_numbers_and_numeric_strings(
    emu: EmulatorHandle, client: httpx.Client, duration: Any
) -> None:
    submit(client, task_body(emu.base_url, duration=duration))


def test_pro_ignores_duration_and_callback_mode_needs_url(
    emu: EmulatorHandle, client: httpx.Client
) -> None:
    submit(client, task_body(emu.base_url, mode="pro-image-to-video", duration="whatever"))
    body = task_body(emu.base_url, request_type="callback", callback_url="http://127.0.0.1:9/cb")
    task_id = submit(client, body)
    assert task_id.startswith("task_") and len(task_id) > 10


def test_unknown_task_and_unknown_model_are_404(client: httpx.Client, emu: EmulatorHandle) -> None:
    _error(client.get(STATUS, params={"taskId": "task_doesnotexist"}), 404)
    _error(client.post("/api/v1/generateTask/sora-9", json=task_body(emu.base_url)), 404)
    _error(client.get(STATUS), 400)


def test_billing_by_mode_and_duration_then_402(make_emulator: Any) -> None:
    emu = make_emulator(balance_usd=1.0)
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        submit(c, task_body(emu.base_url, prompt="a", duration=6))  # 0.19
        submit(c, task_body(emu.base_url, prompt="b", duration="10"))  # 0.32
        submit(c, task_body(emu.base_url, prompt="c", mode="pro-image-to-video"))  # 0.33
        assert c.get(BALANCE).json()["data"] == pytest.approx(0.16)
        refused = _error(c.post(SUBMIT, json=task_body(emu.base_url, prompt="d")), 402)
        assert "insufficient balance" in refused["message"]
        emu.set_balance(5)
        submit(c, task_body(emu.base_url, prompt="e"))
        assert c.get(BALANCE).json()["data"] == pytest.approx(4.81)
    stats = emu.stats()
    assert stats["submissions"] == 4
    assert stats["rejected"]["402"] == 1


@pytest.mark.parametrize("usd", ["nan", "inf", "-1", "1e308", "x", None, 10**400, [[[[1]]]]])
def test_a_balance_the_emulator_cannot_hold_is_400(client: httpx.Client, usd: Any) -> None:
    before = client.get(BALANCE).json()["data"]
    answer = client.post("/_emulator/balance", json={"usd": usd})
    assert answer.status_code == 400 and answer.json()["ok"] is False
    assert client.get(BALANCE).json()["data"] == before


def test_concurrency_limit_answers_429_with_retry_after(make_emulator: Any) -> None:
    emu = make_emulator(concurrency=2, time_scale=0.01, queue_s=1000)  # pending for 10 s
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        submit(c, task_body(emu.base_url, prompt="1"))
        submit(c, task_body(emu.base_url, prompt="2"))
        resp = c.post(SUBMIT, json=task_body(emu.base_url, prompt="3"))
        _error(resp, 429)
        assert 9 < float(resp.headers["Retry-After"]) <= 13  # until the first task ends
        # another key has its own limit
        other = c.post(
            SUBMIT, json=task_body(emu.base_url, prompt="4"), headers={"Authorization": "Bearer z"}
        )
        assert other.status_code == 200
    stats = emu.stats()
    assert stats["rejected_429"] == 1
    assert stats["peak_in_flight"] == 3
    assert stats["in_flight"] == 3
    assert stats["balance_usd"] == pytest.approx(1000 - 3 * 0.19)


def test_reject_markers_refuse_the_create_call(emu: EmulatorHandle, client: httpx.Client) -> None:
    _error(client.post(SUBMIT, json=task_body(emu.base_url, prompt="nope [reject:403]")), 403)
    _error(client.post(SUBMIT, json=task_body(emu.base_url, prompt="bad [reject:400]")), 400)
    stats = emu.stats()
    assert stats["submissions"] == 0 and stats["balance_usd"] == 1000.0
    assert stats["rejected"] == {"403": 1, "400": 1}


def test_status_answer_has_contract_fields_while_pending(make_emulator: Any) -> None:
    emu = make_emulator(time_scale=0.01, queue_s=1000)
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        task_id = submit(c, task_body(emu.base_url))
        resp = c.get(STATUS, params={"taskId": task_id})
        assert resp.json()["code"] == 200 and resp.json()["message"] == "success"
        data = read(c, task_id)
    assert data["taskId"] == task_id
    assert data["state"] == "pending"
    assert isinstance(data["createTime"], int) and data["createTime"] > 1_600_000_000_000
    assert "resultJson" not in data and "failCode" not in data
    assert emu.stats()["status_reads"] == {task_id: 2}
