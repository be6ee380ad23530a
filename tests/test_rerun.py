import json
import os

import pytest

from hailuo_batch.rerun import (
    ResultsFileError,
    output_of_results,
    read_results,
    rerun_row,
    select_for_rerun,
    write_selection,
)
from hailuo_batch.results import ItemResult, to_jsonl
from hailuo_batch.storage import OutputStore


def r(i, status, code=None, **kw):
    kw.setdefault("image_url", f"https://x/{i}.jpg")
    kw.setdefault("prompt", f"p{i}")
    return ItemResult(
        id=f"i{i}",
        row=i,
        status=status,
        fail_code=code,
        mode="standard-image-to-video",
        duration=6,
        provider="auto",
        **kw,
    )


RESULTS = [
    r(1, "succeeded"),
    r(2, "failed", "GENERATION_FAILED"),
    r(3, "failed", "PROMPT_TOO_LONG"),
    r(4, "skipped", "CONTENT_VIOLATION"),
    r(5, "not_submitted"),
    r(6, "uncertain", "AMBIGUOUS_SUBMIT"),
    r(7, "invalid"),
    ItemResult(id="row-8", row=8, status="failed"),  # no inputs recorded
]


def ids(items):
    return [x.id for x in items]


def test_default_rerun_takes_failed_not_submitted_uncertain_but_not_skipped():
    chosen, left = select_for_rerun(RESULTS)
    assert ids(chosen) == ["i2", "i3", "i5", "i6"]
    assert left == ["row 8 (row-8): no inputs recorded (invalid manifest row)"]


def test_skipped_only_when_named():
    chosen, _ = select_for_rerun(RESULTS, statuses=["skipped"])
    assert ids(chosen) == ["i4"]


def test_filters_by_fail_code_and_id():
    assert ids(select_for_rerun(RESULTS, fail_codes=["GENERATION_FAILED"])[0]) == ["i2"]
    assert ids(select_for_rerun(RESULTS, ids=["i3", "i5", "i1"])[0]) == ["i3", "i5"]


def test_overrides():
    row = rerun_row(RESULTS[1], provider="official", prompt_suffix=", cinematic", duration=10)
    assert row == {
        "id": "i2",
        "image_url": "https://x/2.jpg",
        "prompt": "p2, cinematic",
        "mode": "standard-image-to-video",
        "provider": "official",
        "duration": 10,
    }
    pro = rerun_row(RESULTS[1], mode="pro-image-to-video")
    assert "duration" not in pro and pro["mode"] == "pro-image-to-video"


def test_output_of_results():
    assert output_of_results("s3://b/out/runs/2026-x/results.jsonl") == "s3://b/out"
    assert output_of_results("/data/out/runs/r1/results.jsonl") == "/data/out"
    with pytest.raises(ValueError, match="give the output to rerun into"):
        output_of_results("/data/results.jsonl")
    for nothing in ("", "   "):  # the form's empty field: say what to give, not " is not ..."
        with pytest.raises(ValueError, match=r"^no results file given: give the URL"):
            output_of_results(nothing)


