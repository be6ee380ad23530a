"""The item table and summary of every run of one manifest (or one deployment) share a key, so
the Prefect Artifacts page shows their history under one name."""

from __future__ import annotations

import asyncio
import json

from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from tests.flows.flowkit import generate_videos, items, write_csv


async def _keys_by_run(flow_run_ids: list) -> dict:
    async with get_client() as client:
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids))
        )
    keys: dict = {i: set() for i in flow_run_ids}
    for a in arts:
        if a.key:
            keys[a.flow_run_id].add(a.key)
    return keys


def test_runs_of_one_manifest_share_their_report_keys(
    flow_env, emulator, tmp_path, images_dir, make_image
):
    m = write_csv(tmp_path / "Orders Q4.csv", items(images_dir, make_image, emulator, 1))
    runs = [
        generate_videos(manifest=str(m), output=str(tmp_path / "out"), dry_run=True)
        for _ in range(2)
    ]
    ids = [r.state_details.flow_run_id for r in runs]
    keys = asyncio.run(_keys_by_run(ids))
    assert keys[ids[0]] == keys[ids[1]] == {"items-orders-q4", "summary-orders-q4"}


def test_a_deployment_names_the_keys_whatever_the_manifest(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    # what prefect.runtime reports inside a run of the deployment `Nightly Batch`
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__NAME", "Nightly Batch")
    rows = items(images_dir, make_image, emulator, 1)
    runs = [
        generate_videos(
            manifest=str(write_csv(tmp_path / f"2026-11-{day}.csv", rows)),
            output=str(tmp_path / "out"),
            dry_run=True,
        )
        for day in (23, 24)
    ]
    ids = [r.state_details.flow_run_id for r in runs]
    keys = asyncio.run(_keys_by_run(ids))
    assert keys[ids[0]] == keys[ids[1]] == {"items-nightly-batch", "summary-nightly-batch"}


def test_the_item_table_is_published_while_the_run_goes(
    flow_env, emulator, tmp_path, images_dir, make_image, monkeypatch
):
    from hailuo_batch.settings import get_settings

    monkeypatch.setenv("HAILUO_TABLE_EVERY_S", "0.01")  # a new version after every item
    get_settings.cache_clear()
    m = write_csv(tmp_path / "live.csv", items(images_dir, make_image, emulator, 4))
    run = generate_videos(manifest=str(m), output=str(tmp_path / "out"), concurrency=1)
    run_id = run.state_details.flow_run_id

    async def tables() -> list:
        async with get_client() as client:
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
        return sorted((a for a in arts if a.type == "table"), key=lambda a: a.created)

    versions = asyncio.run(tables())
    assert len(versions) >= 2  # at least one table before the end, then the final one
    assert {a.key for a in versions} == {"items-live"}  # new versions of one key
    first, last = versions[0], versions[-1]
    assert "finished so far" in (first.description or "")
    rows = [json.loads(a.data) if isinstance(a.data, str) else a.data for a in (first, last)]
    assert len(rows[0]) < len(rows[1]) == 4


def test_a_run_name_typed_in_the_ui_is_kept(flow_env, emulator, tmp_path, images_dir, make_image):
    """A worker runs a flow run the UI created with a name a person typed: the flow keeps it."""
    from prefect.flow_engine import run_flow

    from flows.batch import generate_videos as flow

    m = write_csv(tmp_path / "m.csv", items(images_dir, make_image, emulator, 1))
    # as the UI's run form sends it: the batch options as one object
    params = {"manifest": str(m), "options": {"output": str(tmp_path / "out"), "dry_run": True}}

    async def create(name: str | None):
        async with get_client() as client:
            return await client.create_flow_run(flow, parameters=params, name=name)

    async def name_of(run_id) -> str:
        async with get_client() as client:
            return (await client.read_flow_run(run_id)).name

    for given, expected in (("Client X re-shoot", "Client X re-shoot"), (None, "videos-m.csv-")):
        created = asyncio.run(create(given))
        asyncio.run(run_flow(flow, flow_run=created, parameters=params, return_type="state"))
        assert asyncio.run(name_of(created.id)).startswith(expected)
