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
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from fsspec.core import split_protocol
from prefect import flow, get_run_logger
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import arun_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import deployment, flow_run
from prefect.states import Cancelled, Completed, Failed

from flows.item import RunState, check_and_run
from flows.run import RunNotStarted, not_started, opened_run
from flows.runtime import runtime
from flows.tasks import read_manifest
from hailuo_batch import outcomes
from hailuo_batch.budget import Stop
from hailuo_batch.ledger import LedgerRecord, LedgerUnavailable, with_retries
from hailuo_batch.manifest import ManifestError, ManifestItem
from hailuo_batch.pacing import GenerationStats
from hailuo_batch.parts import (
    ItemRunner,
    PartJob,
    Parts,
    Placement,
    cap_left,
    item_key,
    part_concurrency,
    part_folder,
    part_items,
    part_run_id,
    part_share,
    place_parts,
    spent_at_most,
    watch_child,
)
from hailuo_batch.polling import load_stats, save_stats
from hailuo_batch.results import ItemResult, from_jsonl, write_results
from hailuo_batch.steps import NOT_SUBMITTED_STOP
from hailuo_batch.storage import run_key

T = TypeVar("T")

#: the large runs going on in this process, by run id
_PARTS: dict[str, Parts] = {}
CHILD_RETRY_PAUSES_S = (5.0, 20.0)
WATCH_EVERY_S = 2.0  # how often the parent reads the state of a child run on a worker
LEASE_READ_EVERY_S = 30.0  # and, once it has run a while, its lease
FINISH_RETRY_S = 5.0  # how often the parent tries to take over a part another run holds


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
        placement = await _place(len(parts.parts), items, job.manifest, run)
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


async def _place(
    n_parts: int, items: list[ManifestItem], manifest: str, run: RunState
) -> Placement:
    name = run.rt.settings.part_deployment
    deployed = bool(deployment.get_id() or flow_run.get_parent_deployment_id())
    found = False
    if name and deployed and not run.dry_run:
        try:
            async with get_client() as client:
                await client.read_deployment_by_name(name)
            found = True
        except Exception as exc:  # noqa: BLE001 - not found or not readable: parts stay here
            get_run_logger().info("part deployment %r not used: %s", name, exc)
    paths = [manifest, run.rt.store.url, *(i.image_url for i in items)]
    unshared = list(dict.fromkeys(p for p in paths if not _shared(p)))
    return place_parts(
        n_parts, deployment=name, deployed=deployed, found=found,
        local_paths=unshared[:3] + (["..."] if len(unshared) > 3 else []), dry_run=run.dry_run,
    )  # fmt: skip


#: where every worker of a pool reads the same bytes as the parent (an allow-list: a local
#: path, memory:// or an unknown scheme stays with the parent)
SHARED_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https"}


def _shared(url: str) -> bool:
    return split_protocol(url)[0] in SHARED_PROTOCOLS


# --- in this process ------------------------------------------------------------------------------


def _part_name(k: int, n: int) -> str:
    """The flow run name of part `k` (from 0) of `n` of this run."""
    return f"{flow_run.get_name()}-part-{k + 1}-of-{n}"


async def _tried(call: Callable[[], Awaitable[T]], name: str, failed: str) -> T | None:
    """`call`'s value, tried again after each of CHILD_RETRY_PAUSES_S (a server answering 503
    under load must not end the batch); None when every try failed, each said in the log."""
    for pause in (*CHILD_RETRY_PAUSES_S, None):
        try:
            return await call()
        except Exception as exc:  # noqa: BLE001 - the server's refusal must not end the batch
            then = "trying again" if pause else "running its items in this run"
            get_run_logger().warning("child run %s %s (%s); %s", name, failed, exc, then)
            await asyncio.sleep(pause or 0)
    return None


async def _parts_here(run_id: str, n: int) -> None:
    await asyncio.gather(*(_child(run_id, k, _part_name(k, n)) for k in range(n)))


