from itertools import islice

import pytest

from hailuo_batch.policy import (
    FAILCODE_TABLE,
    PollSchedule,
    Prices,
    after_failure,
    classify_fail_code,
    estimate_cost,
    percentile,
)


@pytest.mark.parametrize(
    ("code", "klass"),
    [
        ("CONTENT_VIOLATION", "content"),
        ("NSFW", "content"),
        ("InputOutputSensitiveContentDetected", "content"),
        ("ProhibitedContentDetected", "content"),
        ("INVALID_IMAGE_URL", "bad_input"),
        ("PromptLengthExceeded", "bad_input"),
        ("IMAGE_DOWNLOAD_FAILED", "transient"),
        ("GENERATION_FAILED", "transient"),
        ("MODEL_UNAVAILABLE", "transient"),
        ("INSUFFICIENT_CREDITS", "balance"),
        ("SOMETHING_NEW", "unknown"),
        (None, "unknown"),
        ("", "unknown"),
    ],
)
def test_contract_failcode_table(code, klass):
    assert classify_fail_code(code) == klass


def test_both_families_of_names_are_classified():
    # the contract lists 8 content, 6 bad-input, 4 transient and 1 balance code
    counts = {k: list(FAILCODE_TABLE.values()).count(k) for k in set(FAILCODE_TABLE.values())}
    assert counts == {"content": 8, "bad_input": 6, "transient": 4, "balance": 1}


def test_policy_override_moves_a_code():
    assert (
        classify_fail_code("GENERATION_FAILED", {"GENERATION_FAILED": "bad_input"}) == "bad_input"
    )
    assert classify_fail_code("MY_CODE", {"MY_CODE": "transient"}) == "transient"


def test_after_failure_bounds_transient_resubmits():
    assert after_failure("transient", resubmits=0, max_resubmits=2) == "resubmit"
    assert after_failure("transient", resubmits=1, max_resubmits=2) == "resubmit"
    assert after_failure("transient", resubmits=2, max_resubmits=2) == "fail"
    assert after_failure("transient", resubmits=0, max_resubmits=0) == "fail"
    assert after_failure("content", resubmits=0, max_resubmits=5) == "skip"
    assert after_failure("bad_input", resubmits=0, max_resubmits=5) == "fail"
    assert after_failure("unknown", resubmits=0, max_resubmits=5) == "fail"
    assert after_failure("balance", resubmits=0, max_resubmits=5) == "stop_submitting"


def test_default_schedule_follows_provider_guidance():
    delays = list(PollSchedule().delays())
    assert delays[:4] == [60.0, 15.0, 22.5, 30.0]  # first read after 60 s, then x1.5 capped 30
    assert max(delays[1:]) == 30.0
    assert sum(delays) == pytest.approx(600.0)  # gives up after about 10 minutes


def test_schedule_never_passes_deadline_and_reads_at_it():
    s = PollSchedule(initial_s=1, interval_s=0.5, backoff=2, max_interval_s=2, timeout_s=5)
    delays = list(s.delays())
    assert delays[0] == 1
    assert sum(delays) == pytest.approx(5)
    assert all(d <= 2 for d in delays[1:])


def test_schedule_with_initial_past_deadline():
    assert list(PollSchedule(initial_s=100, timeout_s=10).delays()) == [10]


def test_schedule_interval_never_below_configured_when_cap_is_lower():
    s = PollSchedule(initial_s=0, interval_s=5, backoff=1.5, max_interval_s=1, timeout_s=100)
    assert list(islice(s.delays(), 4)) == [0, 5, 5, 5]


def test_cost_standard_by_length_pro_by_task():
    p = Prices(standard_6s=0.19, standard_10s=0.32, pro=0.33)
    assert estimate_cost("standard-image-to-video", 6, p) == 0.19
    assert estimate_cost("standard-image-to-video", 10, p) == 0.32
    assert estimate_cost("pro-image-to-video", None, p) == 0.33


def test_percentile_nearest_rank():
    assert percentile([], 95) is None
    assert percentile([3.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
