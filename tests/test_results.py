import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hailuo_batch.budget import Budget, Stop
from hailuo_batch.results import (
    ItemResult,
    ItemStatus,
    from_jsonl,
    reason,
    run_summary,
    summarize,
    summary_markdown,
    to_jsonl,
    write_results,
    write_summary,
)
from hailuo_batch.storage import OutputStore


def _r(i, status, **kw):
    return ItemResult(id=f"i{i}", row=i, status=status, **kw)


def test_jsonl_round_trip_keeps_every_field():
    rs = [
        _r(
            1,
            ItemStatus.SUCCEEDED,
            task_id="task_1",
            video="s3://b/videos/i1.mp4",
            bytes=10,
            sha256="ab",
            cost_usd=0.19,
            cost_time_ms=120000,
            prompt="p",
            duration=6,
        ),
        _r(2, ItemStatus.INVALID, field="image_url", errors=["short side 300 px"]),
    ]
    text = to_jsonl(rs)
    assert len(text.splitlines()) == 2
    assert json.loads(text.splitlines()[0])["status"] == "succeeded"
    assert from_jsonl(text) == rs


_ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(prompts=st.lists(_ANY_TEXT, min_size=1, max_size=5), msg=_ANY_TEXT, note=_ANY_TEXT)
def test_any_text_in_a_result_keeps_one_line_per_result(prompts, msg, note):
    """A prompt, provider message or note may hold U+2028, U+2029, NEL, form feeds...: the
    file still has one line per row for any reader, and reads back whole."""
    rs = [
        _r(i, ItemStatus.FAILED, prompt=p, fail_msg=msg, note=note) for i, p in enumerate(prompts)
    ]
    text = to_jsonl(rs)
    assert len(text.splitlines()) == len(rs)
    assert from_jsonl(text) == rs


def test_a_results_file_with_a_raw_line_separator_inside_a_value_still_reads():
    """Files written before the escapes hold U+2028 raw inside a string: only \\n ends a line."""
    raw = _r(1, ItemStatus.FAILED, prompt="one\u2028two", task_id="task_1").model_dump_json()
    assert from_jsonl(raw + "\n" + raw + "\n")[1].prompt == "one\u2028two"
    for end in ("\r\n", "\r"):  # saved by an editor on Windows, or an old Mac one
        assert len(from_jsonl(raw + end + raw + end)) == 2


def test_from_jsonl_names_the_bad_line():
    with pytest.raises(ValueError, match="results line 2"):
        from_jsonl('{"id":"a","row":1,"status":"failed"}\n{"nope": 1}\n')


def test_summary_counts_cost_and_processing_time():
    rs = [
        # item 1 was paid for by an earlier run: it counts for the item, not for this run
        _r(1, ItemStatus.SUCCEEDED, cost_usd=0.19, cost_time_ms=100_000, bytes=5),
        _r(
            2, ItemStatus.SUCCEEDED, cost_usd=0.32, run_cost_usd=0.32, cost_time_ms=140_000, bytes=7
        ),
        _r(
            3,
            ItemStatus.SKIPPED,
            cost_usd=0.19,
            run_cost_usd=0.19,
            fail_code="CONTENT_VIOLATION",
            cost_time_ms=90_000,
        ),
        _r(4, ItemStatus.INVALID),
        _r(5, ItemStatus.NOT_SUBMITTED),
    ]
    s = summarize(rs, run_id="r1", wall_time_s=12.3456, balance_before=10.0, balance_after=9.49)
    assert s["by_status"] == {
        "succeeded": 2,
        "skipped": 1,
        "failed": 0,
        "invalid": 1,
        "not_submitted": 1,
        "uncertain": 0,
    }
    assert s["by_fail_code"] == {"CONTENT_VIOLATION": 1}
    assert s["estimated_cost_usd"] == 0.51  # this run's POSTs only
    assert s["lifetime_estimated_cost_usd"] == 0.7
    assert s["balance_spent_usd"] == 0.51
    assert s["cost_time_ms"] == {"min": 90_000, "median": 100_000, "p95": 140_000, "max": 140_000}
    assert s["stored_bytes"] == 12
    md = summary_markdown(s, results_url="/out/runs/r1/results.jsonl")
    assert "| succeeded | 2 |" in md and "`CONTENT_VIOLATION`" in md
    assert "$0.70" in md and "/out/runs/r1/results.jsonl" in md
    assert "100.00 s" in md  # median costTime shown in seconds


def test_summary_without_balance_says_na():
    s = summarize([], run_id="r", wall_time_s=0)
    assert s["balance_spent_usd"] is None
    assert "n/a" in summary_markdown(s, results_url="x")


