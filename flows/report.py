"""What a run leaves for people: the results files, the review page and the Prefect artifacts
(item table, summary, progress), written while the run goes and at its end."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from flows.runtime import runtime
from hailuo_batch.artifacts import report_keys
from hailuo_batch.ledger import LedgerUnavailable, with_retries
from hailuo_batch.progress import ProgressState, notify
from hailuo_batch.results import ItemResult, dumps, results_as_table, summary_markdown, to_jsonl
from hailuo_batch.review import publish_review, review_markdown, video_store_key
from hailuo_batch.storage import OutputStore, run_key

#: where the results go when the output store stays unreachable at the end of a run
FALLBACK_RESULTS_DIR = "hailuo-results"


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


@task(cache_policy=NO_CACHE)
async def write_results(run_id: str, results: list[ItemResult], summary: dict[str, Any]) -> str:
    """Write results.jsonl and summary.json under {output}/runs/{run_id}/ (atomically).

    If the output store stays unreachable, they go to `./hailuo-results/{run_id}/` on this
    machine instead, and the run says so: the results are never lost with the store.
    """
    rt = runtime()
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
    await acreate_markdown_artifact(
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
    table = await rt.blocking(results_as_table, results, partial(_video_link, rt.store, expiry))
    links = "" if rt.store.is_local else f"; video links expire after {expiry / 3600:g} h"
    so_far = f" ({len(results)} of {partial_of} finished so far)" if partial_of else ""
    await acreate_table_artifact(
        table, key=key, description=f"Items of run {run_id}{so_far}{links}"
    )


@task(cache_policy=NO_CACHE)
async def publish_previews(run_id: str, results: list[ItemResult]) -> tuple[str, str] | None:
    """Posters beside the videos, a contact sheet and the review page `runs/{run_id}/index.html`.

    Returns the page's URL and the markdown that links it (None if the store refused them:
    previews never fail a run).
    """
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


def _video_link(store: OutputStore, expires_s: int, r: ItemResult) -> str | None:
    """A link a browser can open: presigned HTTPS on an object store, the path locally."""
    key = video_store_key(store, r.video)
    if key is None or store.is_local:
        return r.video
    try:
        return store.presign(key, expires_s)
    except (OSError, ValueError, RuntimeError):
        return r.video
