"""Each fault kind as a plain HTTP client sees it; scripted and random faults; HTTP control."""

from __future__ import annotations

import gzip
import io
import json
import time
from typing import Any

import httpx
import pytest
from emulator_helpers import BALANCE, STATUS, SUBMIT, submit, task_body, wait_done

from hailuo_batch.emulator import EmulatorHandle
from hailuo_batch.video import NotAVideoError, verify_mp4

pytestmark = pytest.mark.timeout(60)

DROPPED = (httpx.RemoteProtocolError, httpx.ReadError)


@pytest.mark.parametrize(("kind", "code"), [("500", 500), ("503", 503), ("429", 429)])
@pytest.mark.parametrize("route", ["submit", "status", "balance"])
def test_status_code_faults(
    emu: EmulatorHandle, client: httpx.Client, route: str, kind: str, code: int
) -> None:
    task_id = submit(client, task_body(emu.base_url))
    emu.script_faults(route, kind)
    resp = _call(client, emu, route, task_id)
    assert resp.status_code == code
    assert resp.json()["code"] == code and resp.json()["data"] is None
    if code == 429:
        assert float(resp.headers["Retry-After"]) > 0
    assert _call(client, emu, route, task_id).status_code == 200  # only the next request
    assert emu.stats()["faults"] == {kind: 1}


@pytest.mark.parametrize(("kind", "code"), [("body500", 500), ("body429", 429)])
def test_body_coded_faults_answer_http_200(
    emu: EmulatorHandle, client: httpx.Client, kind: str, code: int
) -> None:
    emu.script_faults("submit", kind)
    resp = client.post(SUBMIT, json=task_body(emu.base_url))
    assert resp.status_code == 200
    assert resp.json()["code"] == code
    assert emu.stats()["submissions"] == 0


@pytest.mark.parametrize("route", ["submit", "status", "balance"])
def test_drop_closes_the_connection_without_answer(
    emu: EmulatorHandle, client: httpx.Client, route: str
) -> None:
    task_id = submit(client, task_body(emu.base_url))
    emu.script_faults(route, "drop")
    with pytest.raises(DROPPED):
        _call(client, emu, route, task_id)
    assert emu.stats()["submissions"] == 1  # a dropped submit created nothing
    assert _call(client, emu, route, task_id).status_code == 200


def test_drop_after_create_bills_a_task_the_client_never_hears_of(
    emu: EmulatorHandle, client: httpx.Client
) -> None:
    emu.script_faults("submit", "drop_after_create")
    with pytest.raises(DROPPED):
        client.post(SUBMIT, json=task_body(emu.base_url, prompt="ghost"))
    stats = emu.stats()
    assert stats["submissions_by_prompt"] == {"ghost": 1}
    assert stats["balance_usd"] == pytest.approx(1000 - 0.19)
    assert stats["faults"] == {"drop_after_create": 1}


def test_slow_fault_delays_then_answers(make_emulator: Any) -> None:
    emu = make_emulator(slow_s=0.5)
    emu.script_faults("any", "slow")
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.get(BALANCE, timeout=0.1)
        emu.script_faults("balance", "slow")
        assert c.get(BALANCE, timeout=5).json()["code"] == 200
    assert emu.stats()["faults"] == {"slow": 2}


def test_download_faults(emu: EmulatorHandle, client: httpx.Client) -> None:
    data = wait_done(client, submit(client, task_body(emu.base_url)))
    url = json.loads(data["resultJson"])["resultUrls"][0]
    emu.script_faults("download", "truncate")
    with pytest.raises(DROPPED):
        httpx.get(url)
    emu.script_faults("download", "drop")
    with pytest.raises(DROPPED):
        httpx.get(url)
    emu.script_faults("download", "503")
    assert httpx.get(url).status_code == 503
    full = httpx.get(url)
    assert full.status_code == 200 and len(full.content) == int(full.headers["content-length"])


