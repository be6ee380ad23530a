import asyncio
import itertools
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hailuo_batch.pacing import (
    MAX_GENERATION_S,
    AdaptiveLimit,
    AdaptiveSlots,
    Dispatcher,
    GenerationStats,
    LearnedPollPlan,
    StatsBoard,
    generation_seconds,
)
from hailuo_batch.policy import PollSchedule

# --- generation times -------------------------------------------------------------------------


def test_generation_seconds_prefers_complete_minus_create_then_cost_time():
    assert generation_seconds(1_000_000, 1_121_500, 90_000) == 121.5  # queueing included
    assert generation_seconds(None, 1_121_500, 90_000) == 90.0
    assert generation_seconds(1_000_000, 999_000, 90_000) == 90.0  # clock went backwards
    assert generation_seconds(None, None, None) is None
    assert generation_seconds(None, None, 0) is None
    assert generation_seconds(None, None, -5) is None
    assert generation_seconds(0, int(MAX_GENERATION_S * 1000) + 1, None) is None


# --- GenerationStats --------------------------------------------------------------------------


def test_quantiles_of_observations():
    stats = GenerationStats()
    assert stats.count == 0
    assert stats.quantile(0.5) is None
    for s in range(1, 101):
        assert stats.observe(float(s))
    assert stats.count == 100
    assert stats.quantile(0.0) == 1.0
    assert stats.quantile(1.0) == 100.0
    assert 40 <= stats.quantile(0.5) <= 60  # recency weights shift it a little towards new ones
    assert stats.quantile(-3) == 1.0 and stats.quantile(7) == 100.0  # q is clamped


@pytest.mark.parametrize(
    "garbage", [0, -1.0, math.nan, math.inf, -math.inf, MAX_GENERATION_S + 1, True, "12", None]
)
def test_garbage_observations_are_refused(garbage):
    stats = GenerationStats([5.0])
    version = stats.version
    assert stats.observe(garbage) is False
    assert stats.count == 1 and stats.version == version


def test_memory_is_bounded_and_old_samples_fall_out():
    stats = GenerationStats(window=64)
    for _ in range(1000):
        stats.observe(300.0)
    for _ in range(64):
        stats.observe(10.0)
    assert stats.count == 64
    assert stats.quantile(1.0) == 10.0


def test_recent_observations_weigh_more():
    # 120 old samples at 100 s, then 100 new ones at 10 s: unweighted, the median would be 100
    stats = GenerationStats([100.0] * 120 + [10.0] * 100, half_life=128)
    assert stats.quantile(0.5) == 10.0
    flat = GenerationStats([100.0] * 120 + [10.0] * 100, half_life=1e9)
    assert flat.quantile(0.5) == 100.0


def test_stats_file_round_trip_is_small():
    rng = random.Random(1)
    stats = GenerationStats(rng.lognormvariate(4, 0.4) for _ in range(2000))
    text = stats.to_json()
    again = GenerationStats.from_json(text)
    assert again.count == stats.count == 512
    assert again.samples == pytest.approx(stats.samples, abs=1e-3)
    assert again.quantile(0.5) == pytest.approx(stats.quantile(0.5), abs=1e-3)
    assert len(text) < 8_000
    assert json.loads(text)["format"] == 1


def test_summary_says_how_long_generations_took():
    assert GenerationStats().summary() == {"samples": 0}
    summary = GenerationStats([float(s) for s in range(1, 101)], half_life=1e9).summary()
    assert summary["samples"] == 100
    assert summary["p5"] <= summary["p50"] <= summary["p95"]
    assert summary["p50"] == pytest.approx(50, abs=1)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        b"",
        "not json",
        b"\xff\xfe\x00garbage",
        "[]",
        "null",
        '{"samples": [1, 2]}',  # no format
        '{"format": 2, "samples": [1, 2]}',
        '{"format": 1, "samples": "12"}',
        '{"format": 1, "samples": {"a": 1}}',
        "[" * 100_000,
        '{"format": 1, "samples": [' + "1," * 10 + "]",  # cut file
    ],
)
def test_unreadable_stats_file_gives_fresh_stats(text):
    stats = GenerationStats.from_json(text)
    assert stats.count == 0


def test_bad_values_in_stats_file_are_dropped_good_ones_kept():
    text = '{"format": 1, "samples": [12.5, "x", -1, null, 1e999, true, 0, 40, [3], 1e9]}'
    assert GenerationStats.from_json(text).samples == [12.5, 40.0]


