"""The fate of every manifest row: the results file a rerun can read, and the run summary.

`results.jsonl` holds one `ItemResult` per manifest row (valid or not); `summary.json` holds the
totals from `summarize`. These files, not Prefect's database, are the source of truth.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from hailuo_batch import markdown as md
from hailuo_batch.policy import percentile

if TYPE_CHECKING:
    from hailuo_batch.budget import Budget

#: where the results go when the output store stays unreachable at the end of a run
FALLBACK_RESULTS_DIR = "hailuo-results"


class ItemStatus(StrEnum):
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"  # content policy: never resubmitted automatically
    FAILED = "failed"
    INVALID = "invalid"  # refused before any money was spent
    NOT_SUBMITTED = "not_submitted"  # e.g. balance exhausted, run stopped, cost cap reached
    UNCERTAIN = "uncertain"  # the provider may have accepted it, but no taskId is known


class ItemResult(BaseModel):
    """One line of results.jsonl."""

    model_config = ConfigDict(use_enum_values=True)

    id: str
    row: int
    status: ItemStatus
    task_id: str | None = None
    fail_code: str | None = None
    fail_msg: str | None = None
    attempts: int = 0
    video: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    # what the stored video is, as decoded before it was stored
    video_duration_s: float | None = None
    video_resolution: str | None = None  # "1366x768"
    warning: str | None = None  # e.g. a clip shorter than the duration paid for
    cost_usd: float = 0.0  # estimated, over the item's whole life (every run's POSTs)
    run_cost_usd: float = 0.0  # estimated, of this run's POSTs only
    cost_time_ms: int | None = None
    # the item's inputs, so a rerun needs nothing but this file
    image_url: str | None = None
    prompt: str | None = None
    mode: str | None = None
    duration: int | None = None
    provider: str | None = None
    input_hash: str | None = None
    # where it went wrong, for invalid rows: the field and every rule broken
    field: str | None = None
    errors: list[str] = []
    # resume and reruns
    note: str | None = None  # e.g. "already stored by run X", "inputs changed since run Y"
    uncertain: bool = False  # an earlier POST may have been accepted without a recorded taskId
    # the ledger could not record this item's last step (the store refused): the next run
    # into the output takes its task from this results file (`ledger.task_from_results`)
    ledger_behind: bool = False
    run_id: str | None = None
    finished_at: str | None = None


#: characters `str.splitlines()` (and JavaScript) end a line at that JSON leaves raw inside
#: strings (a prompt pasted from a word processor holds U+2028): written as escapes
_RAW_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


_LINE_END = re.compile(r"\r\n|\r|\n")


def to_jsonl(results: Iterable[ItemResult]) -> str:
    """One JSON line per result; every line break inside a value is escaped."""
    return "".join(r.model_dump_json().translate(_RAW_BREAKS) + "\n" for r in results)


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text, ended by "\n", "\r\n" or "\r" (which JSON always escapes
    inside a string) and nothing else: a file written before the escapes may hold a raw U+2028
    inside a string, which `str.splitlines()` would cut."""
    return _LINE_END.split(text)


def from_jsonl(text: str) -> list[ItemResult]:
    out = []
    for n, line in enumerate(jsonl_lines(text), start=1):
        if line.strip():
            try:
                out.append(ItemResult.model_validate_json(line))
            except ValidationError as exc:  # one line naming the field, not pydantic's page
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                why = f"{where}: {first['msg']}" if where else first["msg"]
                raise ValueError(f"results line {n} is not a result record ({why})") from None
            except ValueError as exc:
                raise ValueError(f"results line {n} is not a result record: {exc}") from None
    return out


#: the order a person reads problems in: what may have cost money twice, what was paid for and
#: has no video (failed, skipped), rows to fix, stored videos to look at (not as ordered, a
#: ledger behind), and last what was not submitted (a rerun sends it)
_PROBLEM_ORDER = {
    "uncertain": 0, "failed": 1, "skipped": 2, "invalid": 3, "succeeded": 4, "not_submitted": 5,
}  # fmt: skip
#: why a dry run leaves a valid item unsubmitted: what it would do, not a problem
DRY_RUN_REASON = "dry run"


