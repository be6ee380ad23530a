"""The nightly flow: every new manifest in the inbox (`hailuo_batch.inbox`) becomes one
generate-videos run."""

from __future__ import annotations

import contextlib
import functools
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

import fsspec.core
from fsspec.implementations.local import LocalFileSystem
from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from blocks.apixo import open_client, open_store
from flows.batch import generate_videos, new_run_id
from flows.run import NOT_STARTED, not_started
from hailuo_batch import inbox as ib
from hailuo_batch.apixo.models import shown
from hailuo_batch.inbox import Claim, Inbox, ManifestCheck, Outcome
from hailuo_batch.jobs import blocking, running
from hailuo_batch.ledger import Ledger, keep_lease
from hailuo_batch.manifest import ItemDefaults
from hailuo_batch.options import BatchOptions
from hailuo_batch.settings import BadSettingError, check_output_url, get_settings
from hailuo_batch.storage import OutputStore


@task(task_run_name="claim-{name}", cache_policy=NO_CACHE)
async def claim_manifest(inbox: Inbox, name: str, claim_id: str) -> Claim | None:
    """Claim one inbox manifest for this run (None: another run took it)."""
    return await blocking(inbox.claim, name, claim_id)


@task(task_run_name="check-{claim.name}", cache_policy=NO_CACHE)
async def check_manifest(inbox: Inbox, claim: Claim, defaults: ItemDefaults) -> ManifestCheck:
    """Validate the claimed manifest before any run is started (nothing is paid here)."""
    return await blocking(inbox.check, claim, defaults)


@task(task_run_name="{outcome}-{claim.name}", cache_policy=NO_CACHE)
async def finish_manifest(
    inbox: Inbox, claim: Claim, outcome: Outcome, record: dict[str, Any]
) -> str | None:
    """Move the manifest to done/ or failed/ with its record; returns the record's URL (None:
    another nightly run took the manifest, and finishes it)."""
    url = await blocking(inbox.finish, claim, outcome, record)
    if url is not None:
        get_run_logger().info("manifest %s -> %s (%s)", shown(claim.name), outcome, url)
    return url


async def _open_inbox(inbox: str | None, options: BatchOptions) -> Inbox:
    """The inbox, once the settings every run needs hold: the output (or storage block), the
    inbox's own location (a local one must exist: a typo would leave every night empty), and
    the API key or credentials block."""
    settings = get_settings()
    out = await open_store(options.output, options.storage_block, settings)
    if inbox is not None:
        inbox = check_output_url(inbox, name="inbox")
        fs, root = fsspec.core.url_to_fs(inbox, **out.storage_options)
        if isinstance(fs, LocalFileSystem) and not Path(root).is_dir():
            raise BadSettingError(
                f"inbox {inbox!r} is not a folder: create it, or fix the path (default: "
                "{output}/inbox/)"
            )
    (await open_client(options.credentials_block, settings)).close()
    return Inbox(OutputStore(inbox or ib.default_inbox(out.url), out.storage_options or None))


async def _run_one(
    inbox: Inbox, claim: Claim, options: BatchOptions
) -> tuple[Outcome, dict[str, Any]]:
    """Check and run one claimed manifest; returns where it goes and its record."""
    logger = get_run_logger()
    record = ib.new_record(claim, str(flow_run.get_id()))
    check = await check_manifest(inbox, claim, options.item_defaults())
    record.update(total_rows=check.total_rows, row_errors=check.row_errors)
    if not check.ok:
        logger.warning("manifest %s refused: %s", shown(claim.name), shown(check.error))
        return "failed", {**record, "stage": "validation", "error": check.error}
    name = ib.run_name_for(claim.name)
    try:
        state: State[Any] = await generate_videos.with_options(flow_run_name=name)(
            manifest=inbox.url_of(claim), options=options, return_state=True
        )
        result = await state.aresult(raise_on_failure=False)
    except Exception as exc:  # recorded in the manifest's report; the nightly run goes on
        logger.exception("manifest %s: the run could not start", shown(claim.name))
        return "failed", {**record, "stage": "run", "error": f"{type(exc).__name__}: {exc}"}
    return ib.run_record(record, name, state, result)


@flow(name="nightly-batch", log_prints=True)
async def nightly_batch(
    inbox: str | None = None,
    options: BatchOptions = BatchOptions(),  # frozen: one shared default is safe
) -> dict[str, Any]:
    """Run generate-videos once for every new manifest in the inbox, each exactly once.

    Args:
        inbox: Folder or fsspec URL prefix where manifests (*.csv, *.jsonl, *.json) are dropped;
            default {output}/inbox/.
        options: How each manifest's generate-videos run goes (the same options as
            generate-videos; max_cost_usd is per manifest).
    """
    logger = get_run_logger()
    claim_id = new_run_id()  # UTC time + short flow run id: sortable, unique per run
    try:  # a bad setting fails here, before any manifest is claimed: they stay in the inbox
        box = await _open_inbox(inbox, options)
        lease = Ledger(box.store, claim_id, lease_ttl_s=get_settings().lease_ttl_s)
        await blocking(_hold, lease, box)
    except Exception as exc:  # noqa: BLE001 - one clean line, never a traceback
        return not_started(exc)  # type: ignore[no-any-return]
    keeper = partial(
        keep_lease, lease, blocking=blocking, warn=logger.warning, lapsed=logger.warning
    )
    try:
        async with running(keeper):
            report = await _night(box, claim_id, options, lease)
    finally:  # each on its own: an unended lease simply expires, a stale record is read once
        with contextlib.suppress(Exception):
            await blocking(lease.end_lease)
        with contextlib.suppress(Exception):
            await blocking(box.store.delete, _flow_run_key(claim_id))
    await acreate_markdown_artifact(ib.report_markdown(report), description="nightly-batch report")
    kind, state_name, message = ib.nightly_outcome(report)
    make = Completed if kind == "completed" else Failed
    return make(name=state_name, message=message, data=report)  # type: ignore[return-value]


