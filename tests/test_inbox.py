"""The nightly inbox on a local folder: claims, checks, moves and the night's report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from hailuo_batch.inbox import (
    Claim,
    Inbox,
    default_inbox,
    new_record,
    report_markdown,
    run_name_for,
    run_record,
)
from hailuo_batch.manifest import ItemDefaults
from hailuo_batch.storage import OutputStore


def test_pending_claim_check_and_finish(tmp_path: Path) -> None:
    box = Inbox(OutputStore(default_inbox(str(tmp_path))))
    box.store.write_text_atomic("b.csv", "image_url,prompt\nhttps://x.test/y.jpg,pan\n")
    box.store.write_text_atomic("a.jsonl", "{}\n")
    box.store.write_text_atomic("notes.txt", "not a manifest")
    box.store.write_text_atomic("sub/c.csv", "nested: not at the top level")
    assert box.pending() == ["a.jsonl", "b.csv"]

    claim = box.claim("b.csv", "night-1")
    assert claim is not None and box.pending() == ["a.jsonl"]
    assert box.claim("b.csv", "night-2") is None  # gone: nobody takes it twice
    check = box.check(claim, ItemDefaults())
    assert check.ok and check.valid_rows == 1
    url = box.finish(claim, "done", {"run": "r1"})
    assert json.loads(Path(url).read_text()) == {"run": "r1"}
    assert (tmp_path / "inbox/done/night-1/b.csv").exists()
    assert not (tmp_path / "inbox/processing/night-1").exists()  # emptied folder removed

    bad = box.claim("a.jsonl", "night-1")
    assert bad is not None and not box.check(bad, ItemDefaults()).ok


def test_names_and_report() -> None:
    assert run_name_for("Q4 orders.csv") == "nightly-Q4-orders.csv"
    md = report_markdown({"inbox": "x", "done": [], "failed": [], "taken": []})
    assert "No new manifests." in md


def _state(completed: bool, message: str | None = None) -> SimpleNamespace:
    """What a Prefect State tells of a finished run."""
    return SimpleNamespace(
        state_details=SimpleNamespace(flow_run_id="fr-1"),
        type=SimpleNamespace(value="COMPLETED" if completed else "FAILED"),
        name="Completed" if completed else "NothingSucceeded",
        is_completed=lambda: completed,
        message=message,
    )


def test_a_manifests_record_says_which_run_took_it_and_how_it_ended() -> None:
    record = new_record(Claim("night.csv", "c1", "processing/c1/night.csv"), "nightly-1")
    assert record["manifest"] == "night.csv" and record["claim"] == "c1"
    assert record["nightly_flow_run_id"] == "nightly-1" and record["at"].startswith("20")
    summary = {"run_id": "r1", "results": "out/runs/r1/results.jsonl", "by_status": {"ok": 1}}
    outcome, done = run_record(record, "nightly-night.csv", _state(True), summary)
    assert outcome == "done" and "error" not in done
    assert (done["flow_run_id"], done["state"], done["run_id"]) == ("fr-1", "COMPLETED", "r1")
    assert done["results"] == "out/runs/r1/results.jsonl" and done["manifest"] == "night.csv"


def test_a_failed_run_sends_its_manifest_to_failed_with_the_reason() -> None:
    record = new_record(Claim("n.csv", "c1", "k"), "nightly-1")
    outcome, failed = run_record(record, "x", _state(False, "2 items failed"), {"run_id": "r"})
    assert outcome == "failed" and (failed["stage"], failed["error"]) == ("run", "2 items failed")
    _, crashed = run_record(record, "x", _state(False), RuntimeError("worker died"))
    assert crashed["error"] == "worker died" and crashed["run_id"] is None
    assert run_record(record, "x", _state(False), None)[1]["error"] == "run failed"


def test_a_manifest_whose_name_holds_a_double_colon_is_refused_saying_to_rename_it(
    tmp_path: Path,
) -> None:
    box = Inbox(OutputStore(str(tmp_path / "inbox")))
    box.store.write_text_atomic("x::y.csv", "image_url,prompt\nhttps://x/y.jpg,pan\n")
    claim = box.claim("x::y.csv", "C")
    assert claim is not None
    check = box.check(claim, ItemDefaults())
    assert not check.ok and "rename it without '::'" in (check.error or "")
    assert "not found" not in (check.error or "")
