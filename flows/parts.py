"""A large batch as child runs of bounded size (`generate-videos-part`).

In the run's own process by default; when the run came from a deployment and the part
deployment exists (`HAILUO_PART_DEPLOYMENT`), each part is a flow run of that deployment, which
the work pool's workers start wherever they are: a run of its own over its rows (its lease,
claims and ledger records in the shared output), with its share of the run's spending cap and
concurrency. The parent waits for them and keeps one results file and one summary. A part whose
child run never started, or ended without its results, is finished in the parent's process from
the ledger (what the child paid for is polled, not paid again), within what is left of its cap.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from fsspec.core import split_protocol
from prefect import flow, get_run_logger
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import SetStateStatus
from prefect.deployments import arun_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment, flow_run
from prefect.states import Cancelled, Failed

from flows.item import RunState, check_and_run
from flows.run import opened_run
from flows.runtime import runtime
from flows.tasks import read_manifest
from hailuo_batch import outcomes
from hailuo_batch.budget import Stop
from hailuo_batch.ledger import LedgerRecord, LedgerUnavailable
from hailuo_batch.manifest import ManifestError, ManifestItem
from hailuo_batch.pacing import GenerationStats
from hailuo_batch.parts import (
    ItemRunner,
    PartJob,
    Parts,
    Placement,
    cap_left,
    part_concurrency,
    part_folder,
    part_run_id,
    place_parts,
    share_caps,
    spent_at_most,
    watch_child,
)
from hailuo_batch.polling import load_stats, save_stats
from hailuo_batch.results import ItemResult, from_jsonl, write_results
from hailuo_batch.storage import run_key

#: the large runs going on in this process, by run id
_PARTS: dict[str, Parts] = {}
CHILD_RETRY_PAUSES_S = (5.0, 20.0)
WATCH_EVERY_S = 2.0  # how often the parent reads the state of a child run on a worker


async def run_items(
    run: RunState,
    items: list[ManifestItem],
    one: ItemRunner,
    job: PartJob,
    *,
    published: Callable[[ItemResult], Awaitable[None]],
) -> list[ItemResult]:
    """Every item once (in child runs past `HAILUO_ITEMS_PER_FLOW_RUN` items); one that raised
    ends INTERNAL_ERROR. `job` is what a child run on a worker needs besides its rows;
    `published` shows the run's progress with results a child run on a worker brought."""
    rt = run.rt
    on_error = partial(_internal_error, run.run_id)
    parts = Parts(items, rt.settings.items_per_flow_run, one, on_error)
    if len(parts.parts) > 1:
        placement = await _place(len(parts.parts), job.manifest, run)
        get_run_logger().info("%d items: %s", len(items), placement.why)
        _PARTS[run.run_id] = parts
        try:
            if placement.on_workers:
                await _parts_on_workers(run, parts, job, published)
            else:
                await _parts_here(run.run_id, len(parts.parts))
        finally:
            del _PARTS[run.run_id]
    return await parts.in_order()  # starts what a failed child run never started


def _internal_error(run_id: str, item: ManifestItem, exc: Exception) -> ItemResult:
    return outcomes.internal_error(item, run_id, exc, runtime().scrub)


async def _place(n_parts: int, manifest: str, run: RunState) -> Placement:
    name = run.rt.settings.part_deployment
    deployed = bool(deployment.get_id() or flow_run.get_parent_deployment_id())
    found = False
    if name and deployed:
        async with get_client() as client:
            try:
                await client.read_deployment_by_name(name)
                found = True
            except ObjectNotFound:
                pass
    local = [manifest] if _is_local(manifest) else []
    local += [run.rt.store.url] if run.rt.store.is_local else []
    return place_parts(n_parts, deployment=name, deployed=deployed, found=found, local_paths=local)


def _is_local(url: str) -> bool:
    return split_protocol(url)[0] in (None, "file", "local")


# --- in this process ------------------------------------------------------------------------------


async def _parts_here(run_id: str, n: int) -> None:
    name = flow_run.get_name()
    await asyncio.gather(*(_child(run_id, k, f"{name}-part-{k + 1}-of-{n}") for k in range(n)))


async def _child(run_id: str, part: int, name: str) -> None:
    """Run `part` as a child run; refused three times (503 under load), it runs here instead."""
    for pause in (*CHILD_RETRY_PAUSES_S, None):
        try:
            await run_part.with_options(flow_run_name=name)(run_id, part)
            return
        except Exception as exc:  # noqa: BLE001 - the server's refusal must not end the batch
            then = "trying again" if pause else "running its items in this run"
            get_run_logger().warning("child run %s failed (%s); %s", name, exc, then)
            await asyncio.sleep(pause or 0)


