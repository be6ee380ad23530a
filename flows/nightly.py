"""The nightly flow: every new manifest dropped in an inbox becomes one generate-videos run.

The inbox is a folder or object-store prefix (default `{output}/inbox/`). Users drop manifests
(`*.csv`, `*.jsonl`, `*.json`) at its top level; each run of `nightly-batch`:

1. lists them, and claims each one before touching it: an exclusive claim marker
   (`processing/{name}.claim`, created with an atomic create-if-absent: a hard link locally,
   `If-None-Match: *` on S3), then a move to `processing/{claim}/{name}`. Two overlapping runs
   never take the same file, and a file is never processed twice;
2. checks the manifest (readable, required columns, at least one valid row); a manifest that
   fails goes to `failed/{claim}/{name}` with `{name}.report.json` beside it, and costs nothing;
3. runs `generate-videos` on it as a subflow named after the file;
4. moves it to `done/{claim}/{name}` with `{name}.run.json` (the subflow's run id, results
   file, counts), or to `failed/{claim}/` with a report if the run itself failed.

A run that dies between claiming and moving leaves `processing/{name}.claim` behind, which keeps
a re-dropped file of that name waiting: delete the marker to release it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

import anyio.to_thread
from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from pydantic import Field

from flows.batch import generate_videos, new_run_id, resolve_output
from hailuo_batch.apixo import Mode, Provider, RequestType
from hailuo_batch.manifest import ItemDefaults, ManifestError, load_manifest
from hailuo_batch.settings import get_settings
from hailuo_batch.storage import OutputStore

F = TypeVar("F", bound=Callable[..., Any])
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")
Outcome = Literal["done", "failed"]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --- the inbox: plain functions over an OutputStore, no Prefect --------------------------------


@dataclass(frozen=True)
class Claim:
    """A manifest this run owns: its dropped name and where it sits while being processed."""

    name: str
    claim_id: str
    key: str


@dataclass
class ManifestCheck:
    """Whether a claimed manifest can be run, and why not."""

    ok: bool
    error: str | None = None
    row_errors: list[str] = field(default_factory=list)
    valid_rows: int = 0
    total_rows: int = 0


def default_inbox(output: str) -> str:
    """`{output}/inbox/` for a path or URL."""
    return f"{output.rstrip('/')}/inbox/"


def run_name_for(name: str) -> str:
    """A flow run name after the manifest's file name (safe for Prefect's name templating)."""
    return "nightly-" + (_UNSAFE.sub("-", name).strip("-") or "manifest")


class Inbox:
    """A folder or object-store prefix of manifests, with exclusive claims across runs."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.store = OutputStore(url, storage_options)

    @property
    def url(self) -> str:
        return self.store.url

    def _full(self, key: str) -> str:
        return f"{self.store.root}/{key}"

    def _move(self, src: str, dst: str) -> None:
        """Move key `src` to key `dst` (a rename locally, copy and delete on object stores)."""
        if self.store.is_local:
            self.store.fs.makedirs(self.store.fs._parent(self._full(dst)), exist_ok=True)
        self.store.fs.mv(self._full(src), self._full(dst))

    def pending(self) -> list[str]:
        """Names of the manifests waiting at the top level, in name order."""
        self.store.fs.invalidate_cache(self.store.root)  # others drop files: list afresh
        try:
            entries = self.store.fs.ls(self.store.root, detail=True)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            if entry.get("type") != "file":
                continue
            name = PurePosixPath(self.store.fs._strip_protocol(entry["name"])).name
            if name.lower().endswith(MANIFEST_SUFFIXES) and not name.startswith("."):
                names.append(name)
        return sorted(names)

    def claim(self, name: str, claim_id: str) -> Claim | None:
        """Take `name` out of the inbox for this run; None if another run has it (or had it)."""
        marker = f"processing/{name}.claim"
        if not self.store.create_exclusive(marker, claim_id.encode()):
            return None
        key = f"processing/{claim_id}/{name}"
        try:
            self._move(name, key)
        except FileNotFoundError:
            return None  # processed by a run that listed it before us and released the marker
        finally:
            self.store.delete(marker)
        return Claim(name=name, claim_id=claim_id, key=key)

    def url_of(self, claim: Claim) -> str:
        return self.store.url_for(claim.key)

    def finish(self, claim: Claim, outcome: Outcome, record: dict[str, Any]) -> str:
        """Move the manifest to `done/` or `failed/` and write its record beside it.

        Returns the URL of the record (`{name}.run.json` when done, `{name}.report.json` else).
        """
        folder = f"{outcome}/{claim.claim_id}"
        self._move(claim.key, f"{folder}/{claim.name}")
        suffix = "run.json" if outcome == "done" else "report.json"
        record_key = f"{folder}/{claim.name}.{suffix}"
        self.store.write_text_atomic(record_key, json.dumps(record, indent=2, default=str) + "\n")
        if self.store.is_local:
            try:
                self.store.fs.rmdir(self._full(f"processing/{claim.claim_id}"))
            except OSError:
                pass  # another manifest of this claim is still there
        return self.store.url_for(record_key)


