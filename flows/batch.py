"""The batch flow: manifest -> validate -> submit -> poll -> store -> report.

Run it with `hailuo-batch run MANIFEST --output URL`, from a deployment, or as a function.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
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
from prefect.concurrency.asyncio import concurrency as global_concurrency
from prefect.runtime import flow_run
from prefect.states import Failed, State
from pydantic import Field

from flows.tasks import (
    Runtime,
    poll_item,
    read_balance,
    read_manifest,
    store_video,
    submit_item,
    validate_item,
)
from hailuo_batch.apixo import (
    AmbiguousSubmitError,
    ApixoClient,
    AuthenticationError,
    InsufficientCreditsError,
    InvalidRequestError,
    Mode,
    Provider,
    TaskState,
)
from hailuo_batch.manifest import ItemDefaults, ManifestItem, RowError
from hailuo_batch.policy import Prices, after_failure, classify_fail_code, estimate_cost
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

GLOBAL_LIMIT = "apixo"


@dataclass
class RunControl:
    """Run-level stops: 401 aborts everything, 402 stops new submissions."""

    abort: str | None = None
    stop_submitting: str | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


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
            finished_at=_now(),
        )
        for row, errs in sorted(by_row.items())
    ]


def _base(item: ManifestItem, run_id: str, **kw: Any) -> ItemResult:
    return ItemResult(
        id=item.id,
        row=item.row,
        image_url=item.image_url,
        prompt=item.prompt,
        mode=str(item.mode),
        duration=item.duration,
        provider=str(item.provider),
        input_hash=item.input_hash,
        run_id=run_id,
        finished_at=_now(),
        **kw,
    )


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
    storage_options: dict[str, Any] = {}
    out = output or settings.output
    if storage_block:
        from blocks.apixo import OutputStorage

        sb: OutputStorage = await OutputStorage.aload(storage_block)  # type: ignore[assignment]
        out = output or sb.url
        storage_options = sb.storage_options()
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


async def _run_item(
    rt: Runtime,
    v: Preflight,
    run_id: str,
    ctl: RunControl,
    prices: Prices,
    slots: asyncio.Semaphore,
) -> ItemResult:
    """One item's life: submit, poll, store; transient failures resubmitted a bounded number."""
    item = v.item
    assert v.request is not None  # only valid items get here
    unit_cost = estimate_cost(str(item.mode), item.duration, prices)
    attempts = 0
    cost = 0.0
    async with slots, global_concurrency(GLOBAL_LIMIT, occupy=1, strict=False):
        while True:
            if ctl.abort or ctl.stop_submitting:
                reason = ctl.abort or ctl.stop_submitting
                status = ItemStatus.NOT_SUBMITTED if attempts == 0 else ItemStatus.FAILED
                return _base(
                    item, run_id, status=status, fail_msg=reason, attempts=attempts, cost_usd=cost
                )
            sub = await submit_item(rt, item, v.request)
            if sub.task_id is None:
                err = sub.error
                if isinstance(err, AuthenticationError):
                    ctl.abort = f"authentication failed (HTTP 401): {err}"
                    continue
                if isinstance(err, InsufficientCreditsError):
                    ctl.stop_submitting = f"insufficient balance (HTTP 402): {err}"
                    continue
                status = ItemStatus.FAILED
                if isinstance(err, AmbiguousSubmitError):
                    status = ItemStatus.UNCERTAIN
                elif isinstance(err, InvalidRequestError):
                    status = ItemStatus.INVALID
                elif attempts == 0 and not isinstance(err, AmbiguousSubmitError):
                    status = ItemStatus.NOT_SUBMITTED
                code = getattr(err, "status_code", None)
                return _base(
                    item,
                    run_id,
                    status=status,
                    attempts=attempts,
                    cost_usd=cost,
                    fail_code=f"HTTP_{code}" if code else "SUBMIT_ERROR",
                    fail_msg=str(err),
                )
            attempts += 1
            cost += unit_cost
            polled = await poll_item(rt, item, sub.task_id)
            common = {"task_id": sub.task_id, "attempts": attempts, "cost_usd": round(cost, 4)}
            if polled.fatal is not None:
                ctl.abort = f"authentication failed (HTTP 401): {polled.fatal}"
            st = polled.status
            if st is None:
                code, _, msg = (polled.error or "POLL_ERROR: unknown").partition(": ")
                return _base(
                    item, run_id, status=ItemStatus.FAILED, fail_code=code, fail_msg=msg, **common
                )
            if st.state == TaskState.SUCCESS:
                if not st.result_urls:
                    return _base(
                        item,
                        run_id,
                        status=ItemStatus.FAILED,
                        fail_code="NO_RESULT_URL",
                        fail_msg="success without resultUrls",
                        **common,
                    )
                try:
                    stored = await store_video(rt, item, st.result_urls[0])
                except Exception as exc:  # noqa: BLE001 - recorded loudly, the run goes on
                    return _base(
                        item,
                        run_id,
                        status=ItemStatus.FAILED,
                        fail_code="DOWNLOAD_FAILED",
                        fail_msg=str(exc),
                        cost_time_ms=st.cost_time_ms,
                        **common,
                    )
                return _base(
                    item,
                    run_id,
                    status=ItemStatus.SUCCEEDED,
                    video=stored.url,
                    bytes=stored.size,
                    sha256=stored.sha256,
                    cost_time_ms=st.cost_time_ms,
                    **common,
                )
            fail_class = classify_fail_code(st.fail_code, rt.settings.failcode_policy)
            action = after_failure(fail_class, attempts, rt.settings.transient_max_resubmits)
            if action == "resubmit":
                get_run_logger().info(
                    "item %s: transient %s, resubmitting (attempt %d)",
                    item.id,
                    st.fail_code,
                    attempts + 1,
                )
                continue
            if action == "stop_submitting":
                ctl.stop_submitting = f"insufficient credits ({st.fail_code})"
            status = ItemStatus.SKIPPED if action == "skip" else ItemStatus.FAILED
            return _base(
                item,
                run_id,
                status=status,
                fail_code=st.fail_code,
                fail_msg=st.fail_msg,
                cost_time_ms=st.cost_time_ms,
                **common,
            )


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