def summarize(
    results: list[ItemResult],
    *,
    run_id: str,
    wall_time_s: float,
    balance_before: float | None = None,
    balance_after: float | None = None,
) -> dict[str, Any]:
    """Totals for summary.json and the markdown artifact."""
    by_status = Counter(r.status for r in results)
    # an item stored, but perhaps paid for twice (an earlier POST of unknown outcome), is
    # something to look at too
    problems = sorted(
        (
            r
            for r in results
            if (r.status != ItemStatus.SUCCEEDED or r.uncertain or r.warning or r.ledger_behind)
            and not (r.status == ItemStatus.NOT_SUBMITTED and r.fail_msg == DRY_RUN_REASON)
        ),
        key=lambda r: (0 if r.uncertain else _PROBLEM_ORDER.get(str(r.status), 9), r.row),
    )
    by_code = Counter(r.fail_code for r in results if r.fail_code)
    cost_times = [float(r.cost_time_ms) for r in results if r.cost_time_ms is not None]
    spent = None
    if balance_before is not None and balance_after is not None:
        spent = round(balance_before - balance_after, 4)
    return {
        "run_id": run_id,
        "items": len(results),
        "by_status": {s.value: by_status[s] for s in ItemStatus},
        "by_fail_code": dict(sorted(by_code.items())),
        "estimated_cost_usd": round(sum(r.run_cost_usd for r in results), 4),
        "lifetime_estimated_cost_usd": round(sum(r.cost_usd for r in results), 4),
        "balance_before_usd": balance_before,
        "balance_after_usd": balance_after,
        "balance_spent_usd": spent,
        "cost_time_ms": {
            "min": min(cost_times) if cost_times else None,
            "median": statistics.median(cost_times) if cost_times else None,
            "p95": percentile(cost_times, 95),
            "max": max(cost_times) if cost_times else None,
        },
        "stored_bytes": sum(r.bytes or 0 for r in results),
        # resubmitted after a POST of unknown outcome: an `uncertain` item itself paid once at most
        "possible_duplicate_charges": sum(
            r.uncertain and r.status != ItemStatus.UNCERTAIN for r in results
        ),
        # the ledger is behind for these: the next run may pay for them again
        "ledger_behind": sum(r.ledger_behind for r in results),
        # stored, but not the clip that was paid for (its length or resolution)
        "not_as_ordered": sum(
            r.status == ItemStatus.SUCCEEDED and bool(r.warning) for r in results
        ),
        # what a person must look at: every item that did not succeed, first 20, with why
        "problems": [_problem(r) for r in problems[:20]],
        "problems_total": len(problems),
        # the kinds of those past the first 20: none hidden without a word
        "problems_more": dict(Counter(str(r.status) for r in problems[20:])),
        "wall_time_s": round(wall_time_s, 3),
    }


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.2f}{unit}"
    return f"{v}{unit}"