def check_manifest(
    url: str, defaults: ItemDefaults, storage_options: dict[str, Any] | None
) -> ManifestCheck:
    """Read the manifest as the batch flow will; it must have at least one valid row."""
    try:
        manifest = load_manifest(url, defaults, storage_options)
    except (ManifestError, OSError, ValueError) as exc:
        return ManifestCheck(ok=False, error=str(exc))
    row_errors = [str(e) for e in manifest.errors]
    if not manifest.items:
        return ManifestCheck(
            ok=False,
            error=f"no valid rows among {manifest.total_rows}",
            row_errors=row_errors,
            total_rows=manifest.total_rows,
        )
    return ManifestCheck(
        ok=True,
        row_errors=row_errors,
        valid_rows=len(manifest.items),
        total_rows=manifest.total_rows,
    )


# --- Prefect tasks and the flow -------------------------------------------------------------


@task(name="claim_manifest", task_run_name="claim-{name}", cache_policy=NO_CACHE)
async def claim_manifest(inbox: Inbox, name: str, claim_id: str) -> Claim | None:
    """Claim one inbox manifest for this run (None: another run took it)."""
    return await anyio.to_thread.run_sync(inbox.claim, name, claim_id)


@task(name="check_manifest", task_run_name="check-{claim.name}", cache_policy=NO_CACHE)
async def check_claimed(
    inbox: Inbox, claim: Claim, defaults: ItemDefaults, storage_options: dict[str, Any]
) -> ManifestCheck:
    """Validate the claimed manifest before any run is started (nothing is paid here)."""
    return await anyio.to_thread.run_sync(
        check_manifest, inbox.url_of(claim), defaults, storage_options or None
    )


@task(name="finish_manifest", task_run_name="{outcome}-{claim.name}", cache_policy=NO_CACHE)
async def finish_manifest(
    inbox: Inbox, claim: Claim, outcome: Outcome, record: dict[str, Any]
) -> str:
    """Move the manifest to done/ or failed/ with its record; returns the record's URL."""
    url = await anyio.to_thread.run_sync(inbox.finish, claim, outcome, record)
    get_run_logger().info("manifest %s -> %s (%s)", claim.name, outcome, url)
    return url


def subflow_parameters(manifest: str, options: dict[str, Any]) -> dict[str, Any]:
    """The generate-videos parameters for one manifest: this flow's batch options, as given."""
    accepted = set(generate_videos.parameters.properties)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"generate-videos does not take the parameter(s) {', '.join(unknown)}")
    return {"manifest": manifest, **options}


