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
    with pytest.raises(ValueError, match="pass the output"):
        output_of_results("/data/results.jsonl")


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
    assert sel.chosen == 4 and sel.left_out == [
        "row 8 (row-8): no inputs recorded (invalid manifest row)"
    ]
    assert "not rerun: row 8" in sel.markdown


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
