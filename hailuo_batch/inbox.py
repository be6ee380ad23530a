"""The nightly inbox: manifests dropped in a folder or object-store prefix, each run once.

Users drop manifests (`*.csv`, `*.jsonl`, `*.json`) at the inbox's top level (default
`{output}/inbox/`). A nightly run:

1. lists them, and claims each one before touching it: an exclusive claim marker
   (`processing/{name}.claim`, created with an atomic create-if-absent: a hard link locally,
   `If-None-Match: *` on S3), then a move to `processing/{claim}/{name}`. Two overlapping runs
   never take the same file, and a file is never processed twice;
2. checks the manifest (readable, required columns, at least one valid row); a manifest that
   fails goes to `failed/{claim}/{name}` with `{name}.report.json` beside it, and costs nothing;
3. runs it (the flow's job);
4. moves it to `done/{claim}/{name}` with `{name}.run.json` (the run's id, results file,
   counts), or to `failed/{claim}/` with a report if the run itself failed.

A nightly run holds a lease in the inbox (`leases/{claim}.json`, renewed while it runs, as a
batch run's ledger lease is). A run killed while it ran a manifest leaves it at
`processing/{claim}/{name}`: the next nightly run finds it there with its claim's lease over
(`stranded`), puts it back in the inbox (`recover`) and runs it again; the batch run resumes
from the ledger, so nothing is paid twice and the videos the killed run paid for are fetched.
The stops are counted (`processing/{name}.recovered`, until the manifest finishes): one that
stops its run a third time (`stopped_too_often`) goes to `failed/` with a report instead, so a
manifest that kills the process cannot hold up the inbox night after night.
A run that dies between creating a claim marker and moving the file leaves
`processing/{name}.claim` behind, which keeps a re-dropped file of that name waiting: delete
the marker to release it.

Plain functions over an `OutputStore`; no Prefect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from hailuo_batch import markdown as md
from hailuo_batch.manifest import ItemDefaults, ManifestError, load_manifest
from hailuo_batch.storage import OutputStore

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".json")
MAX_RECOVERIES = 2  # a manifest whose nightly run stopped a third time is not run again alone
Outcome = Literal["done", "failed"]
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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

    def __init__(self, store: OutputStore) -> None:
        self.store = store

    @property
    def url(self) -> str:
        return self.store.url

    def pending(self) -> list[str]:
        """Names of the manifests waiting at the top level, in name order."""
        return [
            name
            for name in self.store.list(recursive=False)
            if name.lower().endswith(MANIFEST_SUFFIXES) and not name.startswith(".")
        ]

    def claim(self, name: str, claim_id: str) -> Claim | None:
        """Take `name` out of the inbox for this run; None if another run has it (or had it)."""
        marker = f"processing/{name}.claim"
        if not self.store.create_exclusive(marker, claim_id.encode()):
            return None
        key = f"processing/{claim_id}/{name}"
        try:
            self.store.move(name, key)
        except FileNotFoundError:
            return None  # processed by a run that listed it before us and released the marker
        finally:
            self.store.delete(marker)
        return Claim(name=name, claim_id=claim_id, key=key)

    def stranded(self, alive: Callable[[str], bool]) -> list[Claim]:
        """Manifests claimed by a nightly run that did not finish them (killed, crashed): those
        at `processing/{claim}/{name}` whose claim's lease `alive` says is over."""
        found = []
        for key in self.store.list("processing"):
            parts = key.split("/")
            if len(parts) != 3 or not parts[2].lower().endswith(MANIFEST_SUFFIXES):
                continue
            if not alive(parts[1]):
                found.append(Claim(name=parts[2], claim_id=parts[1], key=key))
        return found

    def earlier_stops(self, claim: Claim) -> list[str]:
        """The claims of the other nightly runs that stopped while running this very manifest
        (its bytes: a new file dropped under the name starts afresh) since it last finished,
        oldest first; `claim`'s own stop is never counted here, however often it is read."""
        return self._stops(claim)[1]

    def _stops(self, claim: Claim) -> tuple[str | None, list[str]]:
        """The manifest's digest (None: it is gone from where `claim` left it) and
        `earlier_stops`."""
        try:
            digest = self.store.sha256(claim.key)
        except FileNotFoundError:
            return None, []
        try:
            found = json.loads(self.store.read_text(_recoveries_key(claim.name)))
        except FileNotFoundError:
            return digest, []
        except ValueError:  # a torn or hand-edited record: still counts as one stop
            return digest, ["?"]
        if not isinstance(found, dict) or not isinstance(found.get("claims"), list):
            return digest, ["?"]
        if found.get("sha256") != digest:
            return digest, []
        return digest, [str(c) for c in found["claims"] if str(c) != claim.claim_id]

    def recover(self, claim: Claim) -> bool:
        """Put a stranded manifest back in the inbox, to be claimed again like a new one, and
        count the stop (`earlier_stops`); False (it stays where it is) while a manifest of the
        same name waits in the inbox. One another nightly run put back first is left to it."""
        if not self.store.exists(claim.key):
            return True
        if self.store.exists(claim.name):
            return False
        digest, earlier = self._stops(claim)
        if digest is None:  # another nightly run put it back first
            return True
        try:  # counted before the move, so a stop in between is not lost
            record = {"sha256": digest, "claims": [*earlier, claim.claim_id]}
            self.store.write_text_atomic(_recoveries_key(claim.name), json.dumps(record))
            self.release(claim)
        except FileNotFoundError:  # another nightly run put it back first
            pass
        return True

    def url_of(self, claim: Claim) -> str:
        return self.store.url_for(claim.key)

    def check(self, claim: Claim, defaults: ItemDefaults) -> ManifestCheck:
        """Read the claimed manifest as the batch flow will (nothing is paid here)."""
        if "::" in claim.name:  # fsspec reads `a::b` as a chained URL: the file is never found
            return ManifestCheck(
                ok=False,
                error=f"the file name {claim.name!r} holds '::', which fsspec reads as a "
                "chained URL: rename it without '::' and drop it in the inbox again",
            )
        return check_manifest(self.url_of(claim), defaults, self.store.storage_options or None)

    def release(self, claim: Claim) -> None:
        """Put a claimed manifest back in the inbox, untouched: its run could not start (a bad
        setting), so the next run takes it."""
        self.store.move(claim.key, claim.name)
        self.store.prune(f"processing/{claim.claim_id}")

    def finish(self, claim: Claim, outcome: Outcome, record: dict[str, Any]) -> str | None:
        """Move the manifest to `done/` or `failed/` and write its record beside it.

        Returns the URL of the record (`{name}.run.json` when done, `{name}.report.json` else),
        or None when the manifest is no longer where this run claimed it: another nightly run
        took it (this run's lease lapsed, or both found it stranded), and that run finishes it.
        """
        folder = f"{outcome}/{claim.claim_id}"
        try:
            self.store.move(claim.key, f"{folder}/{claim.name}")
        except FileNotFoundError:
            return None
        suffix = "run.json" if outcome == "done" else "report.json"
        record_key = f"{folder}/{claim.name}.{suffix}"
        self.store.write_text_atomic(record_key, json.dumps(record, indent=2, default=str) + "\n")
        self.store.prune(f"processing/{claim.claim_id}")  # kept while another manifest is there
        self.store.delete(_recoveries_key(claim.name))  # a later drop of the name starts afresh
        return self.store.url_for(record_key)