async def _run_one(
    inbox: Inbox,
    claim: Claim,
    options: dict[str, Any],
    defaults: ItemDefaults,
    storage_options: dict[str, Any],
) -> tuple[Outcome, dict[str, Any]]:
    """Check and run one claimed manifest; returns where it goes and its record."""
    logger = get_run_logger()
    record: dict[str, Any] = {
        "manifest": claim.name,
        "claim": claim.claim_id,
        "nightly_flow_run_id": str(flow_run.get_id()),
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    check = await check_claimed(inbox, claim, defaults, storage_options)
    record.update(total_rows=check.total_rows, row_errors=check.row_errors)
    if not check.ok:
        logger.warning("manifest %s refused: %s", claim.name, check.error)
        return "failed", {**record, "stage": "validation", "error": check.error}

    name = run_name_for(claim.name)
    params = subflow_parameters(inbox.url_of(claim), options)
    try:
        state: State[Any] = await generate_videos.with_options(flow_run_name=name)(
            **params, return_state=True
        )
        result = await state.aresult(raise_on_failure=False)
    except Exception as exc:  # recorded in the manifest's report; the nightly run goes on
        logger.exception("manifest %s: the run could not start", claim.name)
        return "failed", {**record, "stage": "run", "error": f"{type(exc).__name__}: {exc}"}
    summary = result if isinstance(result, dict) else {}
    record.update(
        flow_run_id=str(state.state_details.flow_run_id),
        flow_run_name=name,
        state=state.type.value,
        run_id=summary.get("run_id"),
        results=summary.get("results"),
        by_status=summary.get("by_status"),
    )
    if state.is_completed():
        return "done", record
    error = state.message or (str(result) if isinstance(result, BaseException) else "run failed")
    return "failed", {**record, "stage": "run", "error": error}


@flow(name="nightly-batch", log_prints=True)
async def nightly_batch(
    inbox: str | None = None,
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
) -> dict[str, Any]:
    """Run generate-videos once for every new manifest in the inbox, each exactly once.

    Args:
        inbox: Folder or fsspec URL prefix where manifests (*.csv, *.jsonl, *.json) are dropped;
            default {output}/inbox/.
        output: Output location (path, file:// or s3://bucket/prefix).
        mode: Default mode for rows without one.
        duration: Default clip length for standard rows.
        provider: Default provider routing.
        request_type: async: poll each task. callback: the provider POSTs results to the receiver
            (HAILUO_CALLBACK_URL/TOKEN/STORE), with a slow poll as backstop.
        concurrency: Items in flight at the provider at once, per run.
        dry_run: Validate and estimate only; submit nothing.
        credentials_block: Name of an ApixoCredentials block (else APIXO_API_KEY).
        storage_block: Name of an OutputStorage block (else `output`).
        max_cost_usd: Per manifest: stop submitting once its estimated spend passes.
        fit_to_balance: If a manifest costs more than the balance, submit only what fits (else its
            run fails before spending).
    """
    logger = get_run_logger()
    out, storage_options = await resolve_output(output, storage_block, get_settings())
    box = Inbox(inbox or default_inbox(out), storage_options or None)
    names = await anyio.to_thread.run_sync(box.pending)
    logger.info("inbox %s: %d new manifest(s)", box.url, len(names))
    options: dict[str, Any] = {
        "output": output,
        "mode": mode,
        "duration": duration,
        "provider": provider,
        "request_type": request_type,
        "concurrency": concurrency,
        "dry_run": dry_run,
        "credentials_block": credentials_block,
        "storage_block": storage_block,
        "max_cost_usd": max_cost_usd,
        "fit_to_balance": fit_to_balance,
    }
    defaults = ItemDefaults(mode=mode, duration=duration, provider=provider)
    claim_id = new_run_id()  # UTC time + short flow run id: sortable, unique per run
    report: dict[str, Any] = {"inbox": box.url, "done": [], "failed": [], "taken": []}
    for name in names:
        claim = await claim_manifest(box, name, claim_id)
        if claim is None:
            logger.info("manifest %s was taken by another run", name)
            report["taken"].append(name)
            continue
        outcome, record = await _run_one(box, claim, options, defaults, storage_options)
        record_url = await finish_manifest(box, claim, outcome, record)
        report[outcome].append({"manifest": name, "record": record_url, **record})

    await acreate_markdown_artifact(_report_markdown(report), description="nightly-batch report")
    kind, name, message = nightly_outcome(report)
    make = Completed if kind == "completed" else Failed
    return make(name=name, message=message, data=report)  # type: ignore[return-value]


def nightly_outcome(report: dict[str, Any]) -> tuple[Literal["completed", "failed"], str, str]:
    """The nightly run's state (kind, name, message) from its report.

    One bad manifest does not fail the night when others ran: `Completed` named
    `CompletedWithFailures`, naming the bad files. `Failed` only when manifests failed and none
    ran to a completed run.
    """
    done, failed = report["done"], report["failed"]
    processed = f"{len(done)} manifest(s) processed"
    if not failed:
        return "completed", "Completed", processed
    bad = f"{len(failed)} manifest(s) failed: {', '.join(r['manifest'] for r in failed)}"
    if done:
        return "completed", "CompletedWithFailures", f"{processed}; {bad}"
    return "failed", "Failed", bad


def _report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# nightly-batch: {report['inbox']}", ""]
    if not (report["done"] or report["failed"] or report["taken"]):
        return "\n".join([*lines, "No new manifests."]) + "\n"
    lines += ["| manifest | outcome | run | record |", "|---|---|---|---|"]
    for outcome in ("done", "failed"):
        for r in report[outcome]:
            detail = r.get("flow_run_name") or r.get("error") or ""
            lines.append(f"| {r['manifest']} | {outcome} | {detail} | {r['record']} |")
    lines += [f"| {name} | taken by another run | | |" for name in report["taken"]]
    return "\n".join(lines) + "\n"