def test_summary_names_every_item_that_did_not_succeed_with_its_reason():
    rs = [
        _r(k, ItemStatus.FAILED, fail_code="GENERATION_FAILED", fail_msg=f"m{k}") for k in range(25)
    ]
    rs.append(_r(99, ItemStatus.SUCCEEDED))
    s = summarize(rs, run_id="r", wall_time_s=1)
    assert s["problems_total"] == 25 and len(s["problems"]) == 20  # the first 20, then a count
    assert s["problems"][0]["reason"] == "GENERATION_FAILED m0"
    assert all(p["status"] == "failed" for p in s["problems"])


def test_an_item_stored_but_perhaps_paid_twice_is_counted_and_named():
    """A rerun that resubmitted an uncertain item ends `succeeded`: the summary, the artifact
    and the terminal still say it may have cost twice."""
    note = "run r0 may have submitted it without a taskId (possible duplicate charge)"
    rs = [_r(1, ItemStatus.SUCCEEDED, uncertain=True, note=note), _r(2, ItemStatus.SUCCEEDED)]
    s = summarize(rs, run_id="r", wall_time_s=1)
    assert s["possible_duplicate_charges"] == 1
    assert s["problems"] == [{"id": "i1", "row": 1, "status": "succeeded", "reason": note}]
    assert "1 items may have been paid for twice" in summary_markdown(s, results_url="x")
    assert "paid for twice" not in summary_markdown(
        summarize(rs[1:], run_id="r", wall_time_s=1), results_url="x"
    )
    # a first POST of unknown outcome, or a held item: paid once at most, reported uncertain
    once = _r(3, ItemStatus.UNCERTAIN, uncertain=True, fail_code="AMBIGUOUS_SUBMIT")
    assert summarize([once], run_id="r", wall_time_s=1)["possible_duplicate_charges"] == 0


def test_a_video_that_is_not_the_clip_paid_for_is_counted_and_named():
    warning = "the video lasts 10.00 s but 6 s were requested"
    rs = [_r(1, ItemStatus.SUCCEEDED, warning=warning), _r(2, ItemStatus.SUCCEEDED)]
    s = summarize(rs, run_id="r", wall_time_s=1)
    assert s["not_as_ordered"] == 1 and s["problems_total"] == 1
    assert s["problems"] == [{"id": "i1", "row": 1, "status": "succeeded", "reason": warning}]
    assert "1 videos are not the clip paid for" in summary_markdown(s, results_url="x")
    assert summarize(rs[1:], run_id="r", wall_time_s=1)["not_as_ordered"] == 0


def test_run_summary_says_what_the_run_meant_to_spend_and_why_it_stopped():
    budget = Budget(cap_usd=1.0)
    budget.stop(Stop.BALANCE, "balance exhausted")
    rs = [_r(1, ItemStatus.SUCCEEDED, run_cost_usd=0.19)]
    s = run_summary(
        rs, run_id="r1", wall_time_s=1.0, balance_before=None, balance_after=None,
        budget=budget, estimate_usd=0.38001, manifest="m.csv",
    )  # fmt: skip
    assert s["by_status"]["succeeded"] == 1 and s["estimated_cost_usd"] == 0.19
    assert (s["estimated_batch_cost_usd"], s["max_cost_usd"]) == (0.38, 1.0)
    assert s["stopped"] == "balance exhausted" and s["manifest"] == "m.csv"
    assert run_summary(
        [], run_id="r", wall_time_s=0, balance_before=1, balance_after=1, budget=Budget(),
        estimate_usd=0,
    )["stopped"] is None  # fmt: skip


