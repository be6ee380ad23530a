"""The issue-12 goals, checked on a simulated provider (simulated clock: fast, deterministic).

Figures per case: `python -m hailuo_batch.pacing_sim`. Where a goal of the issue cannot be met by
any policy the test asserts what is achievable and says why:

- "<= 6 status reads per item": with generation times spread like a lognormal of sigma 0.4, even
  a plan that knows the distribution needs ~7.5 reads for a p95 lag under 10 %
  (`test_the_read_goal_and_the_lag_goal_conflict_at_sigma_0_4`). The lag goal is kept; reads are
  held near the floor of the plan's own margin (`known_distribution_reads`). With a spread of
  0.2 both goals hold together, at every median from 10 s to 300 s, once the run has learned
  (`test_at_sigma_0_2_both_goals_hold_once_learned`).
- "makespan within 20 % of sum(generation) / L": with 200 items and L = 25 (8 rounds) even a
  scheduler that knows L and notices every end at once (`oracle_makespan`) is ~14 % above that
  ideal, because the last round drains unevenly. Against that oracle the run stays within 12 %.
"""

import math
import random

import pytest

from hailuo_batch.pacing import GenerationStats, LearnedPollPlan
from hailuo_batch.pacing_sim import (
    SimProvider,
    SimRun,
    case_seed,
    known_distribution_reads,
    oracle_makespan,
    run_twice,
    simulate,
)

MEDIANS = (10, 20, 60, 120, 300)
LIMITS = (8, 25)
CASES = [(m, lim) for lim in LIMITS for m in MEDIANS]
FLOOR = known_distribution_reads(0.4, LearnedPollPlan().lag_target, LearnedPollPlan().late_fraction)


@pytest.fixture(scope="module")
def runs():
    """Every case twice: a cold run (no stats file) and a run that reads the first one's file."""
    return {
        (m, lim): run_twice(SimProvider(median_s=m, limit=lim), SimRun(seed=case_seed(m, lim)))
        for m, lim in CASES
    }


@pytest.mark.parametrize(("median", "limit"), CASES)
def test_goals_at_the_providers_limit(runs, median, limit):
    cold, warm = runs[(median, limit)]
    for run in (cold, warm):
        assert run.dropped == 0
        assert run.max_rejections <= 1  # an item is refused at most once
        assert run.rejections_per_item <= 0.15
        assert run.p95_lag_ratio < 0.10  # p95 notice lag under 10 % of the generation time
        assert run.limit.learned_limit == limit  # found, and recorded for the summary
        assert run.oracle_ratio <= 1.12
        if limit == 8:
            assert run.makespan_ratio <= 1.20
        else:  # see the module docstring: the oracle itself is >= 5 % above sum / L here
            assert run.oracle_s / run.ideal_s >= 1.05
            assert run.makespan_ratio <= 1.30
    assert warm.reads_per_item <= 1.15 * FLOOR
    assert cold.reads_per_item <= 13.5  # probing and caution while nothing is learned yet


@pytest.mark.parametrize(("median", "limit"), CASES)
def test_at_sigma_0_2_both_goals_hold_once_learned(median, limit):
    cold, warm = run_twice(
        SimProvider(median_s=median, limit=limit, sigma=0.2), SimRun(seed=case_seed(median, limit))
    )
    assert warm.reads_per_item <= 6.0  # the read goal, with no setting changed
    assert cold.p95_lag_ratio < 0.10 and warm.p95_lag_ratio < 0.10
    assert cold.dropped == warm.dropped == 0


def test_a_stats_file_from_an_earlier_run_saves_reads(runs):
    cold = sum(runs[c][0].reads_per_item for c in CASES) / len(CASES)
    warm = sum(runs[c][1].reads_per_item for c in CASES) / len(CASES)
    assert warm < cold - 1


def test_the_same_seed_gives_the_same_figures():
    provider = SimProvider(median_s=20, limit=8)
    a = simulate(provider, SimRun(items=60, seed=3))
    b = simulate(provider, SimRun(items=60, seed=3))
    c = simulate(provider, SimRun(items=60, seed=4))
    assert a.figures() == b.figures()
    assert a.reads == b.reads and a.lag_ratios == b.lag_ratios
    assert a.generation_s != c.generation_s


def test_long_retry_after_on_every_refusal_drops_nothing():
    provider = SimProvider(
        median_s=10, limit=8, retry_after_share=1.0, retry_after_choices=(5.0, 30.0)
    )
    run = simulate(provider, SimRun(items=120, seed=11))
    assert run.dropped == 0
    assert run.max_rejections <= 1
    assert run.limit.learned_limit == 8


def test_a_ceiling_below_the_limit_is_never_exceeded_nor_refused():
    run = simulate(SimProvider(median_s=30, limit=25), SimRun(items=80, ceiling=6, seed=5))
    assert run.dropped == 0
    assert sum(run.rejections) == 0
    assert run.limit.learned_limit is None  # never refused: the limit is above what we used
    assert run.limit.slots == 6
    assert run.makespan_s >= oracle_makespan(run.generation_s, 6)


def test_stats_file_garbage_is_a_cold_start():
    provider = SimProvider(median_s=60, limit=8)
    garbage = simulate(provider, SimRun(seed=9), GenerationStats.from_json("{not json"))
    fresh = simulate(provider, SimRun(seed=9))
    assert garbage.figures() == fresh.figures()


def test_the_floor_matches_a_monte_carlo_of_the_same_schedule():
    rng = random.Random(0)
    ratio, late = 1.1, 0.02
    first = ratio * math.exp(0.4 * -2.0537489)  # the 2 % quantile of a median-1 lognormal
    total = 0
    n = 40_000
    for _ in range(n):
        g = rng.lognormvariate(0.0, 0.4)
        t, reads = first, 1
        while t < g:
            t *= ratio
            reads += 1
        total += reads
    assert total / n == pytest.approx(known_distribution_reads(0.4, 0.1, late), rel=0.02)


def test_the_read_goal_and_the_lag_goal_conflict_at_sigma_0_4():
    # Spending the whole 5 % lag budget before the first read is the cheapest a plan can do;
    # at sigma 0.4 it still needs ~7.5 reads per item, at sigma 0.3 under 6.
    assert known_distribution_reads(0.4, 0.10, 0.05) > 7.4
    assert known_distribution_reads(0.3, 0.10, 0.05) < 6.0
