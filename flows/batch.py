"""The batch flow: manifest -> check -> submit -> poll -> store -> report."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from functools import partial
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import PrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Failed, State

from flows import report
from flows.item import GLOBAL_LIMIT, RunState, check_and_run
from flows.runtime import Runtime, end_state, open_runtime, runtime
from flows.tasks import read_balance, read_manifest
from hailuo_batch import outcomes
from hailuo_batch.artifacts import keeps_run_name
from hailuo_batch.budget import Budget, InsufficientBalance, Stop, apply_balance
from hailuo_batch.jobs import running
from hailuo_batch.ledger import Ledger, LedgerUnavailable, keep_lease, planned_spend
from hailuo_batch.manifest import Manifest, ManifestError, ManifestItem
from hailuo_batch.options import BatchOptions, flow_parameters
from hailuo_batch.pacing import AdaptiveLimit, AdaptiveSlots
from hailuo_batch.parts import ItemRunner, Parts
from hailuo_batch.policy import Prices
from hailuo_batch.polling import save_stats
from hailuo_batch.results import ItemResult, run_summary
from hailuo_batch.settings import get_settings
from hailuo_batch.verdict import run_verdict

Job = Callable[[], Coroutine[Any, Any, Any]]


def new_run_id() -> str:
    fr_id = flow_run.get_id() or uuid.uuid4().hex
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{str(fr_id).replace('-', '')[:8]}"


def run_name() -> str:
    """Flow run name after the manifest file, so a person finds the run in the UI; a name a
    person gave the run (in the UI's run form, or `--flow-run-name`) is kept."""
    current = flow_run.get_name()
    if keeps_run_name(current):
        return str(current)
    manifest = str(flow_run.parameters.get("manifest", "manifest"))
    stem = manifest.rstrip("/").rsplit("/", 1)[-1]
    return f"videos-{stem}-{datetime.now(UTC):%m%d-%H%M%S}"


@flow(name="generate-videos", flow_run_name=run_name, log_prints=True)
async def generate_videos(
    manifest: str,
    options: BatchOptions = BatchOptions(),  # frozen: one shared default is safe
    force: bool = False,
    resubmit_lost: bool = False,
    rerun_of: str | None = None,
) -> Any:
    """Turn a manifest of images and prompts into stored videos; returns the run summary.

    Args:
        manifest: Manifest: CSV, JSONL or JSON; path or fsspec URL.
        options: How to run the batch (output, defaults for rows, concurrency, money guards,
            blocks); each option is described in the form.
        force: Resubmit items whose earlier run ended failed, skipped or uncertain (reruns set
            this; stored videos are never redone).
        resubmit_lost: Pay for a new task for items whose task the provider lost (404 or poll
            timeout); they are reported as possible duplicate charges.
        rerun_of: Results file of the run this one reruns (for the report).
    """
    started = time.monotonic()
    settings = get_settings()
    async with open_runtime(options, settings) as rt:
        run_id = new_run_id()
        get_run_logger().info("run %s: manifest %s -> %s", run_id, manifest, rt.store.url)
        run = RunState(
            rt,
            Ledger(rt.store, run_id, lease_ttl_s=settings.lease_ttl_s),
            run_id,
            Prices.from_settings(settings),
            AdaptiveSlots(AdaptiveLimit(ceiling=options.concurrency)),
            budget=Budget(cap_usd=options.max_cost_usd),
            force=force,
            resubmit_lost=resubmit_lost,
            use_global_limit=await _global_limit_exists(GLOBAL_LIMIT),
            dry_run=options.dry_run,
            checks=asyncio.Semaphore(max(4, options.concurrency)),
            ahead=asyncio.Semaphore(max(8, 2 * options.concurrency)),
        )
        await rt.blocking(run.ledger.heartbeat)  # a lease before any claim; a dead store fails
        lease = partial(
            keep_lease, run.ledger, blocking=rt.blocking, warn=rt.warn,
            lapsed=partial(run.budget.stop, Stop.LEASE),
        )  # fmt: skip
        jobs: list[Job] = [lease, partial(_follow_records, rt)]
        jobs += [rt.waiter.run] if rt.waiter else []
        try:
            async with running(*jobs):
                return await _run_batch(run, manifest, options, rerun_of, started)
        finally:
            with contextlib.suppress(LedgerUnavailable):  # an unended lease simply expires
                await rt.blocking(run.ledger.end_lease)


async def _run_batch(
    run: RunState, manifest: str, options: BatchOptions, rerun_of: str | None, started: float
) -> Any:
    """Read the manifest, guard the money, run every row, report; the run's final state."""
    parsed = await read_manifest(manifest, options.item_defaults())
    if isinstance(parsed, ManifestError):  # nothing was paid: one clean message
        return Failed(name="BadManifest", message=f"run {run.run_id}: {parsed}")
    results = outcomes.invalid_rows(parsed.errors, run.run_id)
    keys = await report.artifact_keys(manifest)
    progress = await report.start_progress(run.run_id, parsed.total_rows, keys[0])
    for r in results:
        await progress.finished(r)
    try:
        estimate, balance_before = await _guard_money(run, parsed, options, len(results))
    except InsufficientBalance as exc:  # nothing was paid: one clean message
        get_run_logger().error("run %s: %s", run.run_id, exc)
        return Failed(name="InsufficientBalance", message=str(exc))

    async def _one(item: ManifestItem) -> ItemResult:
        r = await check_and_run(run, item)
        try:
            await progress.finished(r)
        except Exception as exc:  # noqa: BLE001 - a refused artifact must not touch the item
            run.rt.warn(f"progress not published: {exc}")
        return r

    results += await _run_items(run.run_id, parsed.items, _one, run.rt.settings.items_per_flow_run)
    balance_after, stopped = None, run.budget.stopped
    if not options.dry_run and (stopped is None or stopped[0] == Stop.BALANCE):
        balance_after = (await read_balance()).usd
    results.sort(key=lambda r: r.row)
    summary = run_summary(
        results,
        run_id=run.run_id,
        wall_time_s=time.monotonic() - started,
        balance_before=balance_before,
        balance_after=balance_after,
        budget=run.budget,
        estimate_usd=run.would_cost_usd if options.dry_run else estimate,
        manifest=manifest,
        output=run.rt.store.url,
        dry_run=options.dry_run,
        concurrency=run.slots.limit.summary(),
        generation_s=run.rt.board.stats.summary(),
        held_for_prefect_s=round(run.rt.recorder.waited_s, 1),
        rerun_of=rerun_of,
    )
    if not options.dry_run:
        await run.rt.blocking(save_stats, run.rt.store, run.rt.board.stats, run.rt.warn)
    await _report(run.run_id, results, summary, keys)
    return final_state(run, summary, options)


#: the large runs going on in this process, by run id
_PARTS: dict[str, Parts] = {}
CHILD_RETRY_PAUSES_S = (5.0, 20.0)


async def _run_items(
    run_id: str, items: list[ManifestItem], one: ItemRunner, size: int
) -> list[ItemResult]:
    """Every item once (in child runs past `size` items); one that raised ends INTERNAL_ERROR."""
    scrub = runtime().scrub
    parts = Parts(items, size, one, lambda i, exc: outcomes.internal_error(i, run_id, exc, scrub))
    if len(parts.parts) > 1:
        _PARTS[run_id] = parts
        name, n = flow_run.get_name(), len(parts.parts)
        try:
            await asyncio.gather(
                *(_child(run_id, k, f"{name}-part-{k + 1}-of-{n}") for k in range(n))
            )
        finally:
            del _PARTS[run_id]
    return await parts.in_order()  # starts what a failed child run never started


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
async def run_part(run_id: str, part: int) -> int:
    """Part `part` of the large run `run_id`: its items' submits and polls, in its process."""
    return await _PARTS[run_id].run_left(part)


async def _guard_money(
    run: RunState, parsed: Manifest, options: BatchOptions, invalid: int
) -> tuple[float, float | None]:
    """Estimate what is left to submit and apply the balance policy (`apply_balance`);
    returns the estimate and the balance."""
    estimate = await run.rt.blocking(
        planned_spend, run.ledger, parsed.items, run.plan, run.unit_cost
    )
    msg = "%d rows to check, %d invalid; estimated cost of what is left to submit $%.2f"
    get_run_logger().info(msg, len(parsed.items), invalid, estimate)
    if options.dry_run:
        return estimate, None
    read = await read_balance()
    warning = apply_balance(
        run.budget, estimate, read.usd, read.error,
        fit_to_balance=options.fit_to_balance, api_url=run.rt.client.base_url,
    )  # fmt: skip
    if warning:
        get_run_logger().warning(warning)
    return estimate, read.usd


async def _report(
    run_id: str, results: list[ItemResult], summary: dict[str, Any], keys: tuple[str, str]
) -> None:
    """Results files, review page, item table and summary artifacts."""
    results_url = await report.write_results(run_id, results, summary)
    review = await report.publish_previews(run_id, results)
    review_md = ""
    if review is not None:
        summary["review_page"], review_md = review
    summary["results"] = results_url
    await report.publish_report(run_id, results, summary, results_url, keys, extra_md=review_md)
    get_run_logger().info(
        "run %s done: %s; results at %s", run_id, summary["by_status"], results_url
    )


async def _follow_records(rt: Runtime) -> None:
    """Keep the run's back-pressure (`RecorderLag`) on what the Prefect server has recorded."""
    async with get_client() as client:
        await rt.recorder.follow(partial(_count_recorded, client), warn=rt.warn)


async def _count_recorded(client: PrefectClient) -> int:
    """Finished task runs of this run and its child runs that the Prefect server has recorded."""
    me, done = flow_run.get_id(), ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]
    counts = [
        await client._client.post(
            "/task_runs/count",
            json={"flow_runs": runs, "task_runs": {"state": {"type": {"any_": done}}}},
        )
        for runs in ({"id": {"any_": [me]}}, {"parent_flow_run_id": {"any_": [me]}})
    ]
    return sum(int(c.json()) for c in counts)