def test_results_are_written_under_the_run_folder(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    summary = {"run_id": "r1"}
    url, error = write_results(store, "r1", [_r(1, ItemStatus.FAILED)], summary)
    assert error is None and url.endswith("runs/r1/results.jsonl")
    assert from_jsonl(store.read_text("runs/r1/results.jsonl"))[0].status == "failed"
    assert json.loads(store.read_text("runs/r1/summary.json")) == {"run_id": "r1", "results": url}
    # the review page's URL, once it is written, goes into the same file
    write_summary(store, "r1", {**summary, "review_page": "p/index.html"})
    assert json.loads(store.read_text("runs/r1/summary.json"))["review_page"] == "p/index.html"


class _DeadStore:
    """An output store that stays unreachable."""

    def write_text_atomic(self, key, text):
        raise OSError("store unreachable")

    def url_for(self, key):
        return f"s3://gone/{key}"


def test_results_outlive_an_unreachable_store_on_this_machine(tmp_path):
    summary = {"run_id": "r1"}
    url, error = write_results(
        _DeadStore(), "r1", [_r(1, ItemStatus.SUCCEEDED)], summary,
        fallback_dir=str(tmp_path / "local"), retry_delays=(),
    )  # fmt: skip
    assert "store unreachable" in str(error)
    assert url == summary["results_fallback"] and url.endswith("local/r1/results.jsonl")
    assert len(from_jsonl((tmp_path / "local" / "r1" / "results.jsonl").read_text())) == 1
    on_disk = json.loads((tmp_path / "local" / "r1" / "summary.json").read_text())
    assert on_disk["results"] == on_disk["results_fallback"] == url  # says where they are


def test_problems_that_cost_money_come_before_free_ones():
    """Twenty invalid rows cost nothing; the failed item that was paid for must not hide
    behind them in the first twenty."""
    rs = [_r(k, ItemStatus.INVALID, fail_code="BAD_ROW") for k in range(1, 21)]
    rs += [
        _r(21, ItemStatus.FAILED, fail_code="GENERATION_FAILED"),
        _r(22, ItemStatus.NOT_SUBMITTED, fail_code="COST_CAP"),
        _r(23, ItemStatus.UNCERTAIN, fail_code="AMBIGUOUS_SUBMIT", uncertain=True),
        _r(24, ItemStatus.SKIPPED, fail_code="NSFW"),
    ]
    s = summarize(rs, run_id="r", wall_time_s=1)
    order = [p["status"] for p in s["problems"]]
    assert order[:4] == ["uncertain", "failed", "skipped", "invalid"]
    assert s["problems_more"] == {"invalid": 3, "not_submitted": 1}  # past the first 20
    assert order[4:] == ["invalid"] * 16 and s["problems_total"] == 24
    assert [p["row"] for p in s["problems"][3:5]] == [1, 2]  # by row within a status


def test_a_reason_names_its_field_once():
    said = "row 9, field 'id': duplicate id 'a' (first in row 2)"
    dup = _r(9, ItemStatus.INVALID, fail_code=None, fail_msg=said, field="id")
    assert reason(dup) == said
    bare = _r(3, ItemStatus.INVALID, fail_msg="not an image", field="image_url")
    assert reason(bare) == "field image_url: not an image"


def test_an_item_perhaps_paid_twice_comes_first_whatever_its_status():
    rs = [
        _r(1, ItemStatus.FAILED, fail_code="GENERATION_FAILED"),
        _r(2, ItemStatus.SUCCEEDED, uncertain=True, note="possible duplicate charge"),
    ]
    assert [p["row"] for p in summarize(rs, run_id="r", wall_time_s=1)["problems"]] == [2, 1]


def test_an_item_the_ledger_could_not_record_is_counted_and_named():
    rs = [
        _r(1, ItemStatus.SUCCEEDED, ledger_behind=True, note="ledger not updated"),
        _r(2, ItemStatus.SUCCEEDED),
    ]
    s = summarize(rs, run_id="r", wall_time_s=1)
    assert s["ledger_behind"] == 1 and [p["row"] for p in s["problems"]] == [1]
    assert "1 items' ledger records could not be written" in summary_markdown(s, results_url="x")


def test_a_dry_runs_problems_are_the_rows_to_fix_not_the_items_it_would_submit():
    """25 valid rows a dry run would submit and one invalid row: the invalid row leads the
    list a person reads (the CLI shows 20), the would-be submissions are not problems."""
    from hailuo_batch.results import DRY_RUN_REASON

    rs = [_r(i, ItemStatus.NOT_SUBMITTED, fail_msg=DRY_RUN_REASON) for i in range(1, 26)]
    rs.append(_r(26, ItemStatus.INVALID, field="image_url", errors=["not found (404)"]))
    rs.append(_r(27, ItemStatus.NOT_SUBMITTED, fail_msg="being processed by concurrent run r9"))
    s = summarize(rs, run_id="r", wall_time_s=1.0)
    assert [p["row"] for p in s["problems"]] == [26, 27] and s["problems_total"] == 2
    capped = [_r(i, ItemStatus.NOT_SUBMITTED, fail_msg="max cost reached") for i in range(30)]
    s = summarize([*capped, _r(99, ItemStatus.INVALID, errors=["x"])], run_id="r", wall_time_s=1)
    assert s["problems"][0]["row"] == 99  # before the items the cap held back


def test_a_dry_runs_summary_says_it_is_one_and_what_submitting_would_cost():
    rs = [_r(i, ItemStatus.NOT_SUBMITTED, fail_msg="dry run") for i in range(4)]
    s = run_summary(
        rs, run_id="r", wall_time_s=1.0, balance_before=None, balance_after=None,
        budget=Budget(), estimate_usd=0.76, dry_run=True,
    )  # fmt: skip
    text = summary_markdown(s, results_url="file:///r/results.jsonl")
    assert text.startswith("# hailuo-batch dry run `r`")
    assert "nothing was submitted" in text and "**$0.76**" in text
    stopped = Budget()
    stopped.stop(Stop.BALANCE, "HTTP 402: top up")
    s = run_summary(
        rs, run_id="r", wall_time_s=1.0, balance_before=None, balance_after=None,
        budget=stopped, estimate_usd=0.76,
    )  # fmt: skip
    assert "stopped submitting: HTTP 402" in summary_markdown(s, results_url="u")