def test_random_faults_follow_the_rate_and_the_seed(make_emulator: Any) -> None:
    def run() -> tuple[list[str], dict[str, int]]:
        emu = make_emulator(fault_rate=0.3, seed=42, slow_s=0.01)
        outcomes = []
        with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
            for _ in range(60):
                try:
                    resp = c.get(BALANCE)
                    outcomes.append(f"{resp.status_code}/{resp.json()['code']}")
                except DROPPED:
                    outcomes.append("dropped")
        return outcomes, emu.stats()["faults"]

    first, faults = run()
    again, _ = run()
    assert first == again  # same seed, same faults
    assert 5 <= sum(faults.values()) <= 35
    assert sum(1 for o in first if o != "200/200") == sum(
        n for kind, n in faults.items() if kind != "slow"
    )


def test_control_endpoints_over_http(emu: EmulatorHandle, client: httpx.Client) -> None:
    with httpx.Client(base_url=emu.base_url) as ctl:
        assert ctl.post("/_emulator/faults", json={"route": "balance", "kind": "503"}).json()["ok"]
        assert ctl.post("/_emulator/faults", json={"route": "x", "kind": "503"}).status_code == 400
        assert (
            ctl.post("/_emulator/faults", json={"route": "any", "kind": "boom"}).status_code == 400
        )
        assert client.get(BALANCE).status_code == 503
        assert ctl.post("/_emulator/balance", json={"usd": 0.1}).json()["balance_usd"] == 0.1
        assert client.post(SUBMIT, json=task_body(emu.base_url)).status_code == 402
        stats = ctl.get("/_emulator/stats").json()
        assert stats["faults"] == {"503": 1} and stats["balance_usd"] == 0.1
        ctl.post("/_emulator/faults", json={"route": "status", "kind": "500", "count": 3})
        ctl.delete("/_emulator/faults")
        assert ctl.post("/_emulator/reset").json()["ok"]
        assert ctl.get("/_emulator/stats").json()["faults"] == {}
    assert client.get(STATUS, params={"taskId": "task_nope"}).status_code == 404


def _call(client: httpx.Client, emu: EmulatorHandle, route: str, task_id: str) -> httpx.Response:
    if route == "submit":
        return client.post(SUBMIT, json=task_body(emu.base_url, prompt=f"p{time.monotonic()}"))
    if route == "status":
        return client.get(STATUS, params={"taskId": task_id})
    return client.get(BALANCE)


# --- bad result bodies --------------------------------------------------------------------------


@pytest.fixture
def result_url(emu: EmulatorHandle, client: httpx.Client) -> str:
    data = wait_done(client, submit(client, task_body(emu.base_url)))
    return str(json.loads(data["resultJson"])["resultUrls"][0])


def test_html_body_is_an_error_page_with_status_200(emu: EmulatorHandle, result_url: str) -> None:
    emu.script_faults("download", "html_body")
    resp = httpx.get(result_url)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.text.lstrip().lower().startswith("<!doctype html>")
    with pytest.raises(NotAVideoError, match="not an MP4 container"):
        verify_mp4(io.BytesIO(resp.content))
    assert emu.stats()["faults"] == {"html_body": 1}
    assert _good_video(result_url)  # only the next download


def test_empty_body_has_length_zero(emu: EmulatorHandle, result_url: str) -> None:
    emu.script_faults("download", "empty_body")
    resp = httpx.get(result_url)
    assert resp.status_code == 200
    assert resp.headers["content-length"] == "0" and resp.content == b""
    assert resp.headers["content-type"] == "video/mp4"


def test_cut_body_ends_early_without_any_sign_of_it(emu: EmulatorHandle, result_url: str) -> None:
    full = _good_video(result_url)
    emu.script_faults("download", "cut_body")
    with httpx.Client() as c:  # no exception: nothing tells the client the body is short
        resp = c.get(result_url)
    assert resp.status_code == 200
    assert "content-length" not in resp.headers and "transfer-encoding" not in resp.headers
    assert 0 < len(resp.content) < len(full) and full.startswith(resp.content)
    with pytest.raises(NotAVideoError, match="truncated"):
        verify_mp4(io.BytesIO(resp.content))


