"""The batch flow: manifest -> validate -> submit -> poll -> store -> report.

Run it with `hailuo-batch run MANIFEST --output URL`, from a deployment, or as a function.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
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
from hailuo_batch.artifacts import keeps_run_name, report_keys
from hailuo_batch.budget import Budget, InsufficientBalance, Stop, cap_for_balance
from hailuo_batch.callbacks import CallbackStore, callback_url_for
from hailuo_batch.ledger import Ledger, LedgerUnavailable, with_retries
from hailuo_batch.manifest import ItemDefaults, ManifestError, ManifestItem, RowError
from hailuo_batch.netguard import GuardedTransport
from hailuo_batch.pacing import AdaptiveLimit, AdaptiveSlots
from hailuo_batch.policy import Prices
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
from hailuo_batch.review import publish_review, review_markdown, video_store_key
from hailuo_batch.settings import Settings, check_output_url, get_settings
from hailuo_batch.steps import AUTH_FAILED
from hailuo_batch.storage import OutputStore, run_key
from hailuo_batch.verdict import run_verdict

#: where the results go when the output store stays unreachable at the end of a run
FALLBACK_RESULTS_DIR = "hailuo-results"


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
            # the row's own id when it had a readable one; else a name no valid id can take
            id=next((e.id for e in errs if getattr(e, "id", None)), None) or f"row#{row}",
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
        return check_output_url(output or settings.output), {}
    from blocks.apixo import OutputStorage

    sb: OutputStorage = await OutputStorage.aload(storage_block)  # type: ignore[assignment]
    return check_output_url(output or sb.url), sb.storage_options()


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
    # result URLs may point anywhere: fetched under the same private-address policy as images
    guard = GuardedTransport(allow_private=settings.allow_private_networks)
    # a submit's 429 reaches the run's limiter at once instead of being retried blindly
    client = ApixoClient.from_settings(
        tuned, download_transport=guard, retry_rate_limited_submits=False
    )
    store = OutputStore(out, storage_options or None)
    # threads for blocking calls: one per item in flight plus a few for validation and reports
    limiter = anyio.CapacityLimiter(concurrency + 4)
    return Runtime(tuned, client, store, storage_options, limiter)


class Progress:
    """Counts finished items; updates the progress artifact, the CLI's listeners and, every
    `table_every_s` seconds while items finish, a new version of the run's item table, so a
    person sees reasons during a long run and not only at the end."""

    def __init__(
        self,
        total: int,
        run_id: str,
        table: Callable[[list[ItemResult]], Awaitable[None]] | None = None,
        table_every_s: float = 10.0,
    ) -> None:
        self.state = ProgressState(total=total, run_id=run_id)
        self.artifact_id: Any = None
        self._last_push = 0.0
        self.results: list[ItemResult] = []
        self._table = table
        self._table_every_s = table_every_s
        self._last_table = time.monotonic()

    async def start(self) -> None:
        self.artifact_id = await acreate_progress_artifact(
            0.0, key=None, description=f"hailuo-batch run {self.state.run_id}: items finished"
        )
        notify(self.state)

    async def finished(self, result: ItemResult) -> None:
        self.state.done += 1
        self.state.by_status[str(result.status)] += 1
        self.results.append(result)
        notify(self.state)
        now = time.monotonic()
        if self.artifact_id and (now - self._last_push > 2 or self.state.done == self.state.total):
            self._last_push = now
            await aupdate_progress_artifact(self.artifact_id, 100.0 * self.state.fraction)
        if self.state.done % max(1, self.state.total // 10) == 0:
            get_run_logger().info("progress: %s", self.state.line())
        if (
            self._table is not None
            and now - self._last_table > self._table_every_s
            and self.state.done < self.state.total  # the final table comes with the report
        ):
            self._last_table = now
            await self._table(sorted(self.results, key=lambda r: r.row))


@task(name="write_results", cache_policy=NO_CACHE)
async def write_results(
    rt: Runtime, run_id: str, results: list[ItemResult], summary: dict[str, Any]
) -> str:
    """Write results.jsonl and summary.json under {output}/runs/{run_id}/ (atomically).

    If the output store stays unreachable, they go to `./hailuo-results/{run_id}/` on this
    machine instead, and the run says so: the results are never lost with the store.
    """
    files = {"results.jsonl": to_jsonl(results), "summary.json": dumps(summary)}
    try:
        for name, text in files.items():
            key = run_key(run_id, name)
            await rt.blocking(with_retries, partial(rt.store.write_text_atomic, key, text), key)
        return rt.store.url_for(run_key(run_id, "results.jsonl"))
    except LedgerUnavailable as exc:
        fallback = OutputStore(str(Path(FALLBACK_RESULTS_DIR).absolute()))
        for name, text in files.items():
            await rt.blocking(fallback.write_text_atomic, f"{run_id}/{name}", text)
        url = fallback.url_for(f"{run_id}/results.jsonl")
        rt.log(
            "the output store did not take the results (%s): written to %s instead",
            exc,
            url,
            level=logging.ERROR,
        )
        summary["results_fallback"] = url
        return url


@task(name="publish_report", cache_policy=NO_CACHE)
async def publish_report(
    rt: Runtime,
    run_id: str,
    results: list[ItemResult],
    summary: dict[str, Any],
    results_url: str,
    keys: tuple[str, str],
    extra_md: str = "",
) -> None:
    """Prefect artifacts: a table of every item and a markdown summary, under `keys`
    (`artifact_keys`: the same from run to run, one per deployment, else per manifest file, so
    the Artifacts page shows one key's history rather than two new keys per run)."""
    items_key, summary_key = keys
    await publish_item_table(rt, run_id, results, items_key)
    await acreate_markdown_artifact(
        summary_markdown(summary, results_url=results_url) + extra_md,
        key=summary_key,
        description=f"Summary of run {run_id}",
    )


async def artifact_keys(rt: Runtime, manifest: str) -> tuple[str, str]:
    """The item table's and the summary's artifact keys for this run."""

    def _deployment_name() -> str | None:
        from prefect.runtime import deployment

        try:
            return deployment.name  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001 - no deployment known: the manifest names the keys
            return None

    deployment_name = await rt.blocking(_deployment_name)  # may read the API: off the loop
    return report_keys(deployment_name, manifest)


async def publish_item_table(
    rt: Runtime, run_id: str, results: list[ItemResult], key: str, *, partial_of: int = 0
) -> None:
    """A new version of the item table artifact `key`: reasons, prompts, links."""
    expiry = rt.settings.presign_expiry_s
    table = await rt.blocking(results_as_table, results, partial(_video_link, rt.store, expiry))
    links = "" if rt.store.is_local else f"; video links expire after {expiry / 3600:g} h"
    so_far = f" ({len(results)} of {partial_of} finished so far)" if partial_of else ""
    await acreate_table_artifact(
        table, key=key, description=f"Items of run {run_id}{so_far}{links}"
    )


@task(name="publish_previews", cache_policy=NO_CACHE)
async def publish_previews(
    rt: Runtime, run_id: str, results: list[ItemResult]
) -> tuple[str, str] | None:
    """Posters beside the videos, a contact sheet and the review page `runs/{run_id}/index.html`.

    Returns the page's URL and the markdown that links it (None if the store refused them:
    previews never fail a run).
    """

    def _publish() -> tuple[str, str]:
        outputs = publish_review(rt.store, run_id, results)
        md = review_markdown(rt.store, outputs, expires_s=rt.settings.presign_expiry_s)
        return rt.store.url_for(outputs.page_key), "\n" + md

    try:
        return await rt.blocking(_publish)
    except (OSError, ValueError) as exc:
        rt.log("review page not written: %s", exc, level=logging.WARNING)
        return None


def _video_link(store: OutputStore, expires_s: int, r: ItemResult) -> str | None:
    """A link a browser can open: presigned HTTPS on an object store, the path locally."""
    key = video_store_key(store, r.video)
    if key is None or store.is_local:
        return r.video
    try:
        return store.presign(key, expires_s)
    except (OSError, ValueError, RuntimeError):
        return r.video


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
    resubmit_lost: bool = False,
    max_failure_share: Annotated[float | None, Field(ge=0, le=1)] = None,
) -> Any:
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
        resubmit_lost: Pay for a new task for items whose task the provider lost (404 or poll
            timeout); they are reported as possible duplicate charges.
        max_failure_share: The run ends Failed when more than this share of items (0 to 1) did
            not succeed; by default only a run with no success, or one that stopped, is Failed.
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
        AdaptiveSlots(AdaptiveLimit(ceiling=concurrency)),
        budget=Budget(cap_usd=max_cost_usd),
        force=force,
        resubmit_lost=resubmit_lost,
    )
    b.use_global_limit = await _global_limit_exists(GLOBAL_LIMIT)
    await rt.blocking(ledger.heartbeat)  # a lease before any claim; a dead store fails here
    background = [asyncio.create_task(_keep_lease(rt, ledger, b.budget))]
    if rt.callbacks is not None:
        background.append(asyncio.create_task(watch_callbacks(rt)))
    try:
        parsed = await read_manifest(
            rt, manifest, ItemDefaults(mode=mode, duration=duration, provider=provider)
        )
        if isinstance(parsed, ManifestError):  # nothing was paid: one clean message
            return Failed(name="BadManifest", message=f"run {run_id}: {parsed}")
        results = invalid_rows(parsed.errors, run_id)
        keys = await artifact_keys(rt, manifest)
        items_key = keys[0]
        progress = Progress(
            parsed.total_rows,
            run_id,
            table=lambda so_far: publish_item_table(
                rt, run_id, so_far, items_key, partial_of=parsed.total_rows
            ),
            table_every_s=settings.table_every_s,
        )
        await progress.start()
        for r in results:
            await progress.finished(r)

        # the estimate needs only each row's mode and duration, so the balance and cost guards
        # hold before the first payment while images are still being checked
        estimate = await rt.blocking(_estimate_new_spend, b, parsed.items)
        logger.info(
            "%d rows to check, %d invalid; estimated cost of what is left to submit $%.2f",
            len(parsed.items),
            len(results),
            estimate,
        )
        balance_before = balance_after = None
        if not dry_run:
            try:
                balance_before = await _check_balance(rt, b, estimate, fit_to_balance, max_cost_usd)
            except InsufficientBalance as exc:  # nothing was paid: one clean message
                logger.error("run %s: %s", run_id, exc)
                return Failed(name="InsufficientBalance", message=str(exc))

        checks = asyncio.Semaphore(max(4, concurrency))
        would_cost = 0.0

        async def _one(item: ManifestItem) -> ItemResult:
            """Check one row's image, then (valid, not a dry run) run it: submissions start
            as soon as the first rows are checked."""
            nonlocal would_cost
            async with checks:
                v = await validate_item(rt, item, stage=not dry_run)
            if not v.ok:
                r = base_result(
                    v.item, run_id, status=ItemStatus.INVALID, field=v.field, errors=v.errors,
                    fail_msg="; ".join(v.errors),
                )  # fmt: skip
            elif dry_run:
                would_cost += b.unit_cost(item)
                r = base_result(item, run_id, status=ItemStatus.NOT_SUBMITTED, fail_msg="dry run")
            else:
                r = await run_item(b, v)
            await progress.finished(r)
            return r

        results += await asyncio.gather(*(_one(i) for i in parsed.items))
        if not dry_run and (b.budget.stopped is None or b.budget.stopped[0] == Stop.BALANCE):
            balance_after = (await read_balance(rt)).usd
        if dry_run:
            estimate = would_cost

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
            max_cost_usd=b.budget.cap_usd,
            stopped=b.budget.stopped[1] if b.budget.stopped else None,
            concurrency=b.slots.limit.summary(),
            rerun_of=rerun_of,
        )
        results_url = await write_results(rt, run_id, results, summary)
        review = await publish_previews(rt, run_id, results)
        if review is not None:
            summary["review_page"], review_md = review
        summary["results"] = results_url
        await publish_report(
            rt, run_id, results, summary, results_url, keys, extra_md=review_md if review else ""
        )
        logger.info("run %s done: %s; results at %s", run_id, summary["by_status"], results_url)
    finally:
        for job in background:
            job.cancel()
        with contextlib.suppress(LedgerUnavailable):  # an unended lease simply expires
            await rt.blocking(ledger.end_lease)
        rt.client.close()
    return final_state(
        b,
        run_id,
        summary,
        max_failure_share=max_failure_share,
        dry_run=dry_run,
        would_cost_usd=summary["estimated_batch_cost_usd"],
    )


