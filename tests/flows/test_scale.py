"""Large batches: child runs of bounded size, and the records the Prefect server keeps."""

from __future__ import annotations

import asyncio

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
)

from hailuo_batch.settings import get_settings
from tests.flows.flowkit import generate_videos, items, results_of, write_csv


async def child_runs_and_task_states(parent_id) -> tuple[list, dict[str, list[str]]]:
    async with get_client() as client:
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])
            )
        )
        states: dict[str, list[str]] = {}
        for fr in [*children, await client.read_flow_run(parent_id)]:
            trs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])), limit=200
            )
            states[fr.name] = [t.state_type.value for t in trs if t.state_type]
        return children, states


def test_a_large_batch_runs_as_child_runs_and_the_server_keeps_every_task_run(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    monkeypatch.setenv("HAILUO_ITEMS_PER_FLOW_RUN", "12")
    monkeypatch.setenv("HAILUO_MAX_RECORD_LAG", "10")  # held until the server catches up
    get_settings.cache_clear()
    manifest = write_csv(tmp_path / "big.csv", items(images_dir, make_image, emulator, 30))
    state = generate_videos(
        manifest=str(manifest), output=str(tmp_path / "out"), concurrency=10, return_state=True
    )
    assert state.is_completed(), state.message
    summary = state.result()
    res = results_of(summary)
    assert sorted(res) == sorted(f"i{k}" for k in range(30))  # one results file, a line per row
    assert all(r.status == "succeeded" for r in res.values())

    parent = state.state_details.flow_run_id
    children, states = asyncio.run(child_runs_and_task_states(parent))
    for _ in range(60):  # the server records events asynchronously: let it catch up
        if sum(len(v) for v in states.values()) >= 60 and all(
            s == "COMPLETED" for v in states.values() for s in v
        ):
            break
        asyncio.run(asyncio.sleep(0.5))
        children, states = asyncio.run(child_runs_and_task_states(parent))
    assert sorted(c.name.rsplit("-part-", 1)[1] for c in children) == ["1-of-3", "2-of-3", "3-of-3"]
    part_tasks = [v for name, v in states.items() if "-part-" in name]
    assert sorted(len(v) for v in part_tasks) == [12, 24, 24]  # a submit and a poll per item
    assert all(s == "COMPLETED" for v in states.values() for s in v), states  # none left RUNNING


def test_a_child_run_the_server_refuses_is_tried_again_then_run_in_the_parent(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    """A Prefect server under load may answer 503 to the creation of a child run: the batch
    goes on (three tries, then the part's items run in the parent run), every row once."""
    import flows.parts as batch

    monkeypatch.setenv("HAILUO_ITEMS_PER_FLOW_RUN", "3")
    monkeypatch.setattr(batch, "CHILD_RETRY_PAUSES_S", (0.01, 0.01))
    get_settings.cache_clear()
    real, tries = batch.run_part, []

    class Refusing:
        def with_options(self, **kw):
            child = real.with_options(**kw)

            async def call(run_id: str, part: int) -> int:
                tries.append(part)
                if part == 1:
                    raise RuntimeError("Server error '503 Service Unavailable'")
                return await child(run_id, part)

            return call

    monkeypatch.setattr(batch, "run_part", Refusing())
    manifest = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 7))
    before = httpx.get(f"{emulator.base_url}/_emulator/stats").json()["submissions"]
    state = generate_videos(
        manifest=str(manifest), output=str(tmp_path / "out"), concurrency=4, return_state=True
    )
    assert state.is_completed(), state.message
    res = results_of(state.result())
    assert sorted(res) == sorted(f"i{k}" for k in range(7))
    assert all(r.status == "succeeded" for r in res.values())
    assert sorted(tries) == [0, 1, 1, 1, 2]
    after = httpx.get(f"{emulator.base_url}/_emulator/stats").json()["submissions"]
    assert after - before == 7  # one POST per item: none ran twice