def _recoveries_key(name: str) -> str:
    """Where the claims of the nightly runs that stopped on manifest `name` are counted."""
    return f"processing/{name}.recovered"


def stopped_too_often(earlier_stops: list[str]) -> bool:
    """Whether a stranded manifest has stopped its nightly run once more than may be put back
    (`MAX_RECOVERIES`): something in it kills the process (memory, a worker's time limit), and
    running it every night would hold up every manifest behind it, night after night."""
    return len(earlier_stops) >= MAX_RECOVERIES


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


def new_record(claim: Claim, nightly_flow_run_id: str) -> dict[str, Any]:
    """The start of a manifest's record (`{name}.run.json` or `.report.json`): its claim, the
    nightly run that took it and when."""
    return {
        "manifest": claim.name,
        "claim": claim.claim_id,
        "nightly_flow_run_id": nightly_flow_run_id,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def run_record(
    record: dict[str, Any], flow_run_name: str, state: Any, result: Any
) -> tuple[Outcome, dict[str, Any]]:
    """Where a manifest goes after its generate-videos run, and its record: the run's flow run,
    state, run id, results file and counts. `state` is the run's final Prefect state, `result`
    its data (the summary, or the exception of a run that crashed)."""
    summary = result if isinstance(result, dict) else {}
    record = {
        **record,
        "flow_run_id": str(state.state_details.flow_run_id),
        "flow_run_name": flow_run_name,
        "state": state.type.value,
        "state_name": state.name,
        "run_id": summary.get("run_id"),
        "results": summary.get("results"),
        "by_status": summary.get("by_status"),
    }
    if state.is_completed():
        return "done", record
    error = state.message or (str(result) if isinstance(result, BaseException) else "run failed")
    return "failed", {**record, "stage": "run", "error": error}


def new_report(inbox_url: str) -> dict[str, Any]:
    """A night's report: the manifests done, failed, taken by another run, and left in the
    inbox because their run could not start (`kept`, with why)."""
    return {"inbox": inbox_url, "done": [], "failed": [], "taken": [], "kept": [], "stranded": []}


def nightly_outcome(report: dict[str, Any]) -> tuple[Literal["completed", "failed"], str, str]:
    """The nightly run's state (kind, name, message) from its report.

    One bad manifest does not fail the night when others ran: `Completed` named
    `CompletedWithFailures`, naming the bad files. `Failed` only when manifests failed and none
    ran to a completed run.
    """
    done, failed = report["done"], report["failed"]
    processed = f"{len(done)} manifest(s) processed"
    if kept := report.get("kept"):
        where = kept[0].get("at", "left in the inbox")
        return (
            "failed",
            "NotStarted",
            f"{kept[0]['error']}; manifest {kept[0]['manifest']} {where}, and the others not "
            f"claimed: the next run takes them once the setting is fixed ({processed})",
        )
    stuck = [r["key"] for r in report.get("stranded", [])]
    partly = [  # a dry run, or a cap that held items back, is what was asked for
        f"{r['manifest']} ({run_outcome(r)})"
        for r in done
        if r.get("state_name", "Completed") not in ("Completed", "DryRun", "CostCapReached")
    ]
    if not failed and not stuck and not partly:
        return "completed", "Completed", processed
    bad = "; ".join(
        ([f"{len(failed)} manifest(s) failed: {', '.join(r['manifest'] for r in failed)}"]
         if failed else [])
        + ([f"{len(partly)} manifest(s) ran with problems: "
            f"{', '.join(partly)}"]
           if partly else [])
        + ([f"{len(stuck)} manifest(s) left by a run that did not finish could not be put "
            f"back, a manifest of the same name waits in the inbox: {', '.join(stuck)}"]
           if stuck else [])
    )  # fmt: skip
    if done or not failed:
        return "completed", "CompletedWithFailures", f"{processed}; {bad}"
    return "failed", "Failed", bad


def run_outcome(record: dict[str, Any]) -> str:
    """A manifest's run as a person reads it: its state's name and its items by status."""
    counts = ", ".join(f"{n} {k}" for k, n in (record.get("by_status") or {}).items() if n)
    name = record.get("state_name") or "?"
    return f"{name}: {counts}" if counts else name


def report_markdown(report: dict[str, Any]) -> str:
    """The night's report as the markdown artifact shows it."""
    lines = [f"# nightly-batch: {md.code(report['inbox'])}", ""]
    if not any(report.get(k) for k in ("done", "failed", "taken", "kept", "stranded")):
        return "\n".join([*lines, "No new manifests."]) + "\n"
    lines += ["| manifest | outcome | run | record |", "|---|---|---|---|"]
    for outcome in ("done", "failed"):
        for r in report[outcome]:
            detail = r.get("error") or ""
            if r.get("flow_run_name"):
                ran = f"{r['flow_run_name']} ({run_outcome(r)})"
                detail = f"{ran}: {detail}" if detail else ran
            cells = (md.text(r["manifest"]), outcome, md.text(detail), md.code(r["record"]))
            lines.append("| " + " | ".join(cells) + " |")
    lines += [f"| {md.text(name)} | taken by another run | | |" for name in report["taken"]]
    lines += [
        f"| {md.text(r['manifest'])} | {md.text(r.get('at', 'left in the inbox'))} | "
        f"{md.text(r['error'])} | |"
        for r in report.get("kept", [])
    ]
    lines += [
        f"| {md.text(r['key'])} | left by a run that did not finish | {md.text(r['why'])} | |"
        for r in report.get("stranded", [])
    ]
    return "\n".join(lines) + "\n"
