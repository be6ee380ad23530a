"""The item table and summary of every run of one manifest (or one deployment) share a key, so
the Prefect Artifacts page shows their history under one name."""

from __future__ import annotations

import asyncio

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
