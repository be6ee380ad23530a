"""CallbackStore: idempotent recording by taskId, safe keys, cheap polling; local and S3."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from hailuo_batch.apixo import TaskState
from hailuo_batch.callbacks import CallbackStore, callback_mode, callback_url_for
from hailuo_batch.settings import Settings

TOKEN = "tok-0123456789abcdefXYZ"


def envelope(task_id: str, state: str = "success", **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"taskId": task_id, "state": state, "createTime": 1, **data}
    if state == "success":
        body.setdefault("resultJson", json.dumps({"resultUrls": [f"https://r/{task_id}.mp4"]}))
    if state == "failed":
        body.setdefault("failCode", "CONTENT_VIOLATION")
        body.setdefault("failMsg", "refused")
    return {"code": 200, "message": "success", "data": body}


@pytest.fixture
def store(tmp_path: Path) -> CallbackStore:
    return CallbackStore(str(tmp_path / "callbacks"))


def test_callback_url_for_appends_the_token_path() -> None:
    assert callback_url_for("https://hooks.example.com/", TOKEN) == (
        f"https://hooks.example.com/callbacks/{TOKEN}"
    )
    assert callback_url_for("https://h.example.com/prefix", TOKEN).endswith(
        f"/prefix/callbacks/{TOKEN}"
    )


@pytest.mark.parametrize(
    ("base", "token"),
    [
        ("https://h.example.com", "Zq7xK"),
        ("https://h.example.com", "has/slash-0123456789abc"),
        ("https://h.example.com", ""),
        ("ftp://h.example.com", TOKEN),
        ("h.example.com", TOKEN),
        ("https://h.example.com/?q=1", TOKEN),
    ],
)
def test_callback_url_for_refuses_bad_input_without_echoing_the_token(
    base: str, token: str
) -> None:
    with pytest.raises(ValueError) as info:
        callback_url_for(base, token)
    if token:
        assert token not in str(info.value)


def test_record_then_get_and_duplicates_are_not_rewritten(store: CallbackStore) -> None:
    assert store.get("task_a") is None
    assert store.record("task_a", envelope("task_a")) is True
    path = Path(store.url) / "deliveries" / "task_a.json"
    first = path.read_bytes()

    assert store.record("task_a", envelope("task_a")) is False
    assert store.record("task_a", envelope("task_a", "failed")) is False  # first terminal kept
    assert path.read_bytes() == first
    status = store.get("task_a")
    assert status is not None
    assert status.state == TaskState.SUCCESS
    assert status.result_urls == ["https://r/task_a.mp4"]
    assert store.task_ids() == {"task_a"}


def test_a_terminal_delivery_replaces_a_non_terminal_one(store: CallbackStore) -> None:
    assert store.record("task_b", envelope("task_b", "processing")) is True
    assert store.record("task_b", envelope("task_b", "pending")) is False
    assert store.record("task_b", envelope("task_b", "failed")) is True
    status = store.get("task_b")
    assert status is not None and status.state == TaskState.FAILED
    assert status.fail_code == "CONTENT_VIOLATION"


@pytest.mark.parametrize("task_id", ["../escape", "a/b", ".hidden", "", "x" * 200, "a\\b", "é"])
def test_unsafe_task_ids_are_refused_and_nothing_is_written(
    store: CallbackStore, task_id: str
) -> None:
    with pytest.raises(ValueError):
        store.record(task_id, envelope(task_id))
    with pytest.raises(ValueError):
        store.get(task_id)
    assert store.task_ids() == set()
    assert not any(Path(store.url).parent.rglob("*.json"))


@pytest.mark.parametrize(
    "body",
    [
        {"code": 200},
        {"data": "task_c"},
        {"data": {"taskId": "task_c"}},  # no state
        {"data": {"taskId": "task_c", "state": "exploded"}},
        {"data": {"taskId": "task_c", "state": "success", "createTime": {"x": 1}}},
        envelope("task_other"),  # a body of another task
    ],
)
def test_malformed_bodies_are_refused(store: CallbackStore, body: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        store.record("task_c", body)
    assert store.task_ids() == set()


def test_an_unreadable_record_reads_as_absent_and_is_replaced(store: CallbackStore) -> None:
    path = Path(store.url) / "deliveries" / "task_d.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert store.get("task_d") is None
    assert store.record("task_d", envelope("task_d")) is True
    assert store.get("task_d") is not None


def test_concurrent_duplicates_are_recorded_once(store: CallbackStore) -> None:
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def deliver() -> None:
        barrier.wait()
        results.append(store.record("task_e", envelope("task_e")))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]


def test_poll_new_reads_only_unknown_tasks_across_store_instances(tmp_path: Path) -> None:
    writer = CallbackStore(str(tmp_path / "cb"))
    reader = CallbackStore(str(tmp_path / "cb"))
    assert reader.poll_new(set()) == {}
    writer.record("task_1", envelope("task_1"))
    writer.record("task_2", envelope("task_2", "failed"))
    found = reader.poll_new(set())
    assert {k: v.state for k, v in found.items()} == {
        "task_1": TaskState.SUCCESS,
        "task_2": TaskState.FAILED,
    }
    writer.record("task_3", envelope("task_3"))
    assert set(reader.poll_new({"task_1", "task_2"})) == {"task_3"}
    (tmp_path / "cb" / "deliveries" / "stray.txt").write_text("ignored")
    assert reader.task_ids() == {"task_1", "task_2", "task_3"}


def test_store_on_s3(s3_env: str) -> None:
    url = f"s3://{s3_env}/hooks"
    writer = CallbackStore(url)
    reader = CallbackStore(url)
    assert reader.poll_new(set()) == {}  # an empty listing must not hide later deliveries
    assert writer.record("task_s3", envelope("task_s3")) is True
    assert writer.record("task_s3", envelope("task_s3")) is False
    found = reader.poll_new(set())
    assert list(found) == ["task_s3"]
    assert found["task_s3"].result_urls == ["https://r/task_s3.mp4"]
    assert writer.record("task_s3b", envelope("task_s3b", "failed")) is True
    assert set(reader.poll_new({"task_s3"})) == {"task_s3b"}
    status = reader.get("task_s3b")
    assert status is not None and status.fail_code == "CONTENT_VIOLATION"
    assert reader.get("task_missing") is None
    assert reader.store.list() == ["deliveries/task_s3.json", "deliveries/task_s3b.json"]


def test_callback_mode_hands_out_the_secret_url_and_hides_it(tmp_path: Path) -> None:
    settings = Settings(
        callback_url="https://hooks.example.com",
        callback_token=TOKEN,
        callback_store=str(tmp_path / "cb"),
        callback_check_s=0.5,
    )
    secrets: list[str] = []
    url, waiter = callback_mode(settings, add_secret=secrets.append)
    assert url == f"https://hooks.example.com/callbacks/{TOKEN}"
    assert secrets == [TOKEN, url]  # scrubbed from every message from now on
    assert waiter.check_s == 0.5 and waiter.store.url.endswith("cb")


def test_callback_mode_without_receiver_settings_says_what_to_set() -> None:
    with pytest.raises(ValueError, match=r"HAILUO_CALLBACK_URL.*HAILUO_CALLBACK_TOKEN"):
        callback_mode(Settings(callback_url=None, callback_token=None), add_secret=print)


def test_the_waiter_reads_only_the_deliveries_of_the_tasks_it_waits_for(tmp_path: Path) -> None:
    """A receiver's store keeps every delivery of every earlier run (20,000 of them cost each
    new run 1.2 s of CPU at its first check, and 0.25 s every 2 s for the ones never
    terminal): a run reads only the records of its own tasks."""
    import asyncio

    from hailuo_batch.callbacks import CallbackWaiter

    writer = CallbackStore(str(tmp_path / "cb"))
    for i in range(200):  # earlier runs' deliveries, terminal or not
        writer.record(f"old_{i}", envelope(f"old_{i}", "success" if i % 2 else "processing"))
    writer.record("mine", envelope("mine"))
    reader = CallbackStore(str(tmp_path / "cb"))
    reads: list[str] = []
    real_get = reader.get
    reader.get = lambda task_id: (reads.append(task_id), real_get(task_id))[1]  # type: ignore[method-assign]
    waiter = CallbackWaiter(reader, check_s=0.01)

    async def scenario() -> bool:
        await waiter.check()  # nobody waits yet: not even a listing is read
        event = waiter.waiting("mine")
        for _ in range(3):
            await waiter.check()
        return event.is_set()

    assert asyncio.run(scenario()) is True
    assert reads == ["mine"]


@pytest.mark.parametrize("suffix", ["", "/"])
def test_a_base_url_that_already_holds_the_token_is_refused_without_showing_it(suffix):
    """HAILUO_CALLBACK_URL set to the whole callback URL: the provider would be sent
    .../callbacks/T/callbacks/T (404s, then only the slow backstop poll), and the token would
    show wherever the base URL is logged."""
    from hailuo_batch.callbacks import callback_url_for

    token = "Zq3vX9kLmTp4RwYb2NcD"
    with pytest.raises(ValueError, match="holds the callback token") as err:
        callback_url_for(f"https://hooks.example.com/callbacks/{token}{suffix}", token)
    assert token not in str(err.value)