@pytest.fixture
def previous(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.write_text_atomic("runs/r1/results.jsonl", to_jsonl(RESULTS))
    return store


def test_a_previous_runs_results_are_read_back(previous):
    assert read_results(previous.url_for("runs/r1/results.jsonl")) == RESULTS


def test_the_selection_is_written_as_a_manifest_beside_the_runs(previous):
    url = previous.url_for("runs/r1/results.jsonl")
    sel = write_selection(
        previous, url, fail_codes=["GENERATION_FAILED", "PROMPT_TOO_LONG"],
        overrides={"mode": "pro"}, prompt_suffix=" again", dry_run=True,
    )  # fmt: skip
    assert (sel.chosen, sel.total, sel.left_out) == (2, 8, [])
    assert "/reruns/" in sel.manifest_url and sel.manifest_url.endswith("-manifest.jsonl")
    with open(sel.manifest_url, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert [(x["id"], x["mode"], x["prompt"]) for x in rows] == [
        ("i2", "pro", "p2 again"),
        ("i3", "pro", "p3 again"),
    ]
    assert sel.markdown.startswith(f"# dry run of a rerun of `{url}`")
    assert "2 items selected" in sel.markdown


def test_rows_without_inputs_are_left_out_with_a_reason(previous):
    sel = write_selection(previous, previous.url_for("runs/r1/results.jsonl"))
    assert sel.chosen == 3 and sel.left_out[0] == (
        "row 8 (row-8): no inputs recorded (invalid manifest row)"
    )
    assert "not rerun: row 8" in sel.markdown


@pytest.mark.parametrize(
    "code", ["PROMPT_TOO_LONG", "INVALID_PROMPT", "INVALID_IMAGE_URL", "UNSUPPORTED_FORMAT"]
)
def test_a_bad_input_failure_is_not_sent_again_unchanged(tmp_path, code):
    """The contract: bad input is not resubmitted unchanged (it fails again, paid again)."""
    store = OutputStore(str(tmp_path / "out"))
    store.write_text_atomic("runs/r1/results.jsonl", to_jsonl([r(1, "failed", code), RESULTS[1]]))
    url = store.url_for("runs/r1/results.jsonl")
    sel = write_selection(store, url, dry_run=True)
    assert sel.chosen == 1  # only the transient failure
    (why,) = sel.left_out
    assert why.startswith(f"row 1 (i1): bad input ({code})") and f"--fail-code {code}" in why
    for changed in (
        {"prompt_suffix": ", shorter"},
        {"overrides": {"duration": 10}},
        {"overrides": {"mode": "pro-image-to-video"}},
        {"fail_codes": [code, "GENERATION_FAILED"]},  # named: the user changed what it points at
    ):
        assert write_selection(store, url, dry_run=True, **changed).chosen == 2, changed
    same = write_selection(store, url, dry_run=True, overrides={"duration": 6, "mode": None})
    assert same.chosen == 1  # an override equal to the row's own value changes nothing
    moved = write_selection(store, url, dry_run=True, failcode_overrides={code: "transient"})
    assert moved.chosen == 2  # HAILUO_FAILCODE_POLICY moved the code out of bad input


def test_a_results_file_with_a_bom_is_read(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + to_jsonl(RESULTS).encode())
    assert read_results(str(path)) == RESULTS


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_a_results_file_that_is_a_pipe_is_refused_not_read_forever(tmp_path, form):
    fifo = tmp_path / "results.jsonl"
    os.mkfifo(fifo)
    url = str(fifo) if form == "path" else f"file://{fifo}"
    with pytest.raises(ResultsFileError, match="not a regular file"):
        read_results(url)


def test_a_results_file_past_the_size_limit_is_refused_without_reading_it_all(
    tmp_path, monkeypatch
):
    """`rerun /dev/zero` (or a video given by mistake) must not be read until memory runs out."""
    monkeypatch.setattr("hailuo_batch.rerun.MAX_RESULTS_BYTES", 1000)
    path = tmp_path / "results.jsonl"
    path.write_text(to_jsonl(RESULTS) * 50)
    with pytest.raises(ResultsFileError, match="larger than") as err:
        read_results(str(path))
    assert str(err.value).count("results file") == 1  # said once, not wrapped in itself
    if os.path.exists("/dev/zero"):  # a device: refused before a byte is read
        with pytest.raises(ResultsFileError, match="not a regular file"):
            read_results("/dev/zero")


# --- a rerun into another output carries the ledger over (carry_records) --------------------


def _record(item_id: str, state: str, **kw) -> str:
    from hailuo_batch.ledger import LedgerRecord

    return LedgerRecord(id=item_id, input_hash="h" * 64, state=state, **kw).model_dump_json()


def test_a_rerun_into_another_output_carries_each_chosen_items_ledger_record(tmp_path):
    """Without them the other output's ledger knows nothing: an item that may already have been
    paid for was paid for again in silence, and a known taskId was never read again."""
    from hailuo_batch.ledger import Ledger, LedgerState
    from hailuo_batch.rerun import carry_records

    source, dest = OutputStore(str(tmp_path / "a")), OutputStore(str(tmp_path / "b"))
    source.write_text_atomic("ledger/i6.json", _record("i6", "uncertain", attempts=1))
    source.write_text_atomic("ledger/i2.json", _record("i2", "submitted", task_id="t2"))
    source.write_text_atomic("ledger/i5.json", _record("i5", "failed"))
    dest.write_text_atomic("ledger/i5.json", _record("i5", "stored"))  # dest's own history
    chosen = [r(6, "uncertain"), r(2, "failed"), r(5, "failed"), r(8, "failed")]
    carried = carry_records(chosen, dest, source)
    assert [line.split(":")[0] for line in carried] == ["row 6 (i6)", "row 2 (i2)"]
    ledger = Ledger(dest, "rerun")
    assert ledger.get("i6").state == LedgerState.UNCERTAIN
    assert ledger.get("i2").task_id == "t2"
    assert ledger.get("i5").state == LedgerState.STORED  # never overwritten
    assert ledger.get("i8") is None  # the source knew nothing of it either
    assert carry_records(chosen, source, source) == []  # the same output: nothing to carry


def test_a_moved_results_file_still_carries_what_its_rows_say_may_have_been_paid(tmp_path):
    from hailuo_batch.ledger import Ledger, LedgerState
    from hailuo_batch.rerun import carry_records

    dest = OutputStore(str(tmp_path / "b"))
    rows = [
        r(6, "uncertain", input_hash="h" * 64, attempts=2, task_id="t6"),
        r(3, "failed", input_hash="h" * 64, uncertain=True),  # reported by its own run
        r(2, "failed", input_hash="h" * 64),
        r(9, "uncertain"),  # no input hash: nothing to compare a record with
    ]
    carried = carry_records(rows, dest, None)
    assert len(carried) == 1 and "from its results row" in carried[0]
    got = Ledger(dest, "rerun").get("i6")
    assert (got.state, got.attempts, got.task_ids) == (LedgerState.UNCERTAIN, 2, ["t6"])
    assert Ledger(dest, "rerun").get("i3") is None and Ledger(dest, "rerun").get("i2") is None


def test_results_left_outside_the_output_are_put_where_a_run_reads_the_tasks_they_name(
    tmp_path,
):
    """A run whose output refused its writes left its results in ./hailuo-results/{run}/: a
    rerun from there puts them under runs/{run}/ (the tasks its ledger could not record are
    read from them), never over a file already there, nor under a hand-edited run id."""
    dest = OutputStore(str(tmp_path / "out"))
    behind = dict(input_hash="h" * 64, task_id="t1", ledger_behind=True)
    rows = [
        r(1, "failed", run_id="R1", **behind),
        r(2, "succeeded", run_id="R1"),
        r(3, "failed", run_id="R2-part-2", **behind),
        r(4, "failed", run_id="../../ledger", **behind),
        r(5, "failed", run_id="R3", input_hash="h" * 64),  # nothing behind: nothing to put
    ]
    fallback = tmp_path / "hailuo-results" / "R1" / "results.jsonl"
    fallback.parent.mkdir(parents=True)
    fallback.write_text(to_jsonl(rows))
    dest.write_text_atomic("runs/R2/parts/2/results.jsonl", "what the part wrote\n")
    sel = write_selection(dest, str(fallback), dry_run=True)
    assert sel.carried == [] and not dest.exists("runs/R1/results.jsonl")  # a dry run: nothing
    sel = write_selection(dest, str(fallback))
    assert len(sel.carried) == 1 and "results of run R1 put at" in sel.carried[0]
    assert [x.id for x in read_results(dest.url_for("runs/R1/results.jsonl"))] == ["i1", "i2"]
    assert dest.read_text("runs/R2/parts/2/results.jsonl") == "what the part wrote\n"
    assert sorted(dest.list("runs")) == ["runs/R1/results.jsonl", "runs/R2/parts/2/results.jsonl"]
    assert write_selection(dest, str(fallback)).carried == []  # there already


@pytest.mark.parametrize("bad_id", ["../escape", "a/b", "..", "", "x" * 200])
def test_a_hand_edited_id_never_reaches_a_store_path(tmp_path, bad_id):
    from hailuo_batch.rerun import carry_records

    source, dest = OutputStore(str(tmp_path / "a")), OutputStore(str(tmp_path / "b"))
    row = r(1, "uncertain", input_hash="h" * 64).model_copy(update={"id": bad_id})
    assert carry_records([row], dest, source) == []
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").rglob("*.json"))


def test_a_results_file_read_over_http_carries_by_its_rows_not_by_an_output_it_cannot_open():
    """Reading results over http(s) worked before records were carried: the output it sits in
    is no store, so the rerun goes by the rows instead of refusing to start."""
    import asyncio

    from flows.rerun import _output_of
    from hailuo_batch.options import RunOptions

    url = "http://127.0.0.1:9/out/runs/r1/results.jsonl"
    assert asyncio.run(_output_of(url, RunOptions(output="/tmp/elsewhere"))) is None


def test_an_item_a_live_run_still_works_on_in_the_source_is_left_to_it(tmp_path):
    """Its carried `submitting` record would be resubmitted while that run's own POST may
    still succeed: a rerun into the source itself leaves the item alone, and so does this."""
    from hailuo_batch.ledger import Ledger

    source, dest = OutputStore(str(tmp_path / "a")), OutputStore(str(tmp_path / "b"))
    live, dead = Ledger(source, "live-run"), Ledger(source, "dead-run")
    live.heartbeat()
    dead.heartbeat()
    assert live.claim("i6") is None and dead.claim("i2") is None
    lease = json.loads(source.read_text("leases/dead-run.json"))
    source.write_text_atomic("leases/dead-run.json", json.dumps({**lease, "beat": 0}))
    source.write_text_atomic("ledger/i6.json", _record("i6", "submitting"))
    source.write_text_atomic("ledger/i2.json", _record("i2", "submitting"))
    rows = [r(6, "uncertain", input_hash="h" * 64), r(2, "uncertain", input_hash="h" * 64)]
    results = tmp_path / "a" / "runs" / "r0" / "results.jsonl"
    results.parent.mkdir(parents=True)
    results.write_text(to_jsonl(rows))
    sel = write_selection(dest, str(results), source=source)
    assert sel.chosen == 1
    assert any("i6" in w and "live-run" in w for w in sel.left_out), sel.left_out
    assert Ledger(dest, "x").get("i6") is None and Ledger(dest, "x").get("i2") is not None


def test_a_presigned_results_link_is_never_shown_whole(tmp_path) -> None:
    """A rerun of results handed over as a signed link with a password: its run name, its
    artifact and its errors show neither."""
    from hailuo_batch.rerun import (
        ResultsFileError,
        read_results,
        run_id_of_results,
        selection_markdown,
    )

    url = "http://bob:pw-secret-1@127.0.0.1:9/x/results.jsonl?X-Amz-Signature=sig-secret-2"
    shown = [run_id_of_results(url), selection_markdown(url, 1, ["failed"], "m.jsonl", [])]
    with pytest.raises(ResultsFileError) as err:
        read_results(url)
    shown.append(str(err.value))
    assert run_id_of_results(url) == "results.jsonl"
    for text in shown:
        assert "pw-secret-1" not in text and "sig-secret-2" not in text, text


def test_a_rerun_into_another_output_carries_the_record_of_the_rows_own_inputs(tmp_path):
    """The row ran with other inputs since (its record was replaced and kept aside): the
    rerun of the first run's results carries what those first inputs left, a task that
    succeeded and can be fetched without paying, not the other inputs' record."""
    from hailuo_batch.ledger import Ledger, LedgerRecord, LedgerState
    from hailuo_batch.rerun import carry_records

    source, dest = OutputStore(str(tmp_path / "a")), OutputStore(str(tmp_path / "b"))
    mine = LedgerRecord(id="i1", input_hash="a" * 64, state="succeeded", task_id="t-a")
    Ledger(source, "r1").keep(mine)
    other = LedgerRecord(id="i1", input_hash="b" * 64, state="stored", task_id="t-b")
    source.write_text_atomic("ledger/i1.json", other.model_dump_json())
    assert carry_records([r(1, "failed", input_hash="a" * 64)], dest, source)
    got = Ledger(dest, "rerun").get("i1")
    assert (got.state, got.task_id) == (LedgerState.SUCCEEDED, "t-a")
    # a row whose inputs left nothing aside gets the current record, as before
    dest2 = OutputStore(str(tmp_path / "c"))
    assert carry_records([r(1, "failed", input_hash="c" * 64)], dest2, source)
    assert Ledger(dest2, "rerun").get("i1").task_id == "t-b"


def test_an_empty_id_or_fail_code_list_selects_nothing_and_says_so():
    """An API caller whose computed list of ids came out empty must not rerun everything."""
    for given in ({"ids": []}, {"fail_codes": []}):
        chosen, left = select_for_rerun(RESULTS, **given)
        assert chosen == []
        assert any("is an empty list: no item is selected" in why for why in left), left


def test_ids_match_in_any_case_and_unknown_or_unmatched_ones_are_named():
    chosen, left = select_for_rerun(RESULTS, ids=["I2", "i1", "nope"])
    assert ids(chosen) == ["i2"]
    assert "id nope: not in the results file" in left
    assert any(why.startswith("id i1: succeeded, not one of the statuses asked") for why in left)


@pytest.mark.parametrize("text", ["", "\n\n", "\ufeff"])
def test_a_results_file_without_rows_is_refused_not_an_empty_rerun(tmp_path, text):
    path = tmp_path / "results.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ResultsFileError, match="has no rows"):
        read_results(str(path))