def test_gzip_body_is_the_real_video_compressed(emu: EmulatorHandle, result_url: str) -> None:
    full = _good_video(result_url)
    emu.script_faults("download", "gzip_body")
    with httpx.Client() as c, c.stream("GET", result_url) as resp:
        raw = b"".join(resp.iter_raw())
    assert resp.status_code == 200 and resp.headers["content-encoding"] == "gzip"
    assert int(resp.headers["content-length"]) == len(raw)  # the length of the encoded bytes
    assert gzip.decompress(raw) == full
    emu.script_faults("download", "gzip_body")
    decoded = httpx.get(result_url).content  # a client decodes it transparently
    assert decoded == full
    assert verify_mp4(io.BytesIO(decoded)).frames > 0


@pytest.mark.parametrize("kind", ["html_body", "empty_body", "cut_body", "gzip_body"])
def test_bad_body_faults_leave_refusals_alone(
    emu: EmulatorHandle, result_url: str, kind: str
) -> None:
    """A bad signature is still answered 403 with its envelope, whatever the body fault."""
    emu.script_faults("download", kind)
    resp = httpx.get(result_url.replace("sig=", "sig=0"))
    assert resp.status_code == 403 and resp.json()["code"] == 403


def _good_video(url: str) -> bytes:
    resp = httpx.get(url)
    assert resp.status_code == 200 and resp.headers["content-type"] == "video/mp4"
    assert len(resp.content) == int(resp.headers["content-length"])
    return resp.content


# --- answers that cannot be trusted and forgotten tasks -----------------------------------------


@pytest.mark.parametrize(("kind", "code"), [("401", 401), ("404", 404)])
def test_scripted_401_and_404(
    emu: EmulatorHandle, client: httpx.Client, kind: str, code: int
) -> None:
    task_id = submit(client, task_body(emu.base_url))
    emu.script_faults("status", kind)
    resp = _call(client, emu, "status", task_id)
    assert resp.status_code == code and resp.json()["code"] == code
    assert _call(client, emu, "status", task_id).status_code == 200


def test_hostile_status_answers(emu: EmulatorHandle, client: httpx.Client) -> None:
    task_id = submit(client, task_body(emu.base_url))
    seen = {}
    for kind in ("bad_status", "foreign_task", "unknown_state", "html200"):
        emu.script_faults("status", kind)
        resp = _call(client, emu, "status", task_id)
        assert resp.status_code == 200
        seen[kind] = resp
    bad = seen["bad_status"].json()["data"]
    assert isinstance(bad["costTime"], dict) and isinstance(bad["createTime"], list)
    assert seen["foreign_task"].json()["data"]["taskId"] != task_id
    assert seen["unknown_state"].json()["data"]["state"] == "finished"
    assert seen["html200"].headers["content-type"].startswith("text/html")
    assert b"<html>" in seen["html200"].content
    honest = _call(client, emu, "status", task_id).json()["data"]
    assert honest["taskId"] == task_id and honest["state"] in ("pending", "processing", "success")


def test_hostile_random_draw_includes_bad_answers(make_emulator: Any) -> None:
    emu = make_emulator(fault_rate=1.0, seed=7, hostile_faults=True, slow_s=0.01)  # no 2 s waits
    with httpx.Client(base_url=emu.base_url, headers={"Authorization": "Bearer k"}) as c:
        for _ in range(80):
            try:
                c.get(STATUS, params={"taskId": "task_x"})
            except DROPPED:
                pass
    kinds = set(emu.stats()["faults"])
    assert kinds & {"bad_status", "foreign_task", "unknown_state", "html200"}
