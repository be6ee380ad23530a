"""A large batch whose parts should go to the workers when no worker takes them: each child run
is cancelled after HAILUO_PART_START_TIMEOUT_S and its part runs in the parent, within the cap.

The Prefect test harness holds a part deployment on a work pool no worker serves; the run counts
as deployed (`prefect.runtime.deployment.get_id`, the one thing faked: the harness runs flows
in-process, not from a deployment). Manifest and output are in S3 (moto), as parts on workers
need.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import s3fs
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

import flows.parts
from hailuo_batch.ledger import Ledger
from hailuo_batch.manifest import ItemDefaults, load_manifest
from hailuo_batch.options import BatchOptions
from hailuo_batch.parts import PartJob, item_key, part_run_id
from hailuo_batch.policy import Prices, estimate_cost
from hailuo_batch.results import from_jsonl
from hailuo_batch.settings import get_settings
from hailuo_batch.storage import OutputStore
from tests.flows.flowkit import generate_videos, items, write_csv

POOL = "nobody-serves-this"


async def deploy_parts_nowhere() -> None:
    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name=POOL, type="process"), overwrite=True)
        flow_id = await client.create_flow_from_name("generate-videos-part")
        await client.create_deployment(
            flow_id=flow_id,
            name="generate-videos-part",
            work_pool_name=POOL,
            entrypoint="flows/parts.py:run_part",
        )


async def child_runs(parent_id) -> list:
    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])
            )
        )


def submissions(emulator) -> int:
    return int(httpx.get(f"{emulator.base_url}/_emulator/stats").json()["submissions"])


def manifest_in_s3(bucket: str, tmp_path, rows) -> tuple[str, Path]:
    """The rows as a CSV manifest in the bucket (its s3:// URL) and on disk."""
    local = write_csv(tmp_path / "m.csv", rows)
    s3fs.S3FileSystem().put_file(str(local), f"{bucket}/in/m.csv")
    return f"s3://{bucket}/in/m.csv", local


def part_job(url: str, local: Path, bucket: str, concurrency: int) -> PartJob:
    """A job for a part of every row of the manifest, as a batch run would hand it out."""
    parsed = load_manifest(str(local), ItemDefaults())
    return PartJob(
        manifest=url,
        options=BatchOptions(output=f"s3://{bucket}/out", concurrency=concurrency),
        rows=[i.row for i in parsed.items],
        row_keys=[item_key(i) for i in parsed.items],
    )


def part_results(bucket: str) -> list:
    """The results part 1 of batch run R wrote for its parent."""
    return from_jsonl(
        s3fs.S3FileSystem().cat(f"{bucket}/out/runs/R/parts/1/results.jsonl").decode()
    )


def part_stops_after_its_first_post(
    emulator, bucket: str, url: str, local: Path, act: Callable[[], None], says: str
) -> None:
    """Run part 1 of the live batch run R (every row, one item at a time); once its first POST
    went out, `act` (the batch run takes the part over, or ends): the part finishes what it
    started, starts no further item, and each item it left says `says`."""
    job = part_job(url, local, bucket, concurrency=1)
    before = submissions(emulator)

    def after_the_first_post() -> None:
        for _ in range(3000):
            if submissions(emulator) > before:
                break
            time.sleep(0.01)
        act()

    actor = threading.Thread(target=after_the_first_post)
    actor.start()
    summary = asyncio.run(flows.parts.run_part("R", 0, job))
    actor.join()
    results = part_results(bucket)
    posts = submissions(emulator) - before
    left = [r for r in results if r.status == "not_submitted"]
    assert summary["items"] == len(results) == 5
    assert 1 <= posts < 5 and len(left) == 5 - posts, [(r.id, r.status) for r in results]
    assert all(says in (r.fail_msg or "") for r in left)


def test_parts_no_worker_starts_run_in_the_parent_within_the_cap(
    flow_env, emulator, s3_env, moto_server, tmp_path, images_dir, make_image, monkeypatch
):
    monkeypatch.setenv("HAILUO_ITEMS_PER_FLOW_RUN", "3")
    monkeypatch.setenv("HAILUO_PART_START_TIMEOUT_S", "1")
    monkeypatch.setattr(flows.parts, "WATCH_EVERY_S", 0.2)
    monkeypatch.setattr(flows.parts.deployment, "get_id", lambda: "a-deployment")
    get_settings.cache_clear()
    asyncio.run(deploy_parts_nowhere())
    url, _ = manifest_in_s3(s3_env, tmp_path, items(images_dir, make_image, emulator, 7))
    unit = estimate_cost("standard-image-to-video", 6, Prices.from_settings(get_settings()))
    before = submissions(emulator)

    state = generate_videos(
        manifest=url,
        output=f"s3://{s3_env}/out",
        concurrency=4,
        max_cost_usd=round(4.5 * unit, 4),
        return_state=True,
    )
    summary = state.result(raise_on_failure=False)
    results = {r.id: r for r in from_jsonl(s3fs.S3FileSystem().cat(summary["results"]).decode())}
    assert sorted(results) == sorted(f"i{k}" for k in range(7))  # one result per row
    succeeded = sorted(i for i, r in results.items() if r.status == "succeeded")
    posts = submissions(emulator) - before
    # the children's shares came back whole: the parent ran what the cap allows, no more
    assert len(succeeded) == posts == 4
    assert summary["max_cost_usd"] == pytest.approx(4.5 * unit)
    capped = [i for i, r in results.items() if r.status == "not_submitted"]
    assert len(capped) == 3 and all("max cost" in (results[i].fail_msg or "") for i in capped)

    children = asyncio.run(child_runs(state.state_details.flow_run_id))
    assert sorted(c.name.rsplit("-part-", 1)[1] for c in children) == ["1-of-3", "2-of-3", "3-of-3"]
    assert {c.state_type.value for c in children} == {"CANCELLED"}
    assert all("no worker started it within 1 s" in (c.state.message or "") for c in children)


def test_a_dry_run_of_a_large_batch_keeps_its_parts_and_pays_nothing(
    flow_env, emulator, s3_env, tmp_path, images_dir, make_image, monkeypatch
):
    monkeypatch.setenv("HAILUO_ITEMS_PER_FLOW_RUN", "3")
    monkeypatch.setattr(flows.parts.deployment, "get_id", lambda: "a-deployment")
    get_settings.cache_clear()
    asyncio.run(deploy_parts_nowhere())
    url, _ = manifest_in_s3(s3_env, tmp_path, items(images_dir, make_image, emulator, 4))
    before = submissions(emulator)
    state = generate_videos(
        manifest=url, output=f"s3://{s3_env}/out", concurrency=4,
        dry_run=True, return_state=True,
    )  # fmt: skip
    assert submissions(emulator) == before
    summary = state.result(raise_on_failure=False)
    assert summary["estimated_batch_cost_usd"] > 0 and not summary.get("parts_on_workers")
    children = asyncio.run(child_runs(state.state_details.flow_run_id))
    assert children and all(c.deployment_id is None for c in children)  # in this process


def test_a_part_run_that_starts_after_the_parent_took_its_part_does_nothing(
    flow_env, emulator, s3_env, tmp_path, images_dir, make_image
):
    """A child run a worker starts late (after the parent gave up waiting and took the part
    over, or one whose creation the parent never saw confirmed) finds the part's claim held
    by the live parent, or the batch run over, and leaves every item alone."""
    url, local = manifest_in_s3(s3_env, tmp_path, items(images_dir, make_image, emulator, 3))
    parent = Ledger(OutputStore(f"s3://{s3_env}/out"), "R", lease_ttl_s=120)
    parent.heartbeat()
    assert parent.claim_part(part_run_id("R", 0)) is None  # the parent holds part 1
    job = part_job(url, local, s3_env, concurrency=2)
    before = submissions(emulator)
    state = asyncio.run(flows.parts.run_part("R", 0, job, return_state=True))
    assert state.is_completed() and state.name == "PartTakenOver", state
    assert "held by run R" in (state.message or "")
    # the batch run is over (its lease ended, so its claim is stale): a part it took stays
    # its own, and a part nobody took is not started either
    parent.end_lease()
    state = asyncio.run(flows.parts.run_part("R", 0, job, return_state=True))
    assert state.is_completed() and state.name == "PartTakenOver", state
    assert "held by run R" in (state.message or "")
    # a part nobody took, of a batch run that is over (cancelled, crashed): not green
    state = asyncio.run(flows.parts.run_part("R", 1, job, return_state=True))
    assert state.is_cancelled() and state.name == "BatchRunOver", state
    assert "the batch run R is over" in (state.message or "")
    assert submissions(emulator) == before


def test_a_part_run_stops_starting_items_once_the_batch_run_took_its_part_over(
    flow_env, emulator, s3_env, tmp_path, images_dir, make_image
):
    """A part run whose lease looked dead to the batch run (a long pause, a store blip) may
    live on after the batch run took its part over: before each item it checks the part is
    still its own, and leaves the rest to the batch run, each with the reason."""
    url, local = manifest_in_s3(s3_env, tmp_path, items(images_dir, make_image, emulator, 5))
    store = OutputStore(f"s3://{s3_env}/out")
    parent = Ledger(store, "R", lease_ttl_s=120)
    parent.heartbeat()
    child_id = part_run_id("R", 0)

    def take_over() -> None:  # the batch run takes the part
        store.delete(f"claims/parts/{child_id}.json")
        assert parent.claim_part(child_id) is None

    part_stops_after_its_first_post(emulator, s3_env, url, local, take_over, "taken over by run R")


def test_a_part_run_held_by_its_share_says_so_not_the_users_max_cost(
    flow_env, emulator, s3_env, tmp_path, images_dir, make_image
):
    """A part on a worker is given its share of the run's cap (the user's max cost or the
    balance, spread over the parts): the items its share cannot pay for say it is the part's
    share, not "max cost reached" at a figure the user never gave."""
    url, local = manifest_in_s3(s3_env, tmp_path, items(images_dir, make_image, emulator, 3))
    unit = estimate_cost("standard-image-to-video", 6, Prices.from_settings(get_settings()))
    job = part_job(url, local, s3_env, concurrency=1)
    job = job.model_copy(
        update={"options": job.options.model_copy(update={"max_cost_usd": 1.5 * unit})}
    )
    Ledger(OutputStore(f"s3://{s3_env}/out"), "R", lease_ttl_s=120).heartbeat()  # a live parent
    before = submissions(emulator)
    summary = asyncio.run(flows.parts.run_part("R", 0, job))
    results = part_results(s3_env)
    held = [r for r in results if r.status == "not_submitted"]
    assert submissions(emulator) - before == 1 and summary["capped"] == len(held) == 2
    assert all("part's share of the run's spending cap" in (r.fail_msg or "") for r in held)
    assert not any("max cost reached" in (r.fail_msg or "") for r in held)


def test_a_part_run_starts_no_item_once_its_batch_run_is_over(
    flow_env, emulator, s3_env, tmp_path, images_dir, make_image
):
    """The batch run was cancelled (or it crashed) while its part ran on a worker: the part
    finishes what it started and starts no further item, each saying why."""
    url, local = manifest_in_s3(s3_env, tmp_path, items(images_dir, make_image, emulator, 5))
    parent = Ledger(OutputStore(f"s3://{s3_env}/out"), "R", lease_ttl_s=120)
    parent.heartbeat()
    # the batch run is cancelled: its lease ends
    part_stops_after_its_first_post(
        emulator, s3_env, url, local, parent.end_lease, "the batch run R is over"
    )


def test_what_a_killed_part_paid_counts_as_the_batch_runs_spend(
    flow_env, emulator, s3_env, tmp_path, images_dir, make_image, monkeypatch
):
    """A part on a worker pays for its first item and is killed; the batch run finishes the
    part from the ledger. That POST is this batch's spend: in the item's run cost and the
    run's estimate, so the balance's fall agrees with it and no price warning is raised."""
    from hailuo_batch.apixo import ApixoClient
    from hailuo_batch.ledger import LedgerRecord, LedgerState
    from hailuo_batch.validation import preflight
    from tests.flows.flowkit import API_KEY

    monkeypatch.setenv("HAILUO_ITEMS_PER_FLOW_RUN", "3")
    monkeypatch.setattr(flows.parts.deployment, "get_id", lambda: "a-deployment")
    get_settings.cache_clear()
    url, local = manifest_in_s3(s3_env, tmp_path, items(images_dir, make_image, emulator, 6))
    rows = load_manifest(str(local), ItemDefaults()).items
    unit = estimate_cost("standard-image-to-video", 6, Prices.from_settings(get_settings()))
    paid: list[str] = []

    async def killed_after_paying(run, k, job, name):
        pid = part_run_id(run.run_id, k)
        child = Ledger(run.rt.store, pid, lease_ttl_s=120)
        child.heartbeat()
        assert child.claim_part(pid) is None
        item = next(i for i in rows if i.row == job.rows[0])
        request = preflight(item, settings=get_settings()).request
        task_id = ApixoClient(API_KEY, emulator.base_url).submit(request)
        child.put(
            LedgerRecord(id=item.id, input_hash=item.input_hash, state=LedgerState.SUBMITTED,
                         task_id=task_id, task_ids=[task_id], attempts=1)
        )  # fmt: skip
        paid.append(item.id)
        child.end_lease()  # killed: its lease is over
        return "CRASHED", None

    monkeypatch.setattr(flows.parts, "_run_on_worker", killed_after_paying)
    asyncio.run(deploy_parts_nowhere())
    before = submissions(emulator)
    state = generate_videos(
        manifest=url, output=f"s3://{s3_env}/out", concurrency=4, return_state=True
    )
    summary = state.result(raise_on_failure=False)
    results = {r.id: r for r in from_jsonl(s3fs.S3FileSystem().cat(summary["results"]).decode())}
    assert len(paid) == 2 and submissions(emulator) - before == 6  # one POST per item
    assert all(results[i].status == "succeeded" for i in results), state.message
    assert all(results[i].run_cost_usd == pytest.approx(unit) for i in paid)
    assert summary["estimated_cost_usd"] == pytest.approx(6 * unit)
    assert summary["balance_spent_usd"] == pytest.approx(6 * unit)
    assert "spend_warning" not in summary and state.name == "Completed", state.message