async def _check_balance(
    rt: Runtime, b: Batch, estimate: float, fit_to_balance: bool, max_cost_usd: float | None
) -> float | None:
    """Read the balance before the first payment and apply the balance policy to the budget.

    401 or an API that does not answer stop the run here; a batch that costs more than the
    balance fails before spending unless `fit_to_balance` caps it at the balance.
    """
    read = await read_balance(rt)
    balance, exc = read.usd, read.error
    if isinstance(exc, AuthenticationError):
        b.budget.stop(Stop.AUTH, f"{AUTH_FAILED}: {exc}")
        return None
    if exc is not None:
        b.budget.stop(
            Stop.UNREACHABLE,
            f"the apixo API at {rt.settings.apixo_base_url} did not answer ({exc}); "
            "nothing was submitted: check APIXO_BASE_URL and the network, then run again",
        )
        return None
    cap = cap_for_balance(
        estimate, balance, fit_to_balance=fit_to_balance, max_cost_usd=max_cost_usd
    )  # raises InsufficientBalance before anything is paid
    if cap != b.budget.cap_usd:
        b.budget.cap_usd = cap
        get_run_logger().warning(
            "balance $%.2f < estimate $%.2f: submitting what fits", balance, estimate
        )
    return balance


def _enable_callbacks(rt: Runtime) -> None:
    """Callback mode needs the receiver's public URL, its secret and the delivery store."""
    s = rt.settings
    if not s.callback_url or s.callback_token is None:
        raise ValueError(
            "request_type callback needs HAILUO_CALLBACK_URL (the receiver's public base URL) "
            "and HAILUO_CALLBACK_TOKEN (its secret); start one with `hailuo-batch receiver`"
        )
    token = s.callback_token.get_secret_value()
    rt.callback_url = callback_url_for(s.callback_url, token)
    rt.client.add_secret(token)  # never in a message, result, ledger or log line
    rt.client.add_secret(rt.callback_url)
    rt.callbacks = CallbackStore(s.callback_store)
    get_run_logger().info(
        "callback mode: deliveries read from %s; backstop status poll every %.0f s",
        rt.callbacks.store.url_for(""),
        s.callback_backstop_s,
    )


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


