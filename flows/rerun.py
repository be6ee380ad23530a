"""The rerun flow: run again only the items of a previous run that match the filters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import fsspec
from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.states import Completed, Failed, State

from flows.batch import generate_videos
from flows.runtime import blocking, open_store
from hailuo_batch.apixo import Mode, Provider
from hailuo_batch.options import BatchOptions, RunOptions
from hailuo_batch.rerun import (
    DEFAULT_RERUN_STATUSES,
    output_of_results,
    rerun_row,
    select_for_rerun,
    to_manifest_jsonl,
)
from hailuo_batch.results import ItemStatus, from_jsonl
from hailuo_batch.settings import get_settings


def run_id_of_results(results_url: str) -> str:
    """`{output}/runs/{run_id}/results.jsonl` -> `run_id` (else the file's name)."""
    parts = results_url.rstrip("/").rsplit("/", 3)
    if len(parts) == 4 and parts[1] == "runs":
        return parts[2]
    return parts[-1]


def outcome_markdown(state: State[Any], summary: Any) -> str:
    """What the rerun's generate-videos run did: its state, counts by status, results file."""
    lines = [f"\n## outcome: {state.name}\n"]
    if state.message:
        lines.append(f"\n{state.message}\n")
    if isinstance(summary, dict):
        counts = {k: v for k, v in (summary.get("by_status") or {}).items() if v}
        if counts:
            lines.append("\n| status | items |\n|---|---|\n")
            lines += [f"| {k} | {v} |\n" for k, v in sorted(counts.items())]
        if summary.get("results"):
            lines.append(f"\nresults: `{summary['results']}`\n")
    return "".join(lines)


@flow(name="rerun-failed", log_prints=True)
async def rerun_failed(
    results: str,
    statuses: list[ItemStatus] = list(DEFAULT_RERUN_STATUSES),  # noqa: B006
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
        fail_codes: Only items with one of these failCodes.
        ids: Only these item ids.
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
    logger = get_run_logger()
    store = await open_store(
        options.output or output_of_results(results), options.storage_block, get_settings()
    )
    previous = await blocking(_read_results, results, store.storage_options)
    chosen, left_out = select_for_rerun(previous, statuses=statuses, fail_codes=fail_codes, ids=ids)
    for why in left_out:
        logger.warning("not rerun: %s", why)
    logger.info("rerun of %s: %d of %d items match", results, len(chosen), len(previous))
    rows = [
        rerun_row(r, mode=mode, duration=duration, provider=provider, prompt_suffix=prompt_suffix)
        for r in chosen
    ]
    key = f"reruns/{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-manifest.jsonl"
    await blocking(store.write_text_atomic, key, to_manifest_jsonl(rows))
    selection_md = (
        f"# {'dry run of a ' if options.dry_run else ''}rerun of `{results}`\n\n{len(chosen)} "
        f"items selected (statuses {', '.join(map(str, statuses))}); manifest "
        f"`{store.url_for(key)}`.\n" + "".join(f"\n- not rerun: {w}" for w in left_out)
    )
    if not rows:
        logger.info("nothing to rerun")
        await acreate_markdown_artifact(
            selection_md + "\n\nnothing to rerun.",
            description="Which items this rerun takes from the previous run, and what happened",
        )
        return {"selected": 0, "results": None}
    child = generate_videos.with_options(flow_run_name=f"rerun-{run_id_of_results(results)}")
    state = await child(
        manifest=store.url_for(key),
        options=BatchOptions(**{**options.model_dump(), "output": store.url}),
        force=True,
        resubmit_lost=resubmit_lost,
        rerun_of=results,
        return_state=True,
    )
    summary = await state.aresult(raise_on_failure=False)
    await acreate_markdown_artifact(
        selection_md + outcome_markdown(state, summary),
        description="Which items this rerun takes from the previous run, and what happened",
    )
    if state.is_completed():
        if state.name == "Completed":
            return summary
        return Completed(name=state.name, message=state.message, data=summary)
    return Failed(name=state.name, message=state.message, data=summary)


def _read_results(url: str, storage_options: dict[str, Any]) -> list[Any]:
    with fsspec.open(url, "rt", encoding="utf-8", **storage_options) as fh:
        return from_jsonl(fh.read())
