"""The nightly inbox on a local folder: claims, checks, moves and the night's report."""

from __future__ import annotations

import json
from pathlib import Path

from hailuo_batch.inbox import Inbox, default_inbox, report_markdown, run_name_for
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