def test_stats_file_longer_than_window_keeps_newest():
    text = json.dumps({"format": 1, "samples": [1.0] * 100 + [2.0] * 10})
    assert GenerationStats.from_json(text, window=10).samples == [2.0] * 10


def test_merge_puts_earlier_runs_first_and_leaves_inputs_alone():
    older = GenerationStats([300.0] * 8)
    newer = GenerationStats([10.0] * 4, window=10)
    merged = GenerationStats.merge(older, newer)
    assert merged.samples == [300.0] * 6 + [10.0] * 4  # newer's window: the oldest fall out
    assert older.count == 8 and newer.count == 4
    assert merged.window == 10


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_from_json_never_raises(text):
    GenerationStats.from_json(text)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.floats(allow_nan=True), st.integers(), st.booleans()), max_size=60),
    st.floats(0, 1),
    st.floats(0, 1),
)
def test_quantiles_are_monotone_and_within_the_clean_samples(values, q1, q2):
    stats = GenerationStats.from_json(json.dumps({"format": 1, "samples": values}))
    clean = [v for v in stats.samples]
    assert all(0 < v <= MAX_GENERATION_S for v in clean)
    if not clean:
        assert stats.quantile(q1) is None
        return
    lo, hi = sorted((q1, q2))
    assert min(clean) <= stats.quantile(lo) <= stats.quantile(hi) <= max(clean)


# --- LearnedPollPlan ----------------------------------------------------------------------------


def lognormal_stats(median: float, sigma: float = 0.4, n: int = 400, seed: int = 0):
    rng = random.Random(seed)
    return GenerationStats(rng.lognormvariate(math.log(median), sigma) for _ in range(n))


def read_times(plan, stats, probe=False):
    t, out = 0.0, []
    for d in plan.delays(stats, probe=probe):
        t += d
        out.append(t)
    return out


def test_without_observations_follows_the_provider_guidance():
    plan = LearnedPollPlan()
    empty = GenerationStats()
    assert list(plan.delays(empty)) == pytest.approx(list(PollSchedule().delays()))
    custom = PollSchedule(initial_s=5, interval_s=2, backoff=2, max_interval_s=3, timeout_s=20)
    assert list(LearnedPollPlan(guidance=custom).delays(empty)) == pytest.approx(
        list(custom.delays())
    )


def test_a_probe_without_observations_reads_densely_at_a_constant_ratio():
    plan = LearnedPollPlan()
    times = read_times(plan, GenerationStats(), probe=True)
    assert times[0] == 2.0
    pairs = list(itertools.pairwise(times[:-1]))  # the last read is at the give-up time
    assert all(b - a >= 0.25 - 1e-9 for a, b in pairs)  # never closer than min_interval_s
    # past the point where the ratio's step is longer than min_interval_s
    ratios = [b / a for a, b in pairs if a * plan.lag_target > 0.25]
    assert len(ratios) > 40
    assert ratios == pytest.approx([plan.ratio] * len(ratios))
    assert times[-1] == 600.0  # the guidance's give-up time, read exactly then


@pytest.mark.parametrize("median", [10, 20, 60, 120, 300])
def test_learned_schedule_notices_every_item_past_the_first_read_within_the_lag(median):
    plan = LearnedPollPlan()
    stats = lognormal_stats(median)
    times = read_times(plan, stats)
    first = plan.first_read_s(stats)
    assert times[0] == pytest.approx(first)
    # the first read sits near the `late_fraction` (3 %) quantile: about that share of items end
    # too early to be noticed within the lag target
    early = sum(s < first / plan.ratio for s in stats.samples) / stats.count
    assert 0.005 <= early <= 0.05
    # every generation time after the first read is noticed within the lag target (9 %)
    for g in [first * (1 + i / 50) for i in range(1, 200)]:
        if g >= times[-1]:
            break
        notice = next(t for t in times if t >= g)
        assert (notice - g) / g < plan.lag_target + 1e-9
    # and the schedule scales with the provider: nothing fixed in seconds
    assert median * 0.3 < first < median * 0.6


