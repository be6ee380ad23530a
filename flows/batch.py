"""The batch flow: manifest -> check -> submit -> poll -> store -> report."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State

from flows import report
from flows.item import RunState, check_and_run
from flows.parts import run_items
from flows.run import RunNotStarted, new_run_id, not_started, opened_run
from flows.runtime import WARNING_MARK, end_state
from flows.tasks import read_balance, read_manifest
from hailuo_batch import outcomes
from hailuo_batch.artifacts import keeps_run_name
from hailuo_batch.budget import (
    InsufficientBalance,
    Stop,
    apply_balance,
    dry_run_money,
    overspend_warning,
)
from hailuo_batch.ledger import planned_costs
from hailuo_batch.manifest import Manifest, ManifestError, ManifestItem
from hailuo_batch.options import BatchOptions, flow_parameters
from hailuo_batch.parts import PartJob
from hailuo_batch.polling import save_stats
from hailuo_batch.rerun import is_selection
from hailuo_batch.results import ItemResult, run_summary
from hailuo_batch.secrets import redact_urls
from hailuo_batch.verdict import run_verdict

__all__ = ["generate_videos", "new_run_id", "run_generate_videos"]


def run_name() -> str:
    """Flow run name after the manifest file, so a person finds the run in the UI; a name a
    person gave the run (in the UI's run form, or `--flow-run-name`) is kept."""
    current = flow_run.get_name()
    if keeps_run_name(current):
        return str(current)
    manifest = str(flow_run.parameters.get("manifest", "manifest"))
    if "://" in manifest:  # a URL: its file name, without user information or query
        manifest = urlsplit(manifest).path or "manifest"
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
        force: Resubmit items whose earlier run ended failed, skipped or uncertain; never
            a content violation or unchanged bad input (rerun-failed with a failCode named
            does that); stored videos are never redone.
        resubmit_lost: Pay for a new task for items whose task the provider lost (404 or poll
            timeout); they are reported as possible duplicate charges.
        rerun_of: Results file of the run this one reruns (for the report).
    """
    started = time.monotonic()
    run_id = new_run_id()
    get_run_logger().info("run %s: manifest %s", run_id, redact_urls(manifest))
    try:
        async with opened_run(
            options, run_id, force=force, resubmit_lost=resubmit_lost, dry_run=options.dry_run
        ) as run:
            # the rerun flow chose what force resubmits: its selection, not a label on a form
            run.chosen = rerun_of is not None and is_selection(manifest, run.rt.store)
            job = PartJob(
                manifest=manifest, options=options, force=force, resubmit_lost=resubmit_lost,
                rerun=run.chosen,
            )  # fmt: skip
            return await _run_batch(run, job, rerun_of, started)
    except RunNotStarted as exc:  # a bad block, key or output: one clean line, exit 2
        return not_started(exc)


async def _run_batch(run: RunState, job: PartJob, rerun_of: str | None, started: float) -> Any:
    """Read the manifest, guard the money, run every row, report; the run's final state."""
    manifest, options = job.manifest, job.options
    parsed = await read_manifest(manifest, options.item_defaults())
    if isinstance(parsed, ManifestError):  # nothing was paid: one clean message
        return Failed(name="BadManifest", message=f"run {run.run_id}: {parsed}")
    results = outcomes.invalid_rows(parsed.errors, run.run_id)
    run.rt.board.plan = run.rt.board.plan.for_batch(len(parsed.items))  # probes it can afford
    keys = await report.artifact_keys(manifest)
    progress = await report.start_progress(run.run_id, parsed.total_rows, keys[0])
    for r in results:
        await progress.finished(r)
    try:
        estimate, balance_before = await _guard_money(run, parsed, options, len(results))
    except InsufficientBalance as exc:  # nothing was paid: one clean message
        get_run_logger().error("run %s: %s", run.run_id, exc)
        return Failed(name="InsufficientBalance", message=str(exc))

    async def _publish(r: ItemResult) -> None:
        try:
            await progress.finished(r)
        except Exception as exc:  # noqa: BLE001 - a refused artifact must not touch the item
            run.rt.warn(f"progress not published: {exc}")

    async def _one(item: ManifestItem) -> ItemResult:
        r = await check_and_run(run, item)
        await _publish(r)
        return r

    results += await run_items(run, parsed.items, _one, job, published=_publish)
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
        manifest=redact_urls(manifest),
        output=run.rt.store.url,
        dry_run=options.dry_run,
        concurrency=run.slots.limit.summary(),
        parts_on_workers=run.parts.on_workers or None,
        generation_s=run.rt.board.stats.summary(),
        held_for_prefect_s=round(run.rt.recorder.waited_s, 1),
        rerun_of=rerun_of,
    )
    users_cap = None if run.budget.cap_is_balance else summary["max_cost_usd"]
    spend = overspend_warning(
        summary["balance_spent_usd"], summary["estimated_cost_usd"], users_cap
    )
    if spend:  # loud: the cap may not have held what the provider really charged
        summary["spend_warning"] = spend
        get_run_logger().warning("run %s: %s", run.run_id, spend)
    if not options.dry_run:
        await run.rt.blocking(save_stats, run.rt.store, run.rt.board.stats, run.rt.warn)
    await _report(run.run_id, results, summary, keys)
    return final_state(run, summary, options)


