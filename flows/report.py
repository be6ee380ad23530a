"""What a run leaves for people: the results files, the review page and the Prefect artifacts
(item table, summary, progress), written while the run goes and at its end."""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from prefect import artifacts, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.runtime import runtime
from hailuo_batch.artifacts import report_keys, video_link
from hailuo_batch.progress import Progress
from hailuo_batch.results import ItemResult, results_as_table, summary_markdown
from hailuo_batch.results import write_results as write_run_results
from hailuo_batch.results import write_summary as write_run_summary
from hailuo_batch.review import publish_review, review_markdown


async def start_progress(run_id: str, total: int, table_key: str) -> Progress:
    """The run's progress: a progress artifact, log lines and, while items finish, new
    versions of the item table `table_key`."""
    artifact = await artifacts.acreate_progress_artifact(
        0.0, key=None, description=f"hailuo-batch run {run_id}: items finished"
    )
    return Progress(
        total,
        run_id,
        push=partial(artifacts.aupdate_progress_artifact, artifact),
        table=partial(publish_item_table, run_id, key=table_key, partial_of=total),
        table_every_s=runtime().settings.table_every_s,
        log=get_run_logger().info,
    )


@task(cache_policy=NO_CACHE)
async def write_results(run_id: str, results: list[ItemResult], summary: dict[str, Any]) -> str:
    """Write results.jsonl and summary.json under {output}/runs/{run_id}/ (atomically), else,
    if the output store stays unreachable, under `./hailuo-results/{run_id}/` on this machine."""
    rt = runtime()
    url, error = await rt.blocking(write_run_results, rt.store, run_id, results, summary)
    if error is not None:
        msg = "the output store did not take the results (%s): written to %s instead"
        rt.log(msg, error, url, level=logging.ERROR)
    return url


@task(cache_policy=NO_CACHE)
async def publish_report(
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
    await publish_item_table(run_id, results, items_key)
    await artifacts.acreate_markdown_artifact(
        summary_markdown(summary, results_url=results_url) + extra_md,
        key=summary_key,
        description=f"Summary of run {run_id}",
    )


async def artifact_keys(manifest: str) -> tuple[str, str]:
    """The item table's and the summary's artifact keys for this run."""

    def _deployment_name() -> str | None:
        from prefect.runtime import deployment

        try:
            return deployment.name  # type: ignore[no-any-return]
        except Exception:  # noqa: BLE001 - no deployment known: the manifest names the keys
            return None

    deployment_name = await runtime().blocking(_deployment_name)  # may read the API: off the loop
    return report_keys(deployment_name, manifest)


async def publish_item_table(
    run_id: str, results: list[ItemResult], key: str, *, partial_of: int = 0
) -> None:
    """A new version of the item table artifact `key`: reasons, prompts, links."""
    rt = runtime()
    expiry = rt.settings.presign_expiry_s
    table = await rt.blocking(results_as_table, results, partial(video_link, rt.store, expiry))
    links = "" if rt.store.is_local else f"; video links expire after {expiry / 3600:g} h"
    so_far = f" ({len(results)} of {partial_of} finished so far)" if partial_of else ""
    await artifacts.acreate_table_artifact(
        table, key=key, description=f"Items of run {run_id}{so_far}{links}"
    )


async def rewrite_summary(run_id: str, summary: dict[str, Any]) -> None:
    """summary.json again, now with the review page's URL (not a task: one small write)."""
    rt = runtime()
    await rt.blocking(write_run_summary, rt.store, run_id, summary)


@task(cache_policy=NO_CACHE)
async def publish_previews(run_id: str, results: list[ItemResult]) -> tuple[str, str] | None:
    """Posters beside the videos, a contact sheet and the review page `runs/{run_id}/index.html`;
    returns its URL and the markdown that links it (None if the store refused: never fails)."""
    rt = runtime()

    def _publish() -> tuple[str, str]:
        outputs = publish_review(rt.store, run_id, results)
        md = review_markdown(rt.store, outputs, expires_s=rt.settings.presign_expiry_s)
        return rt.store.url_for(outputs.page_key), "\n" + md

    try:
        return await rt.blocking(_publish)
    except (OSError, ValueError) as exc:
        rt.log("review page not written: %s", exc, level=logging.WARNING)
        return None
