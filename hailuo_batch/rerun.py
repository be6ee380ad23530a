"""Choosing and rewriting the items of a rerun, from a previous run's results. No Prefect."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import fsspec

from hailuo_batch import markdown as md
from hailuo_batch.ledger import Ledger, LedgerRecord, LedgerState, LedgerUnavailable
from hailuo_batch.manifest import id_key, is_item_id
from hailuo_batch.parts import results_folder
from hailuo_batch.policy import classify_fail_code
from hailuo_batch.results import ItemResult, ItemStatus, from_jsonl, to_jsonl
from hailuo_batch.secrets import redact_urls
from hailuo_batch.settings import FailClass
from hailuo_batch.storage import OutputStore, special_file

DEFAULT_RERUN_STATUSES = (ItemStatus.FAILED, ItemStatus.NOT_SUBMITTED, ItemStatus.UNCERTAIN)


#: where `write_selection` writes a rerun's manifest, in the output it reruns into
SELECTIONS = "reruns"


def is_selection(manifest_url: str, store: OutputStore) -> bool:
    """Whether `manifest_url` is a selection `write_selection` wrote into `store`: a rerun
    that chose its items (each failCode it resends was named), as `force` alone never does."""
    return manifest_url.startswith(store.url_for(SELECTIONS) + "/")


def output_of_results(results_url: str) -> str:
    """`{output}/runs/{run_id}/results.jsonl` -> `{output}`."""
    if not results_url.strip():
        raise ValueError(
            "no results file given: give the URL of a previous run's results.jsonl "
            "({output}/runs/{run_id}/results.jsonl)"
        )
    parts = results_url.rstrip("/").rsplit("/", 3)
    if len(parts) != 4 or parts[1] != "runs" or parts[3] != "results.jsonl":
        raise ValueError(
            f"{results_url} is not a results file of the form {{output}}/runs/{{run_id}}/"
            "results.jsonl; give the output to rerun into (--output, or output in the "
            "options)"
        )
    return parts[0]


def select_for_rerun(
    results: Iterable[ItemResult],
    *,
    statuses: Iterable[ItemStatus | str] = DEFAULT_RERUN_STATUSES,
    fail_codes: Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
) -> tuple[list[ItemResult], list[str]]:
    """The items to run again, and why others that matched were left out.

    Skipped items (content violations) match only when `skipped` is named in `statuses`.
    Invalid manifest rows without inputs cannot be rerun: fix the manifest instead.
    """
    ids = None if ids is None else list(ids)  # read once: a generator is not used up twice
    fail_codes = None if fail_codes is None else list(fail_codes)
    wanted = {ItemStatus(s) for s in statuses}
    codes = None if fail_codes is None else set(fail_codes)
    id_set = None if ids is None else {id_key(i) for i in ids}  # as the manifest: any case
    chosen: list[ItemResult] = []
    left_out: list[str] = []
    for name, given in (("ids", ids), ("fail_codes", fail_codes)):
        if given is not None and not given:
            left_out.append(f"{name} is an empty list: no item is selected (leave it out to "
                            "rerun every item that matches the rest)")  # fmt: skip
    seen: dict[str, ItemResult] = {}
    for r in results:
        seen.setdefault(id_key(r.id), r)
        if ItemStatus(r.status) not in wanted:
            continue
        if codes is not None and r.fail_code not in codes:
            continue
        if id_set is not None and id_key(r.id) not in id_set:
            continue
        if not r.image_url or not r.prompt:
            left_out.append(f"row {r.row} ({r.id}): no inputs recorded (invalid manifest row)")
            continue
        chosen.append(r)
    for item_id in ids or ():
        found = seen.get(id_key(item_id))
        if found is None:
            left_out.append(f"id {item_id}: not in the results file")
        elif ItemStatus(found.status) not in wanted:
            named = ", ".join(sorted(str(s) for s in wanted)) or "none"
            left_out.append(
                f"id {item_id}: {found.status}, not one of the statuses asked ({named})"
            )
    return chosen, left_out


def bad_input_unchanged(
    r: ItemResult,
    overrides: Mapping[str, Any],
    prompt_suffix: str | None,
    fail_codes: Iterable[str] | None,
    failcode_overrides: Mapping[str, FailClass] | None = None,
) -> bool:
    """Whether a rerun would send a bad-input failure again as it was: the contract says such
    an item is not resubmitted unchanged (it fails again, and is paid for again). Naming its
    failCode (`fail_codes`) says the user changed what the row points at, and reruns it."""
    if r.status != ItemStatus.FAILED:
        return False
    if classify_fail_code(r.fail_code, failcode_overrides) != "bad_input":
        return False
    if fail_codes and r.fail_code in set(fail_codes):
        return False
    return rerun_row(r, prompt_suffix=prompt_suffix, **overrides) == rerun_row(r)


def rerun_row(
    r: ItemResult,
    *,
    mode: str | None = None,
    duration: int | None = None,
    provider: str | None = None,
    prompt_suffix: str | None = None,
) -> dict[str, Any]:
    """The manifest row of a rerun item, with the overrides applied."""
    row: dict[str, Any] = {
        "id": r.id,
        "image_url": r.image_url,
        "prompt": (r.prompt or "") + (prompt_suffix or ""),
        "mode": mode or r.mode,
        "provider": provider or r.provider,
    }
    new_duration = duration if duration is not None else r.duration
    if new_duration is not None and "pro" not in str(row["mode"]):
        row["duration"] = new_duration
    return row


def to_manifest_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def run_id_of_results(results_url: str) -> str:
    """`{output}/runs/{run_id}/results.jsonl` -> `run_id` (else the file's name, without a
    URL's query or user information)."""
    if "://" in results_url:
        results_url = urlsplit(results_url).path or "results"
    parts = results_url.rstrip("/").rsplit("/", 3)
    if len(parts) == 4 and parts[1] == "runs":
        return parts[2]
    return parts[-1]


def selection_markdown(
    results_url: str,
    chosen: int,
    statuses: Iterable[ItemStatus | str],
    manifest_url: str,
    left_out: Iterable[str],
    *,
    dry_run: bool = False,
) -> str:
    """The rerun's artifact, first part: what it takes from the previous run."""
    shown = md.code(redact_urls(results_url))
    return (
        f"# {'dry run of a ' if dry_run else ''}rerun of {shown}\n\n{chosen} "
        f"items selected (statuses {', '.join(map(str, statuses))}); manifest "
        f"{md.code(manifest_url)}.\n" + "".join(f"\n- not rerun: {md.text(w)}" for w in left_out)
    )


def outcome_markdown(state_name: str | None, message: str | None, summary: Any) -> str:
    """The rerun's artifact, second part: its run's state, counts by status, results file."""
    lines = [f"\n## outcome: {state_name}\n"]
    if message:
        lines.append(f"\n{md.text(message)}\n")
    if isinstance(summary, dict):
        counts = {k: v for k, v in (summary.get("by_status") or {}).items() if v}
        if counts:
            lines.append("\n| status | items |\n|---|---|\n")
            lines += [f"| {k} | {v} |\n" for k, v in sorted(counts.items())]
        if summary.get("results"):
            lines.append(f"\nresults: {md.code(summary['results'])}\n")
    return "".join(lines)


MAX_RESULTS_BYTES = 512 * 2**20  # a results line is ~0.5 KB: a million items fit
"""The largest results file a rerun reads (a path such as /dev/zero would never end)."""


class ResultsFileError(ValueError):
    """A rerun's results file that cannot be read as a previous run's results."""


def read_results(url: str, storage_options: dict[str, Any] | None = None) -> list[ItemResult]:
    """A previous run's results file, from any fsspec URL; `ResultsFileError` (one line that
    names the file, its password or signature redacted) when it is missing, a folder, not text
    or not results."""
    try:
        return _read_results(url, storage_options)
    except ResultsFileError as exc:
        shown = redact_urls(str(exc))
        if shown == str(exc):
            raise
        raise ResultsFileError(shown) from None


def _read_results(url: str, storage_options: dict[str, Any] | None) -> list[ItemResult]:
    if (kind := special_file(url)) is not None:
        raise ResultsFileError(f"results file {url} is not a regular file ({kind})")
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            data = bytes(fh.read(MAX_RESULTS_BYTES + 1))
    except FileNotFoundError:
        raise ResultsFileError(f"results file {url} not found") from None
    except IsADirectoryError:
        raise ResultsFileError(f"{url} is a folder: give its runs/ID/results.jsonl") from None
    if len(data) > MAX_RESULTS_BYTES:
        raise ResultsFileError(
            f"results file {url} is larger than {MAX_RESULTS_BYTES:,} bytes: "
            "is it a run's results.jsonl?"
        )
    try:
        results = from_jsonl(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ResultsFileError(f"results file {url} is not UTF-8 text") from None
    except ValueError as exc:
        raise ResultsFileError(f"results file {url}: {exc}") from None
    if not results:  # a run writes one line per manifest row, and a manifest has rows
        raise ResultsFileError(
            f"results file {url} has no rows: give a run's runs/ID/results.jsonl"
        )
    return results


def carry_records(
    chosen: Iterable[ItemResult], dest: OutputStore, source: OutputStore | None
) -> list[str]:
    """Give a rerun into an output other than the results' own (`source`) what that output's
    ledger knows of each chosen item: a task that may have been paid for is then reported or
    held, and a known taskId read again, exactly as in a rerun into `source` itself. When
    `source` is unknown (a results file moved out of its output), a row the results call
    uncertain gets an `uncertain` record. A record `dest` already holds is its own history
    and wins. Returns a line per record carried."""
    if source is not None and source.url == dest.url:
        return []
    carried = []
    for r in chosen:
        if not is_item_id(r.id):  # a hand-edited row: its manifest row is refused later
            continue
        key = f"ledger/{r.id}.json"
        body = None
        if source is not None:
            body = _bytes_or_none(source, key)
            if body is not None and r.input_hash and _input_hash_of(body) != r.input_hash:
                # the row ran with other inputs since: what these inputs left is kept aside
                earlier = f"ledger/earlier/{r.id}/{r.input_hash}.json"
                body = _bytes_or_none(source, earlier) or body
        if body is None and r.status == ItemStatus.UNCERTAIN and r.input_hash:
            task_ids = [r.task_id] if r.task_id else []
            body = LedgerRecord(
                id=r.id, input_hash=r.input_hash, state=LedgerState.UNCERTAIN,
                task_id=r.task_id, task_ids=task_ids, attempts=max(r.attempts, 1),
                run_id=r.run_id,
            ).model_dump_json().encode()  # fmt: skip
        if body is not None and dest.create_exclusive(key, body):
            origin = source.url if source is not None else "its results row"
            carried.append(f"row {r.row} ({r.id}): ledger record carried over from {origin}")
    return carried


def adopt_results(results: list[ItemResult], dest: OutputStore) -> list[str]:
    """Put results that name tasks their run's ledger could not record (`ledger_behind`)
    where a run into `dest` looks for them: `runs/{run}/results.jsonl` (`results_folder`),
    unless a file is there already. A run whose output refused its writes left its results
    elsewhere (`./hailuo-results/{run}/`); rerun from there, those items' ledger records still
    say `submitting`, and without the file the rerun would take them for POSTs of unknown
    outcome and pay again. Returns a line per file put."""
    behind = {r.run_id for r in results if r.ledger_behind and r.task_id and r.run_id is not None}
    put = []
    # a run id is an id (`is_item_id`): it names a folder under runs/, never a path (`../x`)
    for run_id in sorted(i for i in behind if is_item_id(i)):
        key = f"runs/{results_folder(run_id)}/results.jsonl"
        rows = to_jsonl(r for r in results if r.run_id == run_id)
        if dest.create_exclusive(key, rows.encode("utf-8")):
            put.append(
                f"results of run {run_id} put at {dest.url_for(key)}: the tasks its ledger "
                "could not record are read from there, not paid for again"
            )
    return put


def _bytes_or_none(store: OutputStore, key: str) -> bytes | None:
    try:
        return store.read_bytes(key)
    except FileNotFoundError:
        return None


def _input_hash_of(body: bytes) -> str | None:
    try:
        return LedgerRecord.model_validate_json(body).input_hash
    except ValueError:
        return None  # carried as it is: the rerun reports it as corrupt, never as absent


def live_in_source(
    chosen: Iterable[ItemResult],
    dest: OutputStore,
    source: OutputStore | None,
    lease_ttl_s: float = 120.0,
) -> dict[str, str]:
    """The chosen items a live run still works on in `source` (id -> that run): a rerun into
    `source` itself leaves them to it, and so must a rerun into another output (a carried
    `submitting` record would otherwise be resubmitted while that run's POST may succeed)."""
    if source is None or source.url == dest.url:
        return {}
    ledger = Ledger(source, "rerun-check", lease_ttl_s=lease_ttl_s, retry_delays_s=())
    busy = {}
    for r in chosen:
        if not is_item_id(r.id):
            continue
        try:
            owner = ledger.owner(r.id)
        except LedgerUnavailable:
            continue
        if owner and ledger.lease_alive(owner):
            busy[r.id] = owner
    return busy


@dataclass
class Selection:
    """What a rerun takes from the previous run: the manifest written for it and why."""

    chosen: int
    total: int
    manifest_url: str
    markdown: str
    left_out: list[str] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)  # `carry_records`


def write_selection(
    store: OutputStore,
    results_url: str,
    *,
    source: OutputStore | None = None,
    lease_ttl_s: float = 120.0,
    statuses: Iterable[ItemStatus | str] = DEFAULT_RERUN_STATUSES,
    fail_codes: Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
    overrides: dict[str, Any] | None = None,
    prompt_suffix: str | None = None,
    dry_run: bool = False,
    failcode_overrides: Mapping[str, FailClass] | None = None,
) -> Selection:
    """Select the items of `results_url` to rerun and write them as a manifest under `reruns/`
    of `store` (`overrides`: mode, duration, provider for every row). `source`: the output the
    results belong to, when known; a rerun into another output carries its ledger records
    over first (`carry_records`; not in a dry run, which writes no record)."""
    statuses = list(statuses)
    previous = read_results(results_url, store.storage_options)
    chosen, left_out = select_for_rerun(previous, statuses=statuses, fail_codes=fail_codes, ids=ids)
    unchanged = [
        r for r in chosen
        if bad_input_unchanged(r, overrides or {}, prompt_suffix, fail_codes, failcode_overrides)
    ]  # fmt: skip
    left_out += [
        f"row {r.row} ({r.id}): bad input ({r.fail_code}), and the rerun would send it "
        "unchanged: not resubmitted (fix the row and run the manifest, add --prompt-suffix or "
        f"another --mode / --duration, or name it with --fail-code {r.fail_code})"
        for r in unchanged
    ]
    held = {id(r) for r in unchanged}
    chosen = [r for r in chosen if id(r) not in held]
    busy = live_in_source(chosen, store, source, lease_ttl_s)
    left_out += [
        f"row {r.row} ({r.id}): being processed by run {busy[r.id]} in "
        f"{source.url if source else ''}; not touched" for r in chosen if r.id in busy
    ]  # fmt: skip
    chosen = [r for r in chosen if r.id not in busy]
    carried = (
        [] if dry_run else carry_records(chosen, store, source) + adopt_results(previous, store)
    )
    rows = [rerun_row(r, prompt_suffix=prompt_suffix, **(overrides or {})) for r in chosen]
    key = f"{SELECTIONS}/{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-manifest.jsonl"
    store.write_text_atomic(key, to_manifest_jsonl(rows))
    url = store.url_for(key)
    text = selection_markdown(results_url, len(chosen), statuses, url, left_out, dry_run=dry_run)
    text += "".join(f"\n- {md.text(line)}" for line in carried)
    return Selection(len(rows), len(previous), url, text, list(left_out), carried)