def test_give_up_time_scales_with_the_learned_tail_and_is_capped():
    plan = LearnedPollPlan()
    assert plan.give_up_s(GenerationStats()) == 600.0
    assert plan.give_up_s(lognormal_stats(20)) == 600.0  # a fast provider keeps the guidance
    slow = lognormal_stats(300)
    assert plan.give_up_s(slow) == pytest.approx(3 * slow.quantile(0.99))
    assert plan.give_up_s(slow) > 1800
    assert read_times(plan, slow)[-1] == pytest.approx(plan.give_up_s(slow))
    assert plan.give_up_s(GenerationStats([80_000.0])) == 6 * 3600.0


def test_few_observations_put_the_first_read_well_before_them():
    plan = LearnedPollPlan()
    one = GenerationStats([100.0])
    assert plan.first_read_s(one) < 50  # one sample says little about the 2 % tail
    many = lognormal_stats(100, n=500)
    assert plan.first_read_s(one) < plan.first_read_s(many)


def test_first_read_follows_an_early_tail_the_lognormal_fit_misses():
    # a fast route answers 5 % of tasks in 2 s; the rest take ~100 s
    stats = GenerationStats([2.0] * 25 + [100.0] * 475, half_life=1e9)
    plan = LearnedPollPlan()
    assert plan.first_read_s(stats) == pytest.approx(2.0 * plan.ratio)


def test_an_item_waiting_on_guidance_is_read_at_once_when_learning_says_it_is_late():
    plan = LearnedPollPlan()
    stats = lognormal_stats(10)
    # an item that never read (it waited for the guidance's 60 s) when 10 s tasks are learned
    assert plan.next_read_at(0.0, 0, stats) == pytest.approx(plan.first_read_s(stats))
    assert plan.first_read_s(stats) < 6  # not the guidance's 60 s
    # one that read at 30 s continues at the ratio
    assert plan.next_read_at(30.0, 3, stats) == pytest.approx(30.0 * plan.ratio)


def test_probes_only_while_nothing_is_learned():
    plan = LearnedPollPlan(probes=2)
    assert plan.wants_probe(GenerationStats(), 0)
    assert plan.wants_probe(GenerationStats(), 1)
    assert not plan.wants_probe(GenerationStats(), 2)
    assert not plan.wants_probe(GenerationStats([5.0]), 0)


def test_past_the_give_up_time_there_is_no_next_read():
    plan = LearnedPollPlan()
    assert plan.next_read_at(600.0, 12, GenerationStats()) is None
    assert plan.delay(599.0, 12, GenerationStats()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"lag_target": 0},
        {"late_fraction": 1},
        {"late_fraction": -0.1},
        {"probe_first_s": 0},
        {"min_interval_s": 0},
        {"probes": -1},
    ],
)
def test_plan_refuses_bad_settings(bad):
    with pytest.raises(ValueError):
        LearnedPollPlan(**bad)


samples_st = st.lists(st.floats(0.01, 5000), max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    samples_st,
    st.floats(0, 3000),
    st.integers(0, 50),
    st.booleans(),
    st.floats(0, 120),
    st.floats(0.01, 1),
)
def test_delays_are_positive_and_never_pass_the_give_up_time(
    samples, elapsed, reads, probe, initial, lag
):
    plan = LearnedPollPlan(guidance=PollSchedule(initial_s=initial), lag_target=lag)
    stats = GenerationStats(samples)
    give_up = plan.give_up_s(stats)
    delay = plan.delay(elapsed, reads, stats, probe=probe)
    if elapsed >= give_up:
        assert delay is None
    else:
        assert delay is not None
        assert delay >= 0
        assert elapsed + delay <= give_up + 1e-9
        if reads > 0:
            assert delay > 0
    total, count = 0.0, 0
    for d in plan.delays(stats, probe=probe):
        assert d >= 0 and (count == 0 or d > 0)
        total += d
        count += 1
        assert count < 10_000
    assert total == pytest.approx(give_up)


# --- AdaptiveLimit ----------------------------------------------------------------------------


def test_slow_start_up_to_the_ceiling():
    limit = AdaptiveLimit(ceiling=10)
    assert limit.slots == 4
    for _ in range(20):
        limit.on_success()
    assert limit.slots == 10 and limit.target == 10