@flow(name="generate-videos-part", log_prints=True)
async def run_part(run_id: str, part: int, job: PartJob | None = None) -> Any:
    """Part `part` (from 0) of the large generate-videos run `run_id`. Started by that run, in
    its process or, with `job`, on a worker of the work pool: then a run of its own over the
    job's rows, whose results the parent run collects. Not meant to be started by hand."""
    if run_id in _PARTS:
        return await _PARTS[run_id].run_left(part)
    if job is None:
        return Failed(
            name="NotAPart",
            message=f"no run {run_id} in this process and no job: this flow runs parts of a "
            "generate-videos run; start generate-videos instead",
        )
    return await _run_part_job(run_id, part, job)


# --- on the workers -------------------------------------------------------------------------------


async def _parts_on_workers(
    run: RunState,
    parts: Parts,
    job: PartJob,
    published: Callable[[ItemResult], Awaitable[None]],
) -> None:
    """Each part as a flow run of the part deployment, a few at a time when the run's
    concurrency is smaller than the number of parts; their results go into `parts`."""
    n = len(parts.parts)
    costs = [sum(run.unit_cost(i) for i in p) for p in parts.parts]
    caps = share_caps(costs, _cap_free(run))
    for cap in caps:  # handed to the children; what a failed child did not spend comes back
        run.budget.spent_usd += cap or 0.0
    each, at_once = part_concurrency(job.options.concurrency, n)
    gate = asyncio.Semaphore(at_once)
    name = flow_run.get_name()

    async def one_part(k: int) -> None:
        share = {"concurrency": each, "max_cost_usd": caps[k], "output": run.rt.store.url}
        options = job.options.model_copy(update=share)  # the output as the parent resolved it
        child = job.model_copy(update={"options": options, "rows": [i.row for i in parts.parts[k]]})
        part_name = f"{name}-part-{k + 1}-of-{n}"
        async with gate:
            got = await _run_on_worker(run, k, child, part_name)
        if got is not None:
            parts.take(got[0])
            _merge_budget(run, got[1])
            run.parts_on_workers.append({"flow_run": part_name, **got[1]})
            for r in got[0]:
                await published(r)
        if parts.left(k):  # finished here, within what the child cannot have spent
            child_id = part_run_id(run.run_id, k)
            spent = await run.rt.blocking(_spent_at_most, run, parts.left(k), child_id)
            run.budget.refund(cap_left(caps[k], spent) or 0.0)

    await asyncio.gather(*(one_part(k) for k in range(n)))
    # the children kept what they learned in the stats file: the parent's save must not undo it
    rt = run.rt
    rt.board.stats = GenerationStats.from_json(await rt.blocking(load_stats, rt.store))


def _cap_free(run: RunState) -> float | None:
    cap = run.budget.cap_usd
    return None if cap is None else max(0.0, cap - run.budget.spent_usd)


async def _run_on_worker(
    run: RunState, k: int, job: PartJob, name: str
) -> tuple[list[ItemResult], dict[str, Any]] | None:
    """Start part `k` on a worker and wait for it; its results and summary, or None if it never
    started (cancelled after `HAILUO_PART_START_TIMEOUT_S`) or left none."""
    rt, log = run.rt, get_run_logger()
    child = None
    for pause in (*CHILD_RETRY_PAUSES_S, None):
        try:  # the same idempotency key: a creation the server made but did not confirm
            child = await arun_deployment(  # is found, not made twice
                rt.settings.part_deployment,
                parameters={"run_id": run.run_id, "part": k, "job": job.model_dump(mode="json")},
                flow_run_name=name,
                timeout=0,
                idempotency_key=f"{flow_run.get_id()}-part-{k}",
            )
            break
        except Exception as exc:  # noqa: BLE001 - a refused child run: tried again, then here
            then = "trying again" if pause else "running its items in this run"
            log.warning("child run %s not created (%s); %s", name, exc, then)
            await asyncio.sleep(pause or 0)
    if child is None:
        return None
    log.info("child run %s (%s) created for %d items", name, child.id, len(job.rows))
    state = await _wait_for(run, child, k, name)
    got = await rt.blocking(_read_part_results, run, k)
    if got is None:
        log.warning(
            "child run %s ended %s without results: running what is left of its part here",
            name, state,
        )  # fmt: skip
    return got