async def _child(run_id: str, part: int, name: str) -> None:
    """Run `part` as a child run; refused three times (503 under load), it runs here instead."""
    await _tried(lambda: run_part.with_options(flow_run_name=name)(run_id, part), name, "failed")


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
    """Each part as a flow run of the part deployment, in manifest order, a few at a time when
    the run's concurrency is smaller than the number of parts; their results go into `parts`,
    and what a child left is finished by `parts.in_order` here, within what it cannot have
    spent. One part's trouble never ends the batch."""
    n = len(parts.parts)
    run.parts.runs = frozenset(part_run_id(run.run_id, k) for k in range(n))
    each, at_once = part_concurrency(job.options.concurrency, n)
    gate = asyncio.Semaphore(at_once)  # FIFO: the parts start in manifest order

    costs = [sum(run.planned_costs.get(i.row, run.unit_cost(i)) for i in p) for p in parts.parts]

    async def one_part(k: int) -> None:
        rows = parts.parts[k]
        part_name = _part_name(k, n)
        entry: dict[str, Any] = {"flow_run": part_name}
        async with gate:
            if (stopped := run.budget.stopped) is not None:  # no child once the run stopped
                why = f"not submitted: the run stopped submitting before part {k + 1} started"
                taken = parts.take(k, [
                    outcomes.not_submitted(i, run.run_id, f"{why} ({stopped[1]})").model_copy(
                        update={"fail_code": NOT_SUBMITTED_STOP}
                    )
                    for i in parts.left(k)
                ])  # fmt: skip
                for r in taken:
                    await published(r)
                entry.update(state="not started", results=True)
                run.parts.on_workers.append(entry)
                return
            cost = costs[k]
            share = part_share(
                cost, _cap_free(run), later_cost=sum(costs[k + 1 :]),
                resubmits=run.rt.settings.transient_max_resubmits,
            )  # fmt: skip
            run.budget.spent_usd += share or 0.0  # handed to the child, no await in between
            try:
                options = job.options.model_copy(
                    update={"concurrency": each, "max_cost_usd": share,
                            "output": run.rt.store.url}  # the output as the parent resolved it
                )  # fmt: skip
                child = job.model_copy(
                    update={"options": options, "rows": [i.row for i in rows],
                            "row_keys": [item_key(i) for i in rows]}
                )  # fmt: skip
                entry["state"], got = await _run_on_worker(run, k, child, part_name)
                if got is not None:
                    entry.update(got[1])
                    await _take(run, parts, k, got, published)
                    if not parts.left(k):  # what it did not spend goes to the later parts
                        spent = _number(got[1].get("spent_usd"), default=share or 0.0)
                        run.budget.refund(cap_left(share, spent) or 0.0)
            except Exception as exc:  # noqa: BLE001 - one part's trouble must not end the batch
                get_run_logger().error("part %s: %r", part_name, exc)
                entry["error"] = repr(exc)
            try:
                if parts.left(k):
                    await _finish_here(run, parts, k, share, published)
            except Exception as exc:  # noqa: BLE001 - then its items say so, and are not run
                why = f"part {k + 1} could not be finished here ({exc!r}): run the batch again"
                get_run_logger().error(why)
                parts.take(k, [outcomes.not_submitted(i, run.run_id, why) for i in parts.left(k)])
        entry["results"] = not parts.left(k)
        run.parts.on_workers.append(entry)

    await asyncio.gather(*(one_part(k) for k in range(n)))
    # the children kept what they learned in the stats file: the parent's save must not undo it
    rt = run.rt
    rt.board.stats = GenerationStats.from_json(await rt.blocking(load_stats, rt.store))


async def _take(
    run: RunState,
    parts: Parts,
    k: int,
    got: tuple[list[ItemResult], dict[str, Any]],
    published: Callable[[ItemResult], Awaitable[None]],
) -> None:
    """A child's results and summary into the parent's: each row once, published once."""
    taken = parts.take(k, got[0])
    if taken:
        _merge_budget(run, got[1], f"part {k + 1}")
    for r in taken:
        await published(r)


async def _finish_here(
    run: RunState,
    parts: Parts,
    k: int,
    share: float | None,
    published: Callable[[ItemResult], Awaitable[None]],
) -> None:
    """Finish part `k` here once its child is over: take the part's claim (a child killed
    without a word keeps it until its lease lapses; one that started late, or still lives, keeps
    it while it runs: its results are taken if they come), give back what the child cannot have
    spent; `parts.in_order` then runs what is left, from the ledger. When the claim cannot be
    read for twice a lease's life, or this run stopped submitting, the part's items say so."""
    log, child_id, settings = get_run_logger(), part_run_id(run.run_id, k), run.rt.settings
    said, unknown_since = False, None
    while parts.left(k):
        try:
            owner = await run.rt.blocking(run.ledger.claim_part, child_id)
        except LedgerUnavailable as exc:
            owner = f"unknown ({exc})"
        if owner is None:
            spent = await run.rt.blocking(_spent_at_most, run, parts.parts[k], child_id)
            run.budget.refund(cap_left(share, spent) or 0.0)
            log.warning("part %d: %d items left, finished in this run", k + 1, len(parts.left(k)))
            return
        now = time.monotonic()
        unknown_since = (unknown_since or now) if owner.startswith("unknown") else None
        stopped = run.budget.stopped
        if stopped or (unknown_since and now - unknown_since > 2 * settings.lease_ttl_s):
            why = stopped[1] if stopped else f"the part's claim could not be read: {owner}"
            why = f"part {k + 1} not finished by this run: {why}; run the batch again"
            log.error(why)
            parts.take(k, [outcomes.not_submitted(i, run.run_id, why) for i in parts.left(k)])
            return
        if not said:
            log.warning("part %d is held by run %s: waiting for it to end", k + 1, owner)
            said = True
        got = await run.rt.blocking(_read_part_results, run, k)
        if got is not None:
            await _take(run, parts, k, got, published)
        await asyncio.sleep(FINISH_RETRY_S)