@flow(name="generate-videos", log_prints=True)
async def generate_videos(
    manifest: Annotated[
        str, Field(description="Manifest: CSV, JSONL or JSON; path or fsspec URL.")
    ],
    output: Annotated[
        str | None, Field(description="Output location (path, file:// or s3://bucket/prefix).")
    ] = None,
    mode: Annotated[Mode, Field(description="Default mode for rows without one.")] = Mode.STANDARD,
    duration: Annotated[
        Literal[6, 10], Field(description="Default clip length for standard rows.")
    ] = 6,
    provider: Annotated[Provider, Field(description="Default provider routing.")] = Provider.AUTO,
    concurrency: Annotated[
        int, Field(ge=1, le=500, description="Items in flight at the provider at once.")
    ] = 10,
    dry_run: Annotated[
        bool, Field(description="Validate and estimate only; submit nothing.")
    ] = False,
    credentials_block: Annotated[
        str | None, Field(description="Name of an ApixoCredentials block (else APIXO_API_KEY).")
    ] = None,
    storage_block: Annotated[
        str | None, Field(description="Name of an OutputStorage block (else `output`).")
    ] = None,
) -> dict[str, Any]:
    """Turn a manifest of images and prompts into stored videos; returns the run summary."""
    started = time.monotonic()
    logger = get_run_logger()
    settings = get_settings()
    rt = await _resolve_runtime(settings, output, credentials_block, storage_block, concurrency)
    run_id = new_run_id()
    logger.info("run %s: manifest %s -> %s", run_id, manifest, rt.store.url_for(""))
    prices = Prices.from_settings(settings)
    ctl = RunControl()
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
                r = _base(
                    c.item,
                    run_id,
                    status=ItemStatus.INVALID,
                    field=c.field,
                    errors=c.errors,
                    fail_msg="; ".join(c.errors),
                )
                results.append(r)
                await progress.finished(r)
        estimate = sum(estimate_cost(str(v.item.mode), v.item.duration, prices) for v in valid)
        logger.info(
            "%d items valid, %d invalid; estimated cost $%.2f", len(valid), len(results), estimate
        )

        balance_before = balance_after = None
        if dry_run:
            for v in valid:
                r = _base(v.item, run_id, status=ItemStatus.NOT_SUBMITTED, fail_msg="dry run")
                results.append(r)
                await progress.finished(r)
        else:
            try:
                balance_before = await read_balance(rt)
            except AuthenticationError as exc:
                ctl.abort = f"authentication failed (HTTP 401): {exc}"
            slots = asyncio.Semaphore(concurrency)

            async def _one(v: Preflight) -> ItemResult:
                r = await _run_item(rt, v, run_id, ctl, prices, slots)
                await progress.finished(r)
                return r

            results += await asyncio.gather(*(_one(v) for v in valid))
            if not ctl.abort:
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
            stopped=ctl.abort or ctl.stop_submitting,
        )
        results_url = await write_results(rt, run_id, results, summary)
        summary["results"] = results_url
        await publish_report(run_id, results, summary, results_url)
        logger.info("run %s done: %s; results at %s", run_id, summary["by_status"], results_url)
    finally:
        rt.client.close()
    if ctl.abort or ctl.stop_submitting:
        return Failed(
            message=f"run {run_id} stopped: {ctl.abort or ctl.stop_submitting}", data=summary
        )  # type: ignore[return-value]
    return summary


def run_generate_videos(**params: Any) -> State[Any]:
    """Run `generate_videos` to its final state from synchronous code (CLI, demo, tests)."""

    async def _run() -> State[Any]:
        return await generate_videos(**params, return_state=True)  # type: ignore[misc]

    return asyncio.run(_run())