async def _global_limit_exists(name: str) -> bool:
    """Whether the Prefect global concurrency limit `name` exists and is active."""
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            get_run_logger().info(
                "no global concurrency limit %r: items limited per run only", name
            )
            return False
    get_run_logger().info("global concurrency limit %r: %s slots", name, limit.limit)
    return bool(limit.active)


def final_state(run: RunState, summary: dict[str, Any], options: BatchOptions) -> Any:
    """The run's state: its type and name say at a glance whether every item made it."""
    v = run_verdict(
        summary["by_status"],
        run_id=run.run_id,
        stopped=run.budget.stopped,
        capped=run.budget.capped,
        cap_usd=run.budget.cap_usd,
        max_failure_share=options.max_failure_share,
        dry_run=options.dry_run,
        would_cost_usd=summary["estimated_batch_cost_usd"],
    )
    return end_state(v.kind == "completed", v.name, v.message, summary)


def run_flow_sync(flow_fn: Any, **params: Any) -> State[Any]:
    """Run an async flow to its final state from synchronous code (CLI, demo, tests); batch
    options may be given flat (`concurrency=4`) or as `options=`."""
    params = flow_parameters(flow_fn, **params)

    async def _run() -> State[Any]:
        return await flow_fn(**params, return_state=True)  # type: ignore[no-any-return]

    return asyncio.run(_run())


def run_generate_videos(**params: Any) -> State[Any]:
    return run_flow_sync(generate_videos, **params)