def test_initial_target_is_clamped():
    assert AdaptiveLimit(ceiling=3).slots == 3
    assert AdaptiveLimit(ceiling=50, initial=80).slots == 50
    assert AdaptiveLimit(ceiling=50, initial=0).slots == 1
    with pytest.raises(ValueError):
        AdaptiveLimit(ceiling=0)
    with pytest.raises(ValueError):
        AdaptiveLimit(ceiling=5, decrease=1.0)


def test_a_burst_of_refusals_decreases_once():
    limit = AdaptiveLimit(ceiling=40, initial=40)
    tickets = [limit.started() for _ in range(40)]
    for _ in range(20):
        limit.on_success()  # 20 accepted (already at the ceiling)
    opened = [limit.on_rate_limited(None, 1.0, ticket=t, in_flight=20) for t in tickets[20:]]
    assert opened == [True] + [False] * 19
    assert limit.target == pytest.approx(18.0)  # 0.9 x the 20 the provider holds
    assert limit.learned_limit == 20
    assert limit.congestion_events == 1 and limit.rate_limited == 20
    # a submission started after the decrease that is refused opens a new epoch
    t = limit.started()
    assert limit.on_rate_limited(None, 5.0, ticket=t, in_flight=16)
    assert limit.target == pytest.approx(0.9 * 16)
    assert limit.learned_limit == 16


def test_without_tickets_refusals_during_the_cool_down_are_one_epoch():
    limit = AdaptiveLimit(ceiling=10, initial=10)
    assert limit.on_rate_limited(2.0, 0.0)
    assert not limit.on_rate_limited(2.0, 1.0)
    assert limit.target == pytest.approx(9.0)
    assert limit.on_rate_limited(None, 3.5)
    assert limit.target == pytest.approx(8.1)


def test_retry_after_is_honoured():
    limit = AdaptiveLimit(ceiling=10, initial=10)
    limit.on_rate_limited(7.5, 100.0, in_flight=5)
    assert not limit.can_start(0, 107.0)
    assert limit.wait_s(101.0) == pytest.approx(6.5)
    assert limit.can_start(0, 107.5)
    assert limit.wait_s(108.0) == 0
    # a later, shorter Retry-After never shortens the cool-down
    limit.on_rate_limited(20.0, 108.0)
    limit.on_rate_limited(1.0, 109.0)
    assert limit.wait_s(109.0) == pytest.approx(19.0)


@pytest.mark.parametrize("retry_after", [None, -3.0, 0.0, math.nan, math.inf])
def test_missing_or_garbage_retry_after_waits_the_minimum(retry_after):
    limit = AdaptiveLimit(ceiling=5, min_cooldown_s=1.5)
    limit.on_rate_limited(retry_after, 10.0)
    assert limit.wait_s(10.0) == pytest.approx(1.5)


def test_huge_retry_after_is_capped():
    limit = AdaptiveLimit(ceiling=5, max_cooldown_s=60)
    limit.on_rate_limited(1e9, 0.0)
    assert limit.wait_s(0.0) == 60


def test_after_a_decrease_it_returns_fast_to_the_refusal_level_then_probes_slowly():
    limit = AdaptiveLimit(ceiling=40, initial=40)
    limit.on_rate_limited(None, 0.0, ticket=limit.started(), in_flight=20)
    assert limit.slots == 18
    limit.on_success()
    limit.on_success()
    assert limit.target == pytest.approx(20.0)  # back to where the provider refused
    for _ in range(19):
        limit.on_success()
    assert limit.slots == 20  # probing: less than one slot for 19 acceptances
    for _ in range(3):
        limit.on_success()
    assert limit.slots == 21


def test_refused_items_retry_only_below_the_level_after_the_decrease():
    limit = AdaptiveLimit(ceiling=40, initial=40)
    limit.on_rate_limited(None, 0.0, ticket=limit.started(), in_flight=20)
    for _ in range(30):
        limit.on_success()
    assert limit.slots > 20
    assert limit.can_start(19, 10.0)
    assert limit.can_start(17, 10.0, retry=True)
    assert not limit.can_start(18, 10.0, retry=True)


def test_summary_for_the_run_report():
    limit = AdaptiveLimit(ceiling=40)
    assert limit.summary()["learned_limit"] is None  # never refused: the limit is >= what we used
    limit.on_rate_limited(None, 0.0, ticket=limit.started(), in_flight=25)
    assert limit.summary() == {
        "ceiling": 40,
        "learned_limit": 25,
        "target": 3.6,
        "rate_limited": 1,
        "congestion_events": 1,
    }