def summary_markdown(summary: dict[str, Any], *, results_url: str) -> str:
    """The run's markdown artifact: counts, cost, balance, processing and wall time."""
    dry = bool(summary.get("dry_run"))
    lines = [f"# hailuo-batch {'dry run' if dry else 'run'} `{summary['run_id']}`", ""]
    if dry:
        lines += [
            "**A dry run: nothing was submitted.** Submitting the valid items that still need "
            "paying for would cost about "
            f"**${summary.get('estimated_batch_cost_usd', 0.0):,.2f}**.",
            "",
        ]
    lines += ["| status | items |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in summary["by_status"].items() if v]
    lines += [f"| **total** | **{summary['items']}** |", ""]
    if summary["by_fail_code"]:
        lines += ["| failCode | items |", "|---|---:|"]
        lines += [f"| {md.code(k)} | {v} |" for k, v in summary["by_fail_code"].items()]
        lines.append("")
    ct = {k: (None if v is None else v / 1000) for k, v in summary["cost_time_ms"].items()}
    if summary.get("stopped"):
        lines += [f"- **stopped submitting: {md.text(summary['stopped'])}**"]
    lines += [
        f"- estimated cost of this run: **${summary['estimated_cost_usd']:,.2f}** "
        f"(these items over all runs: ${summary.get('lifetime_estimated_cost_usd', 0.0):,.2f})",
        f"- balance before / after: {_fmt(summary['balance_before_usd'], ' USD')} / "
        f"{_fmt(summary['balance_after_usd'], ' USD')} (spent: "
        f"{_fmt(summary['balance_spent_usd'], ' USD')})",
        "- provider processing time (costTime) min / median / p95 / max: "
        f"{_fmt(ct['min'], ' s')} / "
        f"{_fmt(ct['median'], ' s')} / {_fmt(ct['p95'], ' s')} / {_fmt(ct['max'], ' s')}",
        f"- wall time: {_fmt(summary['wall_time_s'], ' s')}",
        f"- stored: {summary['stored_bytes']:,} bytes",
        f"- results: {md.code(results_url)}",
    ]
    learned = (summary.get("concurrency") or {}).get("learned_limit")
    if learned:
        lines.append(
            f"- concurrency: the provider accepted about {learned} tasks in flight "
            f"(asked for up to {summary['concurrency'].get('ceiling')}; "
            f"{summary['concurrency'].get('rate_limited', 0)} submissions refused with 429)"
        )
    if summary.get("possible_duplicate_charges"):
        lines.append(
            f"- **{summary['possible_duplicate_charges']} items may have been paid for twice** "
            "(a POST of unknown outcome before; `uncertain` in the results): check the "
            "provider's dashboard"
        )
    if summary.get("ledger_behind"):
        lines.append(
            f"- **{summary['ledger_behind']} items' ledger records could not be written**: the "
            "next run into this output takes their tasks from this run's results file (keep "
            "it: without it, that run would pay for them again)"
        )
        if summary.get("results_fallback"):
            lines.append(
                "- the results file is on this machine only (the store refused it): copy it to "
                f"{md.code('runs/' + summary['run_id'] + '/results.jsonl')} in the output "
                "before the next run"
            )
    if summary.get("not_as_ordered"):
        lines.append(
            f"- **{summary['not_as_ordered']} videos are not the clip paid for** (length or "
            "resolution; each result's `warning` says which)"
        )
    if summary.get("spend_warning"):
        lines.append(f"- **spend: {md.text(summary['spend_warning'])}**")
    if summary.get("rerun_of"):
        lines.append(f"- rerun of: {md.code(summary['rerun_of'])}")
    return "\n".join(lines) + "\n"


def _problem(r: ItemResult) -> dict[str, Any]:
    why = shorten(reason(r) or r.note, 160)
    return {"id": r.id, "row": r.row, "status": str(r.status), "reason": why}


#: what an item whose ledger record could not be written needs from the person
LEDGER_BEHIND_REASON = (
    "the ledger could not record this item's last step: keep this run's results file, the "
    "next run takes its task from it (without it, that run would pay again)"
)


def reason(r: ItemResult) -> str:
    """Why an item did not succeed, whole: the code and message, or every rule it broke (or
    what to look at in one that did: not the clip paid for, a ledger behind)."""
    parts = [p for p in (r.fail_code, r.fail_msg) if p] or ([r.warning] if r.warning else [])
    if r.ledger_behind:
        parts.append(LEDGER_BEHIND_REASON)
    if r.errors and (not r.fail_msg or len(r.errors) > 1):
        parts.append("; ".join(r.errors))
    said = " ".join(parts)
    if r.field and r.status == ItemStatus.INVALID and f"field '{r.field}'" not in said:
        parts.insert(0, f"field {r.field}:")
    return " ".join(parts)


def shorten(text: str | None, limit: int = 80) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def results_as_table(
    results: list[ItemResult], video_link: Callable[[ItemResult], str | None] | None = None
) -> list[dict[str, Any]]:
    """Rows for the Prefect table artifact: what a person needs to act on each item.

    `video_link` turns a stored video into a link a browser can open (a presigned URL on S3);
    without it the storage URL is shown.
    """
    rows = []
    for r in results:
        rows.append(
            {
                "id": r.id,
                "row": r.row,
                "status": str(r.status),
                "reason": reason(r),
                "prompt": shorten(r.prompt),
                "generation_s": None if r.cost_time_ms is None else round(r.cost_time_ms / 1000, 1),
                "attempts": r.attempts,
                "cost_usd": r.run_cost_usd,
                "video": (video_link(r) if video_link and r.video else r.video),
                "task_id": r.task_id,
                "note": r.note,
            }
        )
    return rows


def dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True) + "\n"


