"""The rerun flow: run again only the items of a previous run that match the filters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import fsspec
from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact
from prefect.states import Failed
from pydantic import Field

from flows.batch import generate_videos
from hailuo_batch.apixo import Mode, Provider
from hailuo_batch.rerun import (
    DEFAULT_RERUN_STATUSES,
    output_of_results,
    rerun_row,
    select_for_rerun,
    to_manifest_jsonl,
)
from hailuo_batch.results import ItemStatus, from_jsonl
from hailuo_batch.storage import OutputStore


@flow(name="rerun-failed", log_prints=True)
async def rerun_failed(
    results: Annotated[
        str, Field(description="URL of a previous run's results.jsonl ({output}/runs/{id}/...).")
    ],
    statuses: Annotated[
        list[ItemStatus],
        Field(
            description="Rerun items with these statuses. `skipped` (content violations) "
            "only when named."
        ),
    ] = list(DEFAULT_RERUN_STATUSES),  # noqa: B006 - Prefect parameters need a concrete default
    fail_codes: Annotated[
        list[str] | None, Field(description="Only items with one of these failCodes.")
    ] = None,
    ids: Annotated[list[str] | None, Field(description="Only these item ids.")] = None,
    mode: Annotated[Mode | None, Field(description="Override the mode.")] = None,
    duration: Annotated[
        Literal[6, 10] | None, Field(description="Override the duration (standard mode).")
    ] = None,
    provider: Annotated[Provider | None, Field(description="Override the provider.")] = None,
    prompt_suffix: Annotated[
        str | None, Field(description="Text appended to every prompt.")
    ] = None,
    output: Annotated[
        str | None, Field(description="Output location (default: the one of `results`).")
    ] = None,
    concurrency: Annotated[int, Field(ge=1, le=500, description="Items in flight at once.")] = 10,
    max_cost_usd: Annotated[
        float | None, Field(ge=0, description="Stop submitting past this estimated spend.")
    ] = None,
    credentials_block: Annotated[
        str | None, Field(description="Name of an ApixoCredentials block.")
    ] = None,
) -> Any:
    """Rerun the matching items of a previous run into the same output, linked to it."""
    logger = get_run_logger()
    out = output or output_of_results(results)
    with fsspec.open(results, "rt", encoding="utf-8") as fh:
        previous = from_jsonl(fh.read())
    chosen, left_out = select_for_rerun(previous, statuses=statuses, fail_codes=fail_codes, ids=ids)
    for why in left_out:
        logger.warning("not rerun: %s", why)
    logger.info("rerun of %s: %d of %d items match", results, len(chosen), len(previous))
    rows = [
        rerun_row(r, mode=mode, duration=duration, provider=provider, prompt_suffix=prompt_suffix)
        for r in chosen
    ]
    store = OutputStore(out)
    key = f"reruns/{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-manifest.jsonl"
    store.write_text_atomic(key, to_manifest_jsonl(rows))
    await acreate_markdown_artifact(
        f"# rerun of `{results}`\n\n{len(chosen)} items selected (statuses "
        f"{', '.join(map(str, statuses))}); manifest `{store.url_for(key)}`.\n"
        + "".join(f"\n- not rerun: {w}" for w in left_out),
        description="Which items this rerun takes from the previous run",
    )
    if not rows:
        logger.info("nothing to rerun")
        return {"selected": 0, "results": None}
    state = await generate_videos(
        manifest=store.url_for(key),
        output=out,
        concurrency=concurrency,
        max_cost_usd=max_cost_usd,
        credentials_block=credentials_block,
        force=True,
        rerun_of=results,
        return_state=True,
    )
    summary = await state.aresult(raise_on_failure=False)
    if state.is_completed():
        return summary
    return Failed(name=state.name, message=state.message, data=summary)