event_st = st.one_of(
    st.just(("ok", None, 0)),
    st.tuples(
        st.just("429"),
        st.one_of(st.none(), st.floats(allow_nan=True), st.floats(0, 30)),
        st.integers(0, 200),
    ),
    st.tuples(st.just("tick"), st.none(), st.integers(0, 100)),
)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 100), st.lists(event_st, max_size=150))
def test_target_stays_between_one_and_the_ceiling(ceiling, events):
    limit = AdaptiveLimit(ceiling=ceiling)
    now = 0.0
    for kind, retry_after, n in events:
        if kind == "ok":
            limit.on_success()
        elif kind == "429":
            limit.on_rate_limited(retry_after, now, ticket=limit.started(), in_flight=n)
        else:
            now += n / 10
        assert 1 <= limit.target <= ceiling
        assert 1 <= limit.slots <= ceiling
        assert limit.wait_s(now) >= 0


# --- Dispatcher -------------------------------------------------------------------------------


def test_dispatcher_grants_fifo_and_puts_refused_items_first():
    d = Dispatcher(AdaptiveLimit(ceiling=3, initial=3, min_cooldown_s=1.0))
    for key in "abcde":
        d.request(key)
    assert d.admit(0.0) == ["a", "b", "c"]
    assert d.admit(0.0) == []
    d.accepted("a")
    d.accepted("b")
    assert d.rejected("c", None, 0.0)  # the provider holds 2: target 0.9 x 2, one slot
    assert d.in_flight == 2 and d.waiting == 3
    assert d.admit(0.5) == []  # cooling down
    assert d.wake_at(0.5) == 1.0
    d.release("a")
    assert d.admit(1.0) == []  # one in flight, one slot
    d.release("b")
    assert d.admit(1.0) == ["c"]  # the refused item goes first
    d.accepted("c")  # back towards the level of the refusal: two slots
    assert d.admit(1.0) == ["d"]
    with pytest.raises(ValueError):
        d.request("d")


def test_a_waiting_refused_item_blocks_fresh_ones():
    d = Dispatcher(AdaptiveLimit(ceiling=10, initial=10, min_cooldown_s=0.0))
    for key in range(12):
        d.request(key)
    granted = d.admit(0.0)
    assert granted == list(range(10))
    for key in range(6):
        d.accepted(key)
    d.rejected(6, None, 0.0)  # provider holds 6: target 5.4, retry level 5
    d.release(7)
    d.release(8)
    d.release(9)
    assert d.in_flight == 6
    assert d.admit(0.1) == []  # item 6 waits for in_flight < 5; 10 and 11 wait behind it
    d.release(0)
    d.release(1)
    assert d.admit(0.2) == [6]


def test_cancel_and_release_forget_a_key():
    d = Dispatcher(AdaptiveLimit(ceiling=1))
    d.request("a")
    d.request("b")
    d.cancel("b")
    assert d.admit(0.0) == ["a"]
    d.release("a")
    assert d.in_flight == 0 and d.waiting == 0
    d.release("a")  # twice is harmless


# --- asyncio wrappers ---------------------------------------------------------------------------


class FakeProvider:
    """Accepts at most `limit` tasks at once; a task takes `duration` seconds."""

    def __init__(self, limit: int, duration: float, retry_after: float | None = None):
        self.limit = limit
        self.duration = duration
        self.retry_after = retry_after
        self.running = 0
        self.peak = 0
        self.refusals: dict[int, int] = {}

    async def run_item(self, slots: AdaptiveSlots, item: int) -> str:
        async with slots.slot() as slot:
            while True:
                if self.running >= self.limit:
                    self.refusals[item] = self.refusals.get(item, 0) + 1
                    await slot.rate_limited(self.retry_after)
                    continue
                self.running += 1
                self.peak = max(self.peak, self.running)
                slot.accepted()
                break
            await asyncio.sleep(self.duration)
            self.running -= 1
        return "done"


def test_adaptive_slots_find_the_limit_and_drop_nothing():
    async def main():
        provider = FakeProvider(limit=3, duration=0.01)
        slots = AdaptiveSlots(AdaptiveLimit(ceiling=10, min_cooldown_s=0.001))
        results = await asyncio.gather(*(provider.run_item(slots, i) for i in range(30)))
        return provider, slots, results

    provider, slots, results = asyncio.run(main())
    assert results == ["done"] * 30
    assert provider.peak == 3
    assert slots.limit.learned_limit == 3
    assert provider.refusals  # it did have to find the limit
    assert max(provider.refusals.values()) == 1
    assert slots.in_flight == 0