async def _guard_money(
    run: RunState, parsed: Manifest, options: BatchOptions, invalid: int
) -> tuple[float, float | None]:
    """Estimate what is left to submit and apply the balance policy (`apply_balance`);
    returns the estimate and the balance."""
    run.planned_costs = await run.rt.blocking(
        planned_costs, run.ledger, parsed.items, run.plan, run.unit_cost, run.know_at_start
    )
    estimate = sum(run.planned_costs.values())
    msg = "%d rows to check, %d invalid; estimated cost of what is left to submit $%.2f"
    get_run_logger().info(msg, len(parsed.items), invalid, estimate)
    read = await read_balance()
    if options.dry_run:  # said in its verdict (`dry_run_money`), applied to nothing
        run.dry_check = (estimate, read)
        return estimate, read.usd
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
        await report.rewrite_summary(run_id, summary)  # summary.json names the page too
    summary["results"] = results_url
    await report.publish_report(run_id, results, summary, results_url, keys, extra_md=review_md)
    get_run_logger().info(
        "run %s done: %s; results at %s", run_id, summary["by_status"], results_url
    )


def final_state(run: RunState, summary: dict[str, Any], options: BatchOptions) -> Any:
    """The run's state: its type and name say at a glance whether every item made it."""
    v = run_verdict(
        summary["by_status"],
        run_id=run.run_id,
        stopped=run.budget.stopped,
        capped=run.budget.capped,
        cap_usd=run.budget.cap_usd,
        users_cap=not run.budget.cap_is_balance,
        max_failure_share=options.max_failure_share,
        dry_run=options.dry_run,
        would_cost_usd=summary["estimated_batch_cost_usd"],
        would_submit=run.would_submit,
        money_note=_dry_money_note(run, summary, options),
        not_as_ordered=summary["not_as_ordered"],
        ledger_behind=summary["ledger_behind"],
    )
    message = v.message + (
        f"{WARNING_MARK}{summary['spend_warning']}" if "spend_warning" in summary else ""
    )
    return end_state(v.kind == "completed", v.name, message, summary)


def _dry_money_note(run: RunState, summary: dict[str, Any], options: BatchOptions) -> str:
    """A dry run's word on what the balance and the cap would do to the real run."""
    if not options.dry_run or run.dry_check is None:
        return ""
    estimate, read = run.dry_check
    unknown = (
        "" if read.usd is not None or read.error is not None
        else "; the balance could not be read (a real run would not check it)"
    )  # fmt: skip
    return unknown + dry_run_money(
        summary["estimated_batch_cost_usd"], estimate, read.usd, read.error,
        fit_to_balance=options.fit_to_balance, max_cost_usd=options.max_cost_usd,
        api_url=run.rt.client.base_url,
    )  # fmt: skip


def run_flow_sync(flow_fn: Any, **params: Any) -> State[Any]:
    """Run an async flow to its final state from synchronous code (CLI, demo, tests); batch
    options may be given flat (`concurrency=4`) or as `options=`."""
    params = flow_parameters(flow_fn, **params)

    async def _run() -> State[Any]:
        return await flow_fn(**params, return_state=True)  # type: ignore[no-any-return]

    return asyncio.run(_run())


def run_generate_videos(**params: Any) -> State[Any]:
    return run_flow_sync(generate_videos, **params)
