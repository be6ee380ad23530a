import pytest

from hailuo_batch.rerun import output_of_results, rerun_row, select_for_rerun
from hailuo_batch.results import ItemResult


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