async def _keep_lease(rt: Runtime, ledger: Ledger, budget: Budget) -> None:
    """Renew this run's lease so other runs leave its claimed items alone.

    Each renewal retries storage failures with backoff; a failed renewal is logged and tried
    again on the next beat. If the lease could lapse before it is renewed, the run stops
    submitting (other runs may then take its items) and says so; in-flight items go on.
    """
    while True:
        await asyncio.sleep(max(0.5, ledger.lease_ttl_s / 8))
        try:
            await rt.blocking(ledger.heartbeat)
        except LedgerUnavailable as exc:
            rt.log("lease renewal failed, trying again: %s", exc, level=logging.WARNING)
        if not ledger.lease_fresh():
            budget.stop(
                Stop.LEASE,
                f"the run's lease could not be renewed for {ledger.lease_ttl_s * 0.75:.0f} s "
                "(output store unreachable?): stopped submitting so that no other run pays "
                "for the same items",
            )


def _estimate_new_spend(b: Batch, items: list[ManifestItem]) -> float:
    """Estimated cost of the rows this run still has to submit (resume-aware; rows whose image
    turns out invalid are counted, so the estimate errs on the safe side)."""
    total = 0.0
    for item in items:
        try:
            plan = b.plan(item, b.ledger.get(item.id))
        except LedgerUnavailable:
            continue  # the item itself says so when it runs; it is never submitted blind
        if plan.action == "submit":
            total += b.unit_cost(item)
    return total


def final_state(b: Batch, run_id: str, summary: dict[str, Any], **kw: Any) -> Any:
    """The run's state: its type and name say at a glance whether every item made it."""
    v = run_verdict(
        summary["by_status"],
        run_id=run_id,
        stopped=b.budget.stopped,
        capped=b.budget.capped,
        cap_usd=b.budget.cap_usd,
        **kw,
    )
    if v.name == "Completed":
        # a plain return value: Prefect hands it back to the caller as is (a returned State's
        # data can be dropped when the server answers the state proposal with its own state)
        return summary
    make = Completed if v.kind == "completed" else Failed
    return make(name=v.name, message=v.message, data=summary)


def run_flow_sync(flow_fn: Any, **params: Any) -> State[Any]:
    """Run an async flow to its final state from synchronous code (CLI, demo, tests)."""

    async def _run() -> State[Any]:
        return await flow_fn(**params, return_state=True)  # type: ignore[no-any-return]

    return asyncio.run(_run())


def run_generate_videos(**params: Any) -> State[Any]:
    return run_flow_sync(generate_videos, **params)