def _number(value: Any, *, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _cap_free(run: RunState) -> float | None:
    cap = run.budget.cap_usd
    return None if cap is None else max(0.0, cap - run.budget.spent_usd)


async def _run_on_worker(
    run: RunState, k: int, job: PartJob, name: str
) -> tuple[str, tuple[list[ItemResult], dict[str, Any]] | None]:
    """Start part `k` on a worker and wait for it: its final state, and its results and summary
    (None if it never started, or left none)."""
    rt, log = run.rt, get_run_logger()
    create = partial(  # the same idempotency key on each try: a creation the server made but
        arun_deployment,  # did not confirm is found, not made twice
        rt.settings.part_deployment,
        parameters={"run_id": run.run_id, "part": k, "job": job.model_dump(mode="json")},
        flow_run_name=name,
        timeout=0,
        idempotency_key=f"{run.run_id}-part-{k}",
    )
    child: FlowRun | None = await _tried(create, name, "not created")
    if child is None:  # if the server made it after all, it finds the part claimed and stops
        return "NOT_CREATED", None
    log.info("child run %s (%s) created for %d items", name, child.id, len(job.rows))
    state = await _wait_for(run, child, k, name)
    got = await rt.blocking(_read_part_results, run, k)
    if got is None:
        log.warning("child run %s ended %s without results", name, state)
    return state, got


async def _wait_for(run: RunState, child: FlowRun, k: int, name: str) -> str:
    """The child run's final state type, once it has one (`watch_child`); or why the parent
    stopped waiting: it never started in time (cancelled, unless a worker takes it at that
    moment), its process died unnoticed, or the server no longer knows it."""
    log, settings, child_id = get_run_logger(), run.rt.settings, part_run_id(run.run_id, k)
    created, running_since, lease_read, alive = time.monotonic(), None, 0.0, True
    async with get_client() as client:
        while True:
            try:
                st = (await client.read_flow_run(child.id)).state
            except ObjectNotFound:
                log.warning("child run %s is gone from the Prefect server", name)
                return "DELETED"
            except Exception as exc:  # noqa: BLE001 - a busy server: read again
                log.warning("child run %s: state not read (%s)", name, exc)
                await asyncio.sleep(WATCH_EVERY_S)
                continue
            state = None if st is None else str(st.type.value)
            now = time.monotonic()
            if state == "RUNNING" and running_since is None:
                running_since = now
            running_for = 0.0 if running_since is None else now - running_since
            if running_for > 2 * settings.lease_ttl_s and now - lease_read > LEASE_READ_EVERY_S:
                alive = await run.rt.blocking(_lease_alive, run, child_id)  # a store request
                lease_read = now
            step = watch_child(
                state,
                ever_running=running_since is not None,
                waited_s=now - created,
                running_for_s=running_for,
                lease_alive=alive,
                start_timeout_s=settings.part_start_timeout_s,
                lease_ttl_s=settings.lease_ttl_s,
            )
            if step == "ended":
                return str(state)
            if step == "dead":
                msg = "child run %s is %s but holds no live lease: taken as dead"
                log.warning(msg, name, state)
                return "DEAD"
            if step == "cancel":
                why = f"no worker started it within {settings.part_start_timeout_s:.0f} s"
                await _cancel(client, child, why)  # best effort: the part's claim decides
                log.warning("child run %s: %s; its part is finished here", name, why)
                return "NOT_STARTED"
            await asyncio.sleep(WATCH_EVERY_S)


def _lease_alive(run: RunState, child_id: str) -> bool:
    """Whether the child's lease is alive; an unreadable one counts as alive (never take a part
    over on a store blip)."""
    try:
        return run.ledger.lease_alive(child_id)
    except LedgerUnavailable:
        return True


async def _cancel(client: PrefectClient, child: FlowRun, why: str) -> None:
    """Cancel a child run that has not started (a worker that takes it at this very moment
    wins; the part's claim then keeps the two apart)."""
    with contextlib.suppress(Exception):
        await client.set_flow_run_state(child.id, Cancelled(message=why))


def _read_part_results(run: RunState, k: int) -> tuple[list[ItemResult], dict[str, Any]] | None:
    store, folder = run.rt.store, part_folder(run.run_id, k)
    try:
        texts = [
            with_retries(partial(store.read_text, key), key)
            for key in (run_key(folder, "results.jsonl"), run_key(folder, "summary.json"))
        ]
        return from_jsonl(texts[0]), json.loads(texts[1])
    except (OSError, ValueError):
        return None


def _merge_budget(run: RunState, summary: dict[str, Any], part_name: str) -> None:
    """A child's cap refusals and stop reasons become the parent's (its verdict names them);
    not a lost lease: that was the child's, not the parent's. Bad values are left out."""
    run.budget.capped += int(_number(summary.get("capped"), default=0))
    stops = summary.get("stops")
    for why, message in stops.items() if isinstance(stops, dict) else []:
        if why in {s.value for s in Stop} and why != Stop.LEASE:
            # every POST of that part was refused: said of the part (its siblings' may not be)
            said = f"{part_name}: {message}" if why == Stop.RATE_LIMITED else str(message)
            run.budget.stop(Stop(why), said)


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
    and a short summary under the parent's run folder, for the parent to collect. It holds the
    part's claim first: a part the parent already took over is left alone."""
    pid = part_run_id(run_id, part)
    try:
        async with opened_run(
            job.options, pid, force=job.force, resubmit_lost=job.resubmit_lost,
            dry_run=job.options.dry_run, advise=False,
        ) as run:  # fmt: skip
            owner = await run.rt.blocking(run.ledger.part_owner, pid)
            if owner != run_id:  # the batch run took the part over: never take it back from it
                owner = await run.rt.blocking(run.ledger.claim_part, pid)
            if owner is None and not await run.rt.blocking(run.ledger.lease_alive, run_id):
                msg = (
                    f"part {pid}: the batch run {run_id} is over (cancelled, or it stopped): "
                    "nothing done here; run the batch again to finish it"
                )
                return Cancelled(name="BatchRunOver", message=msg)
            if owner is not None:
                msg = f"part {pid} is held by run {owner}: nothing done here"
                return Completed(name="PartTakenOver", message=msg)
            parsed = await read_manifest(job.manifest, job.options.item_defaults())
            if isinstance(parsed, ManifestError):
                return Failed(name="BadManifest", message=f"part {pid}: {parsed}")
            try:
                items = part_items(parsed.items, job.rows, job.row_keys)
            except ValueError as exc:  # nothing paid: the parent finishes the part as it read it
                return Failed(name="ManifestChanged", message=f"part {pid}: {exc}")
            run.rt.board.plan = run.rt.board.plan.for_batch(len(items))  # probes it can afford
            await run.rt.blocking(run.know_records, items)  # tasks and results already owned
            run.parts.runs = frozenset({run_id})  # what the batch run decided for an item stands
            run.parts.claim = pid  # each item checks the part is still this run's before it starts
            run.parts.batch_run = run_id  # ... and that the batch run still lives
            run.budget.cap_is_share = True  # its cap is its share (or none), not the user's cap
            run.chosen = job.rerun
            one, on_error = partial(check_and_run, run), partial(_internal_error, pid)
            results = await Parts(items, max(1, len(items)), one, on_error).in_order()
            summary = {
                "run_id": pid,
                "part_of": run_id,
                "items": len(results),
                "capped": run.budget.capped,
                "spent_usd": math.ceil(run.budget.spent_usd * 1e6) / 1e6,  # reserved: >= spent
                "stops": {str(why): msg for why, msg in run.budget.stops.items()},
                "concurrency": run.slots.limit.summary(),
            }
            await run.rt.blocking(save_stats, run.rt.store, run.rt.board.stats, run.rt.warn)
            folder = part_folder(run_id, part)
            url, error = await run.rt.blocking(
                write_results, run.rt.store, folder, results, summary
            )
            if error is not None:  # written on this machine only: the parent finishes the part
                return Failed(name="ResultsNotStored", message=f"part {pid}: {error}")
            get_run_logger().info("part %s: %d items; results at %s", pid, len(results), url)
            return summary
    except RunNotStarted as exc:  # this worker lacks a block, key or store: the parent finishes
        return not_started(exc)
