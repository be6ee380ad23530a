"""The batch flow: manifest -> validate -> submit -> poll -> store -> report.

Run it with `hailuo-batch run MANIFEST --output URL`, from a deployment, or as a function.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anyio
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from pydantic import Field

from flows.item import GLOBAL_LIMIT, Batch, base_result, now_iso, run_item
from flows.tasks import (
    Runtime,
    read_balance,
    read_manifest,
    validate_item,
    watch_callbacks,
)
from hailuo_batch.apixo import (
    ApixoClient,
    AuthenticationError,
    Mode,
    Provider,
    RequestType,
)
from hailuo_batch.callbacks import CallbackStore, callback_url_for
from hailuo_batch.ledger import Ledger, plan_item
from hailuo_batch.manifest import ItemDefaults, ManifestItem, RowError
from hailuo_batch.policy import Prices, estimate_cost
from hailuo_batch.progress import ProgressState, notify
from hailuo_batch.results import (
    ItemResult,
    ItemStatus,
    dumps,
    results_as_table,
    summarize,
    summary_markdown,
    to_jsonl,
)
from hailuo_batch.settings import Settings, get_settings
from hailuo_batch.storage import OutputStore, run_key
from hailuo_batch.validation import Preflight


def new_run_id() -> str:
    fr_id = flow_run.get_id() or uuid.uuid4().hex
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{str(fr_id).replace('-', '')[:8]}"


def invalid_rows(errors: list[RowError], run_id: str) -> list[ItemResult]:
    """One `invalid` result per bad manifest row, with every field and reason of that row."""
    by_row: dict[int, list[RowError]] = {}
    for e in errors:
        by_row.setdefault(e.row, []).append(e)
    return [
        ItemResult(
            id=f"row-{row}",
            row=row,
            status=ItemStatus.INVALID,
            field=errs[0].field,
            errors=[str(e) for e in errs],
            fail_msg="; ".join(str(e) for e in errs),
            run_id=run_id,
            finished_at=now_iso(),
        )
        for row, errs in sorted(by_row.items())
    ]


async def resolve_output(
    output: str | None, storage_block: str | None, settings: Settings
) -> tuple[str, dict[str, Any]]:
    """Where outputs go and the fsspec options to reach it: `output`, else the OutputStorage
    block's URL, else HAILUO_OUTPUT; the block's S3 options whenever a block is named."""
    if not storage_block:
        return output or settings.output, {}
    from blocks.apixo import OutputStorage

    sb: OutputStorage = await OutputStorage.aload(storage_block)  # type: ignore[assignment]
    return output or sb.url, sb.storage_options()


async def _resolve_runtime(
    settings: Settings,
    output: str | None,
    credentials_block: str | None,
    storage_block: str | None,
    concurrency: int,
) -> Runtime:
    """Blocks win over environment variables; a missing key fails before anything is paid."""
    api_key = settings.apixo_api_key
    base_url = settings.apixo_base_url
    if credentials_block:
        from blocks.apixo import ApixoCredentials

        creds: ApixoCredentials = await ApixoCredentials.aload(credentials_block)  # type: ignore[assignment]
        api_key, base_url = creds.api_key, creds.base_url
    if api_key is None or not api_key.get_secret_value().strip():
        raise ValueError(
            "no apixo API key: set APIXO_API_KEY or pass credentials_block=<ApixoCredentials name>"
        )
    out, storage_options = await resolve_output(output, storage_block, settings)
    tuned = settings.model_copy(update={"apixo_api_key": api_key, "apixo_base_url": base_url})
    client = ApixoClient.from_settings(tuned)
    store = OutputStore(out, storage_options or None)
    # threads for blocking calls: one per item in flight plus a few for validation and reports
    limiter = anyio.CapacityLimiter(concurrency + 4)
    return Runtime(tuned, client, store, storage_options, limiter)


class Progress:
    """Counts finished items; updates the progress artifact and the CLI's listeners."""

    def __init__(self, total: int, run_id: str) -> None:
        self.state = ProgressState(total=total, run_id=run_id)
        self.artifact_id: Any = None
        self._last_push = 0.0

    async def start(self) -> None:
        self.artifact_id = await acreate_progress_artifact(
            0.0, key=None, description=f"hailuo-batch run {self.state.run_id}: items finished"
        )
        notify(self.state)

    async def finished(self, result: ItemResult) -> None:
        self.state.done += 1
        self.state.by_status[str(result.status)] += 1
        notify(self.state)
        now = time.monotonic()
        if self.artifact_id and (now - self._last_push > 2 or self.state.done == self.state.total):
            self._last_push = now
            await aupdate_progress_artifact(self.artifact_id, 100.0 * self.state.fraction)
        if self.state.done % max(1, self.state.total // 10) == 0:
            get_run_logger().info("progress: %s", self.state.line())


@task(name="write_results", cache_policy=NO_CACHE)
async def write_results(
    rt: Runtime, run_id: str, results: list[ItemResult], summary: dict[str, Any]
) -> str:
    """Write results.jsonl and summary.json under {output}/runs/{run_id}/ (atomically)."""
    key = run_key(run_id, "results.jsonl")
    await rt.blocking(rt.store.write_text_atomic, key, to_jsonl(results))
    await rt.blocking(rt.store.write_text_atomic, run_key(run_id, "summary.json"), dumps(summary))
    return rt.store.url_for(key)


@task(name="publish_report", cache_policy=NO_CACHE)
async def publish_report(
    run_id: str, results: list[ItemResult], summary: dict[str, Any], results_url: str
) -> None:
    """Prefect artifacts: a table of every item and a markdown summary."""
    slug = run_id.lower().replace("_", "-")
    await acreate_table_artifact(
        results_as_table(results), key=f"items-{slug}", description=f"Items of run {run_id}"
    )
    await acreate_markdown_artifact(
        summary_markdown(summary, results_url=results_url),
        key=f"summary-{slug}",
        description=f"Summary of run {run_id}",
    )


def run_name() -> str:
    """Flow run name after the manifest file, so a person finds the run in the UI."""
    manifest = str(flow_run.parameters.get("manifest", "manifest"))
    stem = manifest.rstrip("/").rsplit("/", 1)[-1]
    return f"videos-{stem}-{datetime.now(UTC):%m%d-%H%M%S}"


@flow(name="generate-videos", flow_run_name=run_name, log_prints=True)
async def generate_videos(
    manifest: str,
    output: str | None = None,
    mode: Mode = Mode.STANDARD,
    duration: Literal[6, 10] = 6,
    provider: Provider = Provider.AUTO,
    request_type: RequestType = RequestType.ASYNC,
    concurrency: Annotated[int, Field(ge=1, le=500)] = 10,
    dry_run: bool = False,
    credentials_block: str | None = None,
    storage_block: str | None = None,
    max_cost_usd: Annotated[float | None, Field(ge=0)] = None,
    fit_to_balance: bool = False,
    force: bool = False,
    rerun_of: str | None = None,
) -> dict[str, Any]:
    """Turn a manifest of images and prompts into stored videos; returns the run summary.

    Args:
        manifest: Manifest: CSV, JSONL or JSON; path or fsspec URL.
        output: Output location (path, file:// or s3://bucket/prefix).
        mode: Default mode for rows without one.
        duration: Default clip length for standard rows.
        provider: Default provider routing.
        request_type: async: poll each task. callback: the provider POSTs results to the receiver
            (HAILUO_CALLBACK_URL/TOKEN/STORE), with a slow poll as backstop.
        concurrency: Items in flight at the provider at once.
        dry_run: Validate and estimate only; submit nothing.
        credentials_block: Name of an ApixoCredentials block (else APIXO_API_KEY).
        storage_block: Name of an OutputStorage block (else `output`).
        max_cost_usd: Stop submitting once this run's estimated spend would pass it.
        fit_to_balance: If the batch costs more than the balance, submit only what fits (else fail
            before spending).
        force: Resubmit items whose earlier run ended failed, skipped or uncertain (reruns set this;
            stored videos are never redone).
        rerun_of: Results file of the run this one reruns (for the report).
    """
    started = time.monotonic()
    logger = get_run_logger()
    settings = get_settings()
    rt = await _resolve_runtime(settings, output, credentials_block, storage_block, concurrency)
    if request_type == RequestType.CALLBACK:
        _enable_callbacks(rt)
    run_id = new_run_id()
    logger.info("run %s: manifest %s -> %s", run_id, manifest, rt.store.url_for(""))
    prices = Prices.from_settings(settings)
    ledger = Ledger(rt.store, run_id, lease_ttl_s=settings.lease_ttl_s)
    b = Batch(
        rt,
        ledger,
        run_id,
        prices,
        asyncio.Semaphore(concurrency),
        force=force,
        max_cost_usd=max_cost_usd,
    )
    b.use_global_limit = await _global_limit_exists(GLOBAL_LIMIT)
    background = [asyncio.create_task(_keep_lease(rt, ledger))]
    if rt.callbacks is not None:
        background.append(asyncio.create_task(watch_callbacks(rt)))
    try:
        parsed = await read_manifest(
            rt, manifest, ItemDefaults(mode=mode, duration=duration, provider=provider)
        )
        results = invalid_rows(parsed.errors, run_id)
        progress = Progress(parsed.total_rows, run_id)
        await progress.start()
        for r in results:
            await progress.finished(r)

        checks = asyncio.Semaphore(max(4, concurrency))

        async def _check(item: ManifestItem) -> Preflight:
            async with checks:
                return await validate_item(rt, item)

        checked = await asyncio.gather(*(_check(i) for i in parsed.items))
        valid = [c for c in checked if c.ok]
        for c in checked:
            if not c.ok:
                r = base_result(
                    c.item,
                    run_id,
                    status=ItemStatus.INVALID,
                    field=c.field,
                    errors=c.errors,
                    fail_msg="; ".join(c.errors),
                )
                results.append(r)
                await progress.finished(r)
        estimate = await rt.blocking(_estimate_new_spend, b, valid)
        logger.info(
            "%d items valid, %d invalid; estimated cost of what is left to submit $%.2f",
            len(valid),
            len(results),
            estimate,
        )

        balance_before = balance_after = None
        if dry_run:
            for v in valid:
                r = base_result(v.item, run_id, status=ItemStatus.NOT_SUBMITTED, fail_msg="dry run")
                results.append(r)
                await progress.finished(r)
        else:
            try:
                balance_before = await read_balance(rt)
            except AuthenticationError as exc:
                b.abort = f"authentication failed (HTTP 401): {exc}"
            if balance_before is not None and estimate > balance_before + 1e-9:
                if not fit_to_balance:
                    raise InsufficientBalance(
                        f"the batch needs about ${estimate:.2f} but the balance is "
                        f"${balance_before:.2f}: top up, or run with fit_to_balance "
                        "(--fit-to-balance) or max_cost_usd (--max-cost) to submit what fits"
                    )
                cap = balance_before if max_cost_usd is None else min(max_cost_usd, balance_before)
                b.max_cost_usd = cap
                logger.warning(
                    "balance $%.2f < estimate $%.2f: submitting what fits", balance_before, estimate
                )

            async def _one(v: Preflight) -> ItemResult:
                r = await run_item(b, v)
                await progress.finished(r)
                return r

            results += await asyncio.gather(*(_one(v) for v in valid))
            if not b.abort:
                balance_after = await read_balance(rt)

        results.sort(key=lambda r: r.row)
        summary = summarize(
            results,
            run_id=run_id,
            wall_time_s=time.monotonic() - started,
            balance_before=balance_before,
            balance_after=balance_after,
        )
        summary.update(
            manifest=manifest,
            output=rt.store.url_for(""),
            dry_run=dry_run,
            estimated_batch_cost_usd=round(estimate, 4),
            max_cost_usd=b.max_cost_usd,
            stopped=b.abort or b.stop_submitting,
            rerun_of=rerun_of,
        )
        results_url = await write_results(rt, run_id, results, summary)
        summary["results"] = results_url
        await publish_report(run_id, results, summary, results_url)
        logger.info("run %s done: %s; results at %s", run_id, summary["by_status"], results_url)
    finally:
        for job in background:
            job.cancel()
        await rt.blocking(ledger.end_lease)
        rt.client.close()
    return final_state(b, run_id, summary)


def _enable_callbacks(rt: Runtime) -> None:
    """Callback mode needs the receiver's public URL, its secret and the delivery store."""
    s = rt.settings
    if not s.callback_url or s.callback_token is None:
        raise ValueError(
            "request_type callback needs HAILUO_CALLBACK_URL (the receiver's public base URL) "
            "and HAILUO_CALLBACK_TOKEN (its secret); start one with `hailuo-batch receiver`"
        )
    rt.callback_url = callback_url_for(s.callback_url, s.callback_token.get_secret_value())
    rt.callbacks = CallbackStore(s.callback_store)
    get_run_logger().info(
        "callback mode: deliveries read from %s; backstop status poll every %.0f s",
        rt.callbacks.store.url_for(""),
        s.callback_backstop_s,
    )


class InsufficientBalance(RuntimeError):
    """The batch would cost more than the account holds; nothing was submitted."""


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


async def _keep_lease(rt: Runtime, ledger: Ledger) -> None:
    """Renew this run's lease so other runs leave its claimed items alone."""
    while True:
        await rt.blocking(ledger.heartbeat)
        await asyncio.sleep(max(0.5, ledger.lease_ttl_s / 4))


def _estimate_new_spend(b: Batch, valid: list[Preflight]) -> float:
    """Estimated cost of the items this run still has to submit (resume-aware)."""
    total = 0.0
    for v in valid:
        rec = b.ledger.get(v.item.id)
        plan = plan_item(
            rec, v.item.input_hash, force=b.force, uncertain_policy=b.rt.settings.uncertain_policy
        )
        if plan.action == "submit":
            total += estimate_cost(str(v.item.mode), v.item.duration, b.prices)
    return total


def final_state(b: Batch, run_id: str, summary: dict[str, Any]) -> Any:
    """Completed only when nothing stopped the run; a stopped run says why in its state."""
    counts = summary["by_status"]
    if b.abort:
        return Failed(
            name="AuthenticationFailed", message=f"run {run_id} stopped: {b.abort}", data=summary
        )
    if b.stop_submitting:
        return Failed(
            name="InsufficientBalance",
            message=f"run {run_id} stopped submitting: {b.stop_submitting}; "
            f"{counts['not_submitted']} items not submitted",
            data=summary,
        )
    if b.cost_capped:
        return Completed(
            name="CostCapReached",
            message=f"max cost ${b.max_cost_usd:.2f} reached: {b.cost_capped} items not submitted",
            data=summary,
        )
    return summary


def run_flow_sync(flow_fn: Any, **params: Any) -> State[Any]:
    """Run an async flow to its final state from synchronous code (CLI, demo, tests)."""

    async def _run() -> State[Any]:
        return await flow_fn(**params, return_state=True)  # type: ignore[no-any-return]

    return asyncio.run(_run())


def run_generate_videos(**params: Any) -> State[Any]:
    return run_flow_sync(generate_videos, **params)