async def _wait_for(run: RunState, child: FlowRun, k: int, name: str) -> str:
    """The child run's final state type, once it has one (`watch_child`): a run no worker
    started in time is cancelled (unless a worker takes it at that very moment), a run whose
    process died unnoticed is left for the parent to finish."""
    log, settings, child_id = get_run_logger(), run.rt.settings, part_run_id(run.run_id, k)
    created, started = time.monotonic(), None
    async with get_client() as client:
        while True:
            try:
                st = (await client.read_flow_run(child.id)).state
            except Exception as exc:  # noqa: BLE001 - a busy server: read again
                log.warning("child run %s: state not read (%s)", name, exc)
                await asyncio.sleep(WATCH_EVERY_S)
                continue
            state = None if st is None else str(st.type.value)
            if state not in (None, "SCHEDULED") and started is None:
                started = time.monotonic()
            now = time.monotonic()
            alive = started is None or now - started < 2 * settings.lease_ttl_s
            if not alive:  # read only when it matters: a lease read is a store request
                alive = await run.rt.blocking(run.ledger.lease_alive, child_id)
            step = watch_child(
                state,
                scheduled_for_s=now - created,
                started_for_s=0.0 if started is None else now - started,
                lease_alive=alive,
                start_timeout_s=settings.part_start_timeout_s,
                lease_ttl_s=settings.lease_ttl_s,
            )
            if step == "ended":
                return str(state)
            if step == "dead":
                log.warning(
                    "child run %s is %s but holds no live lease: taken as dead", name, state
                )
                return "DEAD"
            if step == "cancel":
                why = f"no worker started it within {settings.part_start_timeout_s:.0f} s"
                if await _cancel(client, child, why):
                    log.warning("child run %s cancelled: %s", name, why)
                    return "CANCELLED"
            await asyncio.sleep(WATCH_EVERY_S)


async def _cancel(client: PrefectClient, child: FlowRun, why: str) -> bool:
    """Cancel a scheduled child run; False if a worker took it first (then it goes on)."""
    try:
        result: Any = await client.set_flow_run_state(child.id, Cancelled(message=why))
    except Exception:  # noqa: BLE001 - not cancelled: keep waiting for it
        return False
    return bool(result.status == SetStateStatus.ACCEPT)


def _read_part_results(run: RunState, k: int) -> tuple[list[ItemResult], dict[str, Any]] | None:
    store, folder = run.rt.store, part_folder(run.run_id, k)
    try:
        results = from_jsonl(store.read_text(run_key(folder, "results.jsonl")))
        summary = json.loads(store.read_text(run_key(folder, "summary.json")))
    except (OSError, ValueError):
        return None
    return results, summary


def _merge_budget(run: RunState, summary: dict[str, Any]) -> None:
    """A child's cap refusals and stop reasons become the parent's (its verdict names them)."""
    run.budget.capped += int(summary.get("capped", 0))
    for why, message in (summary.get("stops") or {}).items():
        run.budget.stop(Stop(why), message)


def _spent_at_most(run: RunState, items: list[ManifestItem], child_id: str) -> float:
    """`spent_at_most` the child run `child_id` on `items`, from their ledger records."""
    seen: list[tuple[LedgerRecord | Exception | None, float]] = []
    for item in items:
        try:
            seen.append((run.ledger.get(item.id), run.unit_cost(item)))
        except LedgerUnavailable as exc:
            seen.append((exc, run.unit_cost(item)))
    max_posts = 1 + run.rt.settings.transient_max_resubmits
    return spent_at_most(seen, child_id, max_posts=max_posts)


# --- a part on a worker -------------------------------------------------------------------------


async def _run_part_job(run_id: str, part: int, job: PartJob) -> Any:
    """The part's rows through check, submit, poll and store in a run of its own; its results
    and a short summary under the parent's run folder, for the parent to collect."""
    pid = part_run_id(run_id, part)
    async with opened_run(
        job.options, pid, force=job.force, resubmit_lost=job.resubmit_lost
    ) as run:
        parsed = await read_manifest(job.manifest, job.options.item_defaults())
        if isinstance(parsed, ManifestError):
            return Failed(name="BadManifest", message=f"part {pid}: {parsed}")
        wanted = set(job.rows)
        items = [i for i in parsed.items if i.row in wanted]
        if len(items) != len(wanted):
            gone = sorted(wanted - {i.row for i in items})[:10]
            msg = f"part {pid}: rows {gone} are no longer valid rows of {job.manifest}"
            return Failed(name="ManifestChanged", message=msg)
        run.rt.board.plan = run.rt.board.plan.for_batch(len(items))  # probes it can afford
        one, on_error = partial(check_and_run, run), partial(_internal_error, pid)
        results = await Parts(items, max(1, len(items)), one, on_error).in_order()
        summary = {
            "run_id": pid,
            "part_of": run_id,
            "items": len(results),
            "capped": run.budget.capped,
            "stops": {str(why): msg for why, msg in run.budget.stops.items()},
            "concurrency": run.slots.limit.summary(),
        }
        await run.rt.blocking(save_stats, run.rt.store, run.rt.board.stats, run.rt.warn)
        folder = part_folder(run_id, part)
        url, error = await run.rt.blocking(write_results, run.rt.store, folder, results, summary)
        if error is not None:  # written on this machine only: the parent finishes the part
            return Failed(name="ResultsNotStored", message=f"part {pid}: {error}")
        get_run_logger().info("part %s: %d items; results at %s", pid, len(results), url)
        return summary