def run_summary(
    results: list[ItemResult],
    *,
    run_id: str,
    wall_time_s: float,
    balance_before: float | None,
    balance_after: float | None,
    budget: Budget,
    estimate_usd: float,
    **facts: Any,
) -> dict[str, Any]:
    """`summarize` plus what the run set out to spend, its cap, why it stopped, and `facts`."""
    summary = summarize(
        results,
        run_id=run_id,
        wall_time_s=wall_time_s,
        balance_before=balance_before,
        balance_after=balance_after,
    )
    stopped = budget.stopped
    summary.update(
        estimated_batch_cost_usd=round(estimate_usd, 4),
        max_cost_usd=budget.cap_usd,
        stopped=stopped[1] if stopped else None,
        **facts,
    )
    return summary


def write_results(
    store: Any,
    run_id: str,
    results: list[ItemResult],
    summary: dict[str, Any],
    *,
    fallback_dir: str = FALLBACK_RESULTS_DIR,
    retry_delays: Sequence[float] | None = None,
) -> tuple[str, Exception | None]:
    """Write results.jsonl and summary.json under `runs/{run_id}/` of `store` (atomically, with
    the ledger's retries); returns the results file's URL.

    If the store stays unreachable they go to `{fallback_dir}/{run_id}/` on this machine instead,
    `summary["results_fallback"]` says where, and the store's error is returned with that URL:
    the results are never lost with the store.
    """
    from hailuo_batch.ledger import STORE_RETRY_DELAYS_S, LedgerUnavailable, with_retries
    from hailuo_batch.storage import OutputStore, run_key

    summary["results"] = store.url_for(run_key(run_id, "results.jsonl"))
    files = {"results.jsonl": to_jsonl(results), "summary.json": dumps(summary)}
    delays = STORE_RETRY_DELAYS_S if retry_delays is None else retry_delays
    try:
        for name, text in files.items():
            key = run_key(run_id, name)
            with_retries(
                partial(store.write_text_atomic, key, text), key, delays=delays, write=True
            )
        return summary["results"], None
    except LedgerUnavailable as exc:
        fallback = OutputStore(str(Path(fallback_dir).absolute()))
        url = fallback.url_for(f"{run_id}/results.jsonl")
        summary["results"] = summary["results_fallback"] = url
        files["summary.json"] = dumps(summary)
        for name, text in files.items():
            fallback.write_text_atomic(f"{run_id}/{name}", text)
        return url, exc


def write_summary(store: Any, run_id: str, summary: dict[str, Any]) -> None:
    """Write summary.json again (after the review page, whose URL it then holds); a store that
    refuses is left as it was: results.jsonl and the first summary.json stand."""
    from hailuo_batch.ledger import LedgerUnavailable, with_retries
    from hailuo_batch.storage import run_key

    if "results_fallback" in summary:
        return  # the store did not take the first one
    key = run_key(run_id, "summary.json")
    with contextlib.suppress(LedgerUnavailable):
        with_retries(partial(store.write_text_atomic, key, dumps(summary)), key, write=True)