def test_adaptive_slots_honour_retry_after_before_granting_anything():
    now = [0.0]

    async def main():
        slots = AdaptiveSlots(AdaptiveLimit(ceiling=3, initial=3), clock=lambda: now[0])
        got: list[str] = []
        release = {name: asyncio.Event() for name in "abc"}

        async def hold(name: str, refuse: bool):
            async with slots.slot() as slot:
                if refuse:
                    await slot.rate_limited(0.01)  # Retry-After: 0.01 on the fake clock
                got.append(name)
                slot.accepted()
                await release[name].wait()

        async def spin():
            for _ in range(20):
                await asyncio.sleep(0)

        b = asyncio.create_task(hold("b", False))
        await spin()
        a = asyncio.create_task(hold("a", True))  # refused while the provider holds b
        await spin()
        c = asyncio.create_task(hold("c", False))
        release["b"].set()  # a slot frees up, but the cool-down has not passed
        await spin()
        during_cooldown = list(got)
        now[0] = 0.02  # it has now: the timer's pump grants again
        for _ in range(200):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.005)
        after_cooldown = list(got)[:2]  # c may follow at once when the limit allows two
        release["a"].set()
        release["c"].set()
        await asyncio.gather(a, b, c)
        return during_cooldown, after_cooldown, got

    during, after, got = asyncio.run(main())
    assert during == ["b"]
    assert after == ["b", "a"]  # the refused item first, not the fresh one
    assert got == ["b", "a", "c"]


def test_a_cancelled_waiter_gives_its_place_away():
    async def main():
        slots = AdaptiveSlots(AdaptiveLimit(ceiling=1))
        release = asyncio.Event()

        async def hold():
            async with slots.slot():
                await release.wait()

        first = asyncio.create_task(hold())
        await asyncio.sleep(0)
        second = asyncio.create_task(hold())
        third = asyncio.create_task(hold())
        await asyncio.sleep(0)
        second.cancel()
        release.set()
        await asyncio.gather(first, third)
        with pytest.raises(asyncio.CancelledError):
            await second
        return slots.in_flight, slots.dispatcher.waiting

    assert asyncio.run(main()) == (0, 0)


def test_pacer_replans_as_soon_as_a_generation_time_is_learned():
    async def main():
        board = StatsBoard(GenerationStats(), LearnedPollPlan(probes=0))
        pacer = board.pacer()
        assert not pacer.probe
        assert pacer.next_read_at() == 60.0  # the guidance, as nothing is learned
        read = asyncio.create_task(pacer.next_read())
        await asyncio.sleep(0.01)
        assert not read.done()
        assert board.observe(0.005)  # tasks take 5 ms: this one is late already
        assert await asyncio.wait_for(read, timeout=30)
        return pacer.reads

    assert asyncio.run(main()) == 1


def test_pacer_probes_then_gives_up_at_the_deadline():
    async def main():
        plan = LearnedPollPlan(
            guidance=PollSchedule(timeout_s=0.05),
            probes=1,
            probe_first_s=0.005,
            min_interval_s=0.001,
        )
        board = StatsBoard(GenerationStats(), plan)
        with board.pacer() as first, board.pacer() as second:
            assert first.probe and not second.probe
            assert board.probes_active == 1
            while await first.next_read():
                pass
            assert not first.probe and board.probes_active == 0  # given up: place freed
            return first.reads, first.elapsed()

    reads, elapsed = asyncio.run(main())
    assert reads >= 3  # dense reads from 5 ms, and one at the deadline
    assert elapsed >= 0.05


def test_pacer_reads_a_resumed_task_at_once():
    async def main():
        board = StatsBoard(lognormal_stats(100), LearnedPollPlan())
        with board.pacer(immediate=True) as pacer:
            assert await asyncio.wait_for(pacer.next_read(), timeout=30)
            return pacer.reads, pacer.next_read_at()

    reads, next_at = asyncio.run(main())
    assert reads == 1
    assert next_at > 30  # then it waits for the learned first read


