"""The nightly run's state: one bad inbox file does not fail a night whose other files ran."""

from __future__ import annotations

from hailuo_batch.inbox import nightly_outcome


def _report(done: list[str], failed: list[str]) -> dict:
    return {
        "inbox": "s3://b/inbox/",
        "done": [{"manifest": n} for n in done],
        "failed": [{"manifest": n} for n in failed],
        "taken": [],
    }


def test_a_bad_file_beside_good_ones_completes_with_failures_naming_it():
    kind, name, message = nightly_outcome(_report(["a.csv", "b.csv"], ["bad.csv"]))
    assert (kind, name) == ("completed", "CompletedWithFailures")
    assert "bad.csv" in message and "2 manifest(s) processed" in message


def test_only_bad_files_fail_the_night():
    kind, name, message = nightly_outcome(_report([], ["x.csv", "y.jsonl"]))
    assert (kind, name) == ("failed", "Failed")
    assert "x.csv" in message and "y.jsonl" in message


def test_an_empty_or_clean_night_is_completed():
    assert nightly_outcome(_report([], []))[:2] == ("completed", "Completed")
    assert nightly_outcome(_report(["a.csv"], []))[:2] == ("completed", "Completed")


def test_a_manifest_whose_run_had_failed_items_makes_the_night_say_so():
    """Its run completed with failures: the night is not plain green, and names the file, its
    run's state and counts; the report's table shows them too."""
    from hailuo_batch.inbox import report_markdown

    report = _report(["ok.csv"], [])
    report["done"].append({
        "manifest": "night1.csv", "flow_run_name": "nightly-night1-csv", "record": "r.json",
        "state_name": "CompletedWithFailures",
        "by_status": {"succeeded": 1, "failed": 1, "skipped": 1, "invalid": 2},
    })  # fmt: skip
    report["done"][0].update(state_name="Completed", record="o.json", flow_run_name="n-ok")
    kind, name, message = nightly_outcome(report)
    assert (kind, name) == ("completed", "CompletedWithFailures")
    assert "night1.csv (CompletedWithFailures: 1 succeeded, 1 failed, 1 skipped, 2 invalid)" in (
        message
    )
    assert "ok.csv" not in message.split(";", 1)[1] and "ran with problems" in message
    table = report_markdown(report)
    assert "CompletedWithFailures\\: 1 succeeded, 1 failed" in table  # markdown-escaped
    for asked in ("DryRun", "CostCapReached"):  # what the options asked for: no problem
        report["done"][1]["state_name"] = asked
        assert nightly_outcome(report)[1] == "Completed"
