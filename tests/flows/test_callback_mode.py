"""Callback mode end to end: emulator -> receiver -> delivery store -> flow."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hailuo_batch.apixo import RequestType
from hailuo_batch.callbacks import CallbackStore
from hailuo_batch.emulator import EmulatorConfig
from hailuo_batch.receiver import run_receiver
from hailuo_batch.settings import get_settings
from tests.flows.flowkit import generate_videos, items, results_of, served_sha256, write_csv

TOKEN = "cb-token-0123456789-abcdef"
N = 5


@pytest.fixture
def emulator_config(images_dir: Path, request: pytest.FixtureRequest) -> EmulatorConfig:
    extra = getattr(request, "param", {})
    # a 120 s generation takes 1.2 s; callback retries after 0.3 / 1.2 / 6 s
    return EmulatorConfig(
        port=0, time_scale=0.01, fps=4, files_dir=str(images_dir), seed=5, **extra
    )


@pytest.fixture
def receiver(flow_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    store_dir = tmp_path / "callbacks"
    monkeypatch.setenv("HAILUO_CALLBACK_TOKEN", TOKEN)
    monkeypatch.setenv("HAILUO_CALLBACK_STORE", str(store_dir))
    monkeypatch.setenv("HAILUO_CALLBACK_CHECK_S", "0.2")
    get_settings.cache_clear()
    with run_receiver(get_settings(), CallbackStore(str(store_dir))) as handle:
        monkeypatch.setenv("HAILUO_CALLBACK_URL", handle.base_url)
        get_settings.cache_clear()
        yield handle


def _run(tmp_path, images_dir, make_image, emulator, request_type, out="out"):
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, N))
    state = generate_videos(
        manifest=str(m), output=str(tmp_path / out), request_type=request_type, concurrency=N
    )
    assert state.is_completed(), state.message
    res = results_of(state.result())
    assert [r.status for r in res.values()] == ["succeeded"] * N
    for r in res.values():
        assert r.sha256 == served_sha256(emulator.base_url, r.task_id)
    return res


def test_callback_mode_needs_far_fewer_status_reads(
    receiver, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    # same slow generation and the same backstop/poll interval in both modes
    monkeypatch.setenv("HAILUO_POLL_INITIAL_S", "0.3")
    monkeypatch.setenv("HAILUO_POLL_INTERVAL_S", "0.1")
    monkeypatch.setenv("HAILUO_POLL_MAX_INTERVAL_S", "0.1")
    monkeypatch.setenv("HAILUO_CALLBACK_BACKSTOP_S", "30")
    get_settings.cache_clear()
    _run(tmp_path, images_dir, make_image, emulator, RequestType.ASYNC, out="polled")
    polled_reads = emulator.stats()["status_reads_total"]
    emulator.reset_stats()
    res = _run(tmp_path, images_dir, make_image, emulator, RequestType.CALLBACK, out="called")
    stats = emulator.stats()
    assert stats["callbacks"]["delivered"] >= N
    # one confirming status read per task (plus the test's own reads of the result URL)
    assert stats["status_reads_total"] <= 2 * N < polled_reads
    assert set(CallbackStore(str(tmp_path / "callbacks")).task_ids()) >= {
        r.task_id for r in res.values()
    }


@pytest.mark.parametrize("emulator_config", [{"callback_duplicate_rate": 1.0}], indirect=True)
def test_duplicate_callbacks_are_harmless(receiver, emulator, tmp_path, images_dir, make_image):
    res = _run(tmp_path, images_dir, make_image, emulator, RequestType.CALLBACK)
    stats = emulator.stats()
    assert stats["callbacks"]["duplicates"] >= N
    assert stats["submissions"] == N and len({r.video for r in res.values()}) == N


@pytest.mark.parametrize("emulator_config", [{"callback_loss_rate": 1.0}], indirect=True)
def test_lost_callbacks_are_recovered_by_the_backstop(
    receiver, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    monkeypatch.setenv("HAILUO_CALLBACK_BACKSTOP_S", "1")
    get_settings.cache_clear()
    _run(tmp_path, images_dir, make_image, emulator, RequestType.CALLBACK)
    assert emulator.stats()["callbacks"]["delivered"] == 0
    assert not CallbackStore(str(tmp_path / "callbacks")).task_ids()


@pytest.mark.parametrize("emulator_config", [{"processing_s": 300}], indirect=True)
def test_forged_callbacks_change_nothing(
    receiver, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    """A forged success for one of our tasks is checked by a status read and ignored while the
    task still runs; a forged success for a task that is not ours, or a wrong token, is inert."""
    monkeypatch.setenv("HAILUO_CALLBACK_BACKSTOP_S", "30")
    get_settings.cache_clear()
    import threading

    forged: list[int] = []

    def forge() -> None:
        for _ in range(200):
            tasks = emulator.stats()["tasks"]
            if tasks:
                task_id = next(iter(tasks))
                body = {
                    "code": 200,
                    "message": "success",
                    "data": {
                        "taskId": task_id,
                        "state": "success",
                        "createTime": 1,
                        "resultJson": '{"resultUrls": ["https://evil.example/x.mp4"]}',
                    },
                }
                forged.append(httpx.post(receiver.callback_url, json=body).status_code)
                other = {**body, "data": {**body["data"], "taskId": "task_notours"}}
                forged.append(httpx.post(receiver.callback_url, json=other).status_code)
                wrong = receiver.base_url + "/callbacks/wrong-token-0123456789"
                forged.append(httpx.post(wrong, json=body).status_code)
                return
            threading.Event().wait(0.05)

    t = threading.Thread(target=forge)
    t.start()
    res = _run(tmp_path, images_dir, make_image, emulator, RequestType.CALLBACK)
    t.join()
    assert forged == [200, 200, 404]
    assert all("evil" not in (r.video or "") for r in res.values())
    assert emulator.stats()["submissions"] == N


def test_callback_mode_without_settings_fails_before_paying(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    monkeypatch.delenv("HAILUO_CALLBACK_URL", raising=False)
    get_settings.cache_clear()
    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    state = generate_videos(
        manifest=str(m), output=str(tmp_path / "o"), request_type=RequestType.CALLBACK
    )
    assert state.is_failed() and "HAILUO_CALLBACK_URL" in state.message
    assert emulator.stats()["submissions"] == 0
