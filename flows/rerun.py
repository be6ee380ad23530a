"""The rerun flow: run again only the items of a previous run that match the filters."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.runtime import flow_run

from blocks.apixo import open_store
from flows.batch import generate_videos
from flows.run import not_started
from flows.runtime import end_state
from hailuo_batch import rerun as reruns
from hailuo_batch.apixo import Mode, Provider
from hailuo_batch.apixo.models import shown
from hailuo_batch.artifacts import keeps_run_name
from hailuo_batch.jobs import blocking
from hailuo_batch.options import BatchOptions, RunOptions
from hailuo_batch.results import ItemStatus
from hailuo_batch.secrets import redact_urls
from hailuo_batch.settings import get_settings
from hailuo_batch.storage import OutputStore

ABOUT = "Which items this rerun takes from the previous run, and what happened"


def rerun_name() -> str:
    """Flow run name after the run it reruns (`rerun-of-{run id}`), so the run the CLI links to
    is found in the UI; a name a person gave the run is kept."""
    current = flow_run.get_name()
    if keeps_run_name(current):
        return str(current)
    return f"rerun-of-{reruns.run_id_of_results(str(flow_run.parameters.get('results', '')))}"


@flow(name="rerun-failed", flow_run_name=rerun_name, log_prints=True)
async def rerun_failed(
    results: str,
    statuses: list[ItemStatus] = list(reruns.DEFAULT_RERUN_STATUSES),  # noqa: B006
    fail_codes: list[str] | None = None,
    ids: list[str] | None = None,
    mode: Mode | None = None,
    duration: Literal[6, 10] | None = None,
    provider: Provider | None = None,
    prompt_suffix: str | None = None,
    resubmit_lost: bool = False,
    options: RunOptions = RunOptions(),  # frozen: one shared default is safe
) -> Any:
    """Rerun the matching items of a previous run into the same output, linked to it.

    Args:
        results: URL of a previous run's results.jsonl ({output}/runs/{id}/...).
        statuses: Rerun items with these statuses. `skipped` (content violations) only when named.
        fail_codes: Only items with one of these failCodes (naming a bad-input code reruns such
            items unchanged).
        ids: Only these item ids (any case). An empty list selects nothing.
        mode: Override the mode of every rerun item (else each keeps its own).
        duration: Override the duration (standard mode).
        provider: Override the provider.
        prompt_suffix: Text appended to every prompt.
        resubmit_lost: Pay for a new task for items whose task the provider lost (TASK_NOT_FOUND,
            POLL_TIMEOUT); they are reported as possible duplicate charges. Without it such
            items are only read again.
        options: How the rerun runs, as for generate-videos (output: by default the one of
            `results`; a storage block's S3 options also reach the results file).
    """
    try:  # nothing is paid before the child run: a results file or store that fails is a setting
        output = options.output
        output = reruns.output_of_results(results) if output is None else output
        store = await open_store(output, options.storage_block, get_settings())
        source = await _output_of(results, options)
        sel = await blocking(
            partial(
                reruns.write_selection, store, results, source=source,
                lease_ttl_s=get_settings().lease_ttl_s, statuses=statuses,
                fail_codes=fail_codes, ids=ids,
                overrides={"mode": mode, "duration": duration, "provider": provider},
                prompt_suffix=prompt_suffix, dry_run=options.dry_run,
                failcode_overrides=get_settings().failcode_policy,
            )
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - one clean line (exit 2), never a traceback
        return not_started(exc)
    logger = get_run_logger()
    for why in sel.left_out:
        logger.warning("not rerun: %s", shown(why))
    for line in sel.carried:
        logger.info("%s", shown(line))
    logger.info("rerun of %s: %d of %d items match", redact_urls(results), sel.chosen, sel.total)
    if not sel.chosen:
        logger.info("nothing to rerun")
        await acreate_markdown_artifact(sel.markdown + "\n\nnothing to rerun.", description=ABOUT)
        return {"selected": 0, "total": sel.total, "left_out": sel.left_out, "results": None}
    child = generate_videos.with_options(flow_run_name=f"rerun-{reruns.run_id_of_results(results)}")
    state = await child(
        manifest=sel.manifest_url,
        options=BatchOptions(**{**options.model_dump(), "output": store.url}),
        force=True,
        resubmit_lost=resubmit_lost,
        rerun_of=redact_urls(results),
        return_state=True,
    )
    summary = await state.aresult(raise_on_failure=False)
    outcome_md = reruns.outcome_markdown(state.name, state.message, summary)
    await acreate_markdown_artifact(sel.markdown + outcome_md, description=ABOUT)
    return end_state(state.is_completed(), state.name, state.message, summary)


async def _output_of(results: str, options: RunOptions) -> OutputStore | None:
    """The output `results` belongs to ({output}/runs/{id}/results.jsonl), where its items'
    ledger records are; None when the file lies elsewhere or that output cannot be opened as
    a store (results read over http(s)): `carry_records` then goes by the results rows."""
    try:
        return await open_store(
            reruns.output_of_results(results), options.storage_block, get_settings()
        )
    except Exception:  # noqa: BLE001 - e.g. results over http(s): no ledger to read there
        return None