def _hold(lease: Ledger, box: Inbox) -> None:
    """This run's lease in the inbox, and which flow run holds it; the first write there, so
    an inbox that takes no writes (a bucket that does not exist, no permission) is a bad
    setting before anything is claimed."""
    try:
        lease.heartbeat()
        box.store.write_text_atomic(_flow_run_key(lease.run_id), str(flow_run.get_id()))
    except Exception as exc:
        raise BadSettingError(
            f"the inbox {box.url} takes no writes ({exc}): check that the bucket or folder "
            "exists and the credentials may write there"
        ) from exc


def _flow_run_key(claim_id: str) -> str:
    """Where a nightly run says which flow run it is, beside its lease."""
    return f"leases/{claim_id}.flow_run"


async def _was_cancelled(box: Inbox, claim_id: str) -> bool:
    """Whether the nightly flow run that held `claim_id` was cancelled (from the Prefect
    API); False when that cannot be told (a run that crashed, or an earlier version's)."""
    try:
        run_id = (await blocking(box.store.read_text, _flow_run_key(claim_id))).strip()
        async with get_client() as client:
            found = await client.read_flow_run(UUID(run_id))
    except Exception:  # noqa: BLE001 - unknown: treated as a crash, the manifest is resumed
        return False
    return found.state is not None and found.state.type in (
        StateType.CANCELLED, StateType.CANCELLING,
    )  # fmt: skip


async def _night(box: Inbox, claim_id: str, options: BatchOptions, lease: Ledger) -> dict[str, Any]:
    """Take back what a killed nightly run left, then claim and run every new manifest."""
    logger = get_run_logger()
    report = ib.new_report(box.url)
    recovered: dict[str, str] = {}  # manifest name -> the claim of the run that left it
    for left in await blocking(box.stranded, functools.cache(lease.lease_alive)):
        if await _was_cancelled(box, left.claim_id):  # the user stopped it: never resumed alone
            why = (
                f"the nightly run of claim {left.claim_id} was cancelled while it ran this "
                "manifest: it is not run again on its own; drop it in the inbox again to run "
                "what is left (nothing already paid for is paid again)"
            )
            await _set_aside(box, left, report, {"stage": "cancelled", "error": why})
            continue
        earlier = await blocking(box.earlier_stops, left)
        if ib.stopped_too_often(earlier):  # it kills its run: it would every night
            stops = [*earlier, left.claim_id]
            why = (
                f"the nightly runs of claims {', '.join(stops)} all stopped (killed or crashed) "
                "while they ran this manifest: it is not run again on its own; look at those "
                "flow runs for what stopped them (memory, a worker's time limit), then drop it "
                "in the inbox again to run what is left (nothing already paid for is paid again)"
            )
            logger.error("manifest %s: %s", shown(left.name), why)
            await _set_aside(
                box, left, report, {"stage": "stopped", "stopped_claims": stops, "error": why}
            )
            continue
        if await blocking(box.recover, left):
            recovered[left.name] = left.claim_id
            logger.warning(
                "manifest %s was left at %s by a nightly run that did not finish: running it "
                "again (its items resume from the ledger: nothing is paid twice)",
                shown(left.name), box.url_of(left),
            )  # fmt: skip
        else:
            why = "a manifest of the same name waits in the inbox: move one of them by hand"
            report["stranded"].append({"manifest": left.name, "key": left.key, "why": why})
            logger.error("manifest %s at %s: %s", shown(left.name), box.url_of(left), why)
    names = await blocking(box.pending)
    logger.info("inbox %s: %d new manifest(s)", box.url, len(names))
    for name in names:
        claim = await claim_manifest(box, name, claim_id)
        if claim is None:
            logger.info("manifest %s was taken by another run", shown(name))
            report["taken"].append(name)
            continue
        outcome, record = await _run_one(box, claim, options)
        if name in recovered:
            record["recovered_from_claim"] = recovered[name]
        if record.get("state_name") == NOT_STARTED:  # a bad setting, not a bad manifest
            where = "left in the inbox"
            try:
                await blocking(box.release, claim)
            except Exception as exc:  # noqa: BLE001 - the store may be what failed: say where
                where = f"still at {box.url_of(claim)} (could not move it back: {exc})"
            report["kept"].append({"manifest": name, "error": record.get("error"), "at": where})
            logger.error("manifest %s %s: %s", shown(name), where, record.get("error"))
            break  # the same setting would stop every other manifest's run too
        record_url = await finish_manifest(box, claim, outcome, record)
        if record_url is None:
            logger.warning(
                "manifest %s was taken from this run by another nightly run before it ended "
                "(this run's lease lapsed): that run finishes it; this run's record: %s",
                shown(name), shown(record),
            )  # fmt: skip
            report["taken"].append(name)
            continue
        report[outcome].append({"manifest": name, "record": record_url, **record})
    return report


async def _set_aside(
    box: Inbox, left: Claim, report: dict[str, Any], fields: dict[str, Any]
) -> None:
    """Move a stranded manifest to failed/ with why it is not run again (`fields`), unless
    another nightly run took it first."""
    record = {**ib.new_record(left, str(flow_run.get_id())), **fields}
    url = await finish_manifest(box, left, "failed", record)
    if url is None:
        report["taken"].append(left.name)
    else:
        report["failed"].append({"manifest": left.name, "record": url, **record})