def test_board_ignores_garbage_observations():
    async def main():
        board = StatsBoard(GenerationStats(), LearnedPollPlan())
        return board.observe(None), board.observe(-1.0), board.observe(12.0), board.stats.count

    assert asyncio.run(main()) == (False, False, True, 1)


# --- RecorderLag: back-pressure from the orchestrator ----------------------------------------


def test_recorder_lag_holds_new_items_while_the_server_is_behind_and_counts_the_wait() -> None:
    from hailuo_batch.pacing import RecorderLag

    async def scenario() -> tuple[list[str], RecorderLag]:
        now = [0.0]
        lag = RecorderLag(max_lag=3, clock=lambda: now[0])
        order: list[str] = []
        await lag.wait_ready()  # nothing finished: ready at once
        lag.task_finished(4)  # 4 ended here, none recorded: too far ahead

        async def item() -> None:
            await lag.wait_ready()
            order.append("item started")

        waiting = asyncio.ensure_future(item())
        await asyncio.sleep(0)
        order.append("server catching up")
        now[0] = 2.5
        lag.recorded_now(1)  # lag 3: within bounds again
        await waiting
        lag.recorded_now(0)  # an older count never moves `recorded` back
        return order, lag

    order, lag = asyncio.run(scenario())
    assert order == ["server catching up", "item started"]
    assert (lag.lag, lag.worst_lag, lag.recorded, lag.waited_s) == (3, 4, 1, 2.5)


@given(events=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=60))
def test_recorder_lag_property_ready_exactly_when_within_bounds(
    events: list[tuple[bool, int]],
) -> None:
    from hailuo_batch.pacing import RecorderLag

    lag = RecorderLag(max_lag=4)
    recorded = 0
    for finished, n in events:
        if finished:
            lag.task_finished(n)
        else:
            recorded = min(lag.finished, recorded + n)
            lag.recorded_now(recorded)
        assert lag._ready.is_set() == (lag.lag <= 4)
        assert lag.worst_lag >= lag.lag >= 0


def test_recorder_lag_follows_the_count_and_never_holds_on_a_failed_count() -> None:
    from hailuo_batch.pacing import RecorderLag

    answers: list[int | Exception] = [2, RuntimeError("503"), 5]

    async def count() -> int:
        answer = answers.pop(0) if answers else 5
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def scenario() -> list[int]:
        lag = RecorderLag(max_lag=10)
        lag.task_finished(40)
        seen = []
        job = asyncio.ensure_future(lag.follow(count, every_s=0.001))
        for _ in range(3):
            await asyncio.sleep(0.01)
            seen.append(lag.recorded)
        job.cancel()
        return seen

    seen = asyncio.run(scenario())
    assert seen[-1] == 40  # the failed count released the run (taken as caught up)


def test_recorder_lag_gives_up_on_a_count_that_stops_rising_and_says_so() -> None:
    """A server that records nothing (services off, records dropped before) must not hold the
    run forever: after `stall_s` without a rise while items are held, the run goes on."""
    from hailuo_batch.pacing import RecorderLag

    warned: list[str] = []

    async def count() -> int:
        return 3  # stuck

    async def scenario() -> tuple[bool, float]:
        lag = RecorderLag(max_lag=10, stall_s=0.05)
        lag.task_finished(30)
        job = asyncio.ensure_future(lag.follow(count, every_s=0.01, warn=warned.append))
        await asyncio.wait_for(lag.wait_ready(), 2.0)  # released, not held forever
        held = lag.waited_s
        lag.task_finished(5)  # later records count again from where it gave up
        await asyncio.sleep(0.03)
        job.cancel()
        return lag._ready.is_set(), held

    ready, held = asyncio.run(scenario())
    assert ready and 0.04 < held < 1.0
    assert warned and "recorded no task run" in warned[0]


@pytest.mark.parametrize(
    ("items", "probes"), [(0, 1), (1, 1), (6, 1), (49, 1), (50, 2), (100, 4), (200, 8), (10_000, 8)]
)
def test_a_batch_gets_the_probes_it_can_afford(items: int, probes: int) -> None:
    """A probe costs ~25 status reads: one per 25 items, at least one, at most the plan's."""
    assert LearnedPollPlan().for_batch(items).probes == probes
    assert LearnedPollPlan(probes=0).for_batch(items).probes == 0  # probing off stays off
    assert LearnedPollPlan(probes=3).for_batch(10_000).probes == 3
