"""A deterministic discrete-event simulation of one batch against a rate-limited provider.

The provider draws lognormal generation times around `median_s` and refuses a submission with
429 (sometimes with Retry-After) while it already runs `limit` of our tasks. The run submits
through a `Dispatcher` over an `AdaptiveLimit` capped at `ceiling` and reads statuses when a
`LearnedPollPlan` says so, re-planning every waiting item when a generation time is observed:
the policies of `hailuo_batch.pacing`, driven as `AdaptiveSlots` and `ItemPacer` drive them.
Simulated clock, no sleeping, no I/O; the same seed gives the same figures.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from statistics import NormalDist

from hailuo_batch.pacing import AdaptiveLimit, Dispatcher, GenerationStats, LearnedPollPlan
from hailuo_batch.policy import percentile


@dataclass(frozen=True)
class SimProvider:
    """The provider: generation times, its hidden concurrency limit, its answers' latency."""

    median_s: float
    limit: int
    sigma: float = 0.4
    retry_after_share: float = 0.5  # share of 429 answers that carry Retry-After
    retry_after_choices: tuple[float, ...] = (1.0, 2.0, 5.0)
    submit_rtt_s: float = 0.2
    read_rtt_s: float = 0.1


@dataclass(frozen=True)
class SimRun:
    """The run: how many items, the user's --concurrency, the policies' settings, the seed."""

    items: int = 200
    ceiling: int = 40
    plan: LearnedPollPlan = field(default_factory=LearnedPollPlan)
    initial_target: int | None = None
    seed: int = 0


@dataclass
class SimResult:
    items: int
    finished: int
    generation_s: list[float]
    reads: list[int]
    rejections: list[int]
    lag_ratios: list[float]  # (notice - end) / generation time, finished items
    lag_by_item: list[float | None]
    created_at: list[float]  # provider time each item's task was created
    makespan_s: float
    ideal_s: float  # sum of generation times / the provider's limit
    oracle_s: float  # FIFO on exactly `limit` slots, every end noticed at once, no refusal
    limit: AdaptiveLimit
    stats: GenerationStats  # the stats after the run (what the stats file would hold)

    @property
    def dropped(self) -> int:
        return self.items - self.finished

    @property
    def reads_per_item(self) -> float:
        return sum(self.reads) / self.items

    @property
    def p95_lag_ratio(self) -> float:
        return percentile(self.lag_ratios, 95) or 0.0

    @property
    def rejections_per_item(self) -> float:
        return sum(self.rejections) / self.items

    @property
    def max_rejections(self) -> int:
        return max(self.rejections, default=0)

    @property
    def makespan_ratio(self) -> float:
        return self.makespan_s / self.ideal_s

    @property
    def oracle_ratio(self) -> float:
        return self.makespan_s / self.oracle_s

    def late_items(self, lag_target: float = 0.10) -> int:
        """Items noticed later than `lag_target` x their generation time after their end."""
        return sum(lag >= lag_target for lag in self.lag_ratios)

    def figures(self) -> dict[str, float | int | None]:
        return {
            "reads_per_item": round(self.reads_per_item, 2),
            "p95_lag_pct": round(100 * self.p95_lag_ratio, 1),
            "late_items": self.late_items(),
            "rejections_per_item": round(self.rejections_per_item, 3),
            "max_rejections": self.max_rejections,
            "makespan_ratio": round(self.makespan_ratio, 3),
            "oracle_ratio": round(self.oracle_ratio, 3),
            "dropped": self.dropped,
            "learned_limit": self.limit.learned_limit,
        }


def known_distribution_reads(sigma: float, lag_target: float, late_fraction: float) -> float:
    """Mean status reads per item of `LearnedPollPlan`'s schedule when the lognormal
    distribution (spread `sigma`) is known exactly: first read at (1 + lag_target) x the
    `late_fraction` quantile, then at a constant ratio. The floor the learned plan aims at."""
    dist = NormalDist(0.0, sigma)
    ratio = 1.0 + lag_target
    t = ratio * math.exp(dist.inv_cdf(late_fraction))
    reads = 1.0  # every item is read at least once
    while (survive := 1.0 - dist.cdf(math.log(t))) > 1e-9:
        reads += survive  # items still running at a read are read again
        t *= ratio
    return reads


def oracle_makespan(generation_s: list[float], limit: int) -> float:
    """The makespan of a scheduler that knows the limit and notices every end at once."""
    slots = [0.0] * max(1, limit)
    for g in generation_s:
        heapq.heappush(slots, heapq.heappop(slots) + g)
    return max(slots)


def simulate(provider: SimProvider, run: SimRun, stats: GenerationStats | None = None) -> SimResult:
    """Run the batch; `stats` are the earlier runs' (they are not modified)."""
    rng = random.Random(run.seed)
    n = run.items
    plan = run.plan
    learned = GenerationStats.merge(stats, GenerationStats()) if stats else GenerationStats()
    gen = [rng.lognormvariate(math.log(provider.median_s), provider.sigma) for _ in range(n)]
    limit = AdaptiveLimit(run.ceiling, initial=run.initial_target)
    dispatcher = Dispatcher(limit)

    heap: list[tuple[float, int, str, int, int]] = []
    seq = 0

    def push(t: float, kind: str, item: int, token: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, item, token))

    sent = [0.0] * n  # client time the accepted submission was sent: elapsed counts from it
    end = [math.inf] * n  # provider time the task ends
    created = [math.inf] * n
    reads = [0] * n
    last_read = [0.0] * n
    probe = [False] * n
    token = [0] * n
    waiting: set[int] = set()  # polling items waiting for their next read
    rejections = [0] * n
    retry_after: dict[int, float | None] = {}
    lags: list[float] = []
    lag_by_item: list[float | None] = [None] * n
    finished = 0
    probes_active = 0
    running = 0  # the provider's count of our tasks
    wakes: set[float] = set()
    makespan = 0.0

    def pump(now: float) -> None:
        for key in dispatcher.admit(now):
            assert isinstance(key, int)
            i = key
            sent[i] = now
            push(now + provider.submit_rtt_s / 2, "arrive", i)
        wake = dispatcher.wake_at(now)
        if wake is not None and wake not in wakes:
            wakes.add(wake)
            push(wake, "wake", -1)

    def stop_probe(i: int) -> None:
        nonlocal probes_active
        if probe[i]:
            probe[i] = False
            probes_active -= 1

    def plan_read(i: int, now: float) -> None:
        at = plan.next_read_at(last_read[i], reads[i], learned, probe=probe[i])
        token[i] += 1
        if at is None:  # given up: the item is lost (the simulation counts it as dropped)
            waiting.discard(i)
            stop_probe(i)
            dispatcher.release(i)
            return
        waiting.add(i)
        push(max(now, sent[i] + at), "read", i, token[i])

    for i in range(n):
        dispatcher.request(i)
    pump(0.0)
    while heap:
        now, _, kind, i, tok = heapq.heappop(heap)
        if kind == "wake":
            wakes.discard(now)
            pump(now)
        elif kind == "arrive":  # the submission reaches the provider
            if running < provider.limit:
                running += 1
                created[i] = now
                end[i] = now + gen[i]
                push(end[i], "end", i)
                push(now + provider.submit_rtt_s / 2, "accepted", i)
            else:
                ra = None
                if rng.random() < provider.retry_after_share:
                    ra = rng.choice(provider.retry_after_choices)
                retry_after[i] = ra
                push(now + provider.submit_rtt_s / 2, "refused", i)
        elif kind == "end":
            running -= 1
        elif kind == "accepted":
            dispatcher.accepted(i)
            probe[i] = plan.wants_probe(learned, probes_active)
            probes_active += probe[i]
            plan_read(i, now)
            pump(now)
        elif kind == "refused":
            rejections[i] += 1
            dispatcher.rejected(i, retry_after.pop(i), now)
            pump(now)
        elif kind == "read":
            if tok != token[i]:
                continue  # re-planned since
            waiting.discard(i)
            reads[i] += 1
            last_read[i] = now - sent[i]
            seen_at = now + provider.read_rtt_s / 2
            push(now + provider.read_rtt_s, "answer", i, 1 if end[i] <= seen_at else 0)
        elif kind == "answer":
            if not tok:
                plan_read(i, now)
                continue
            seen_at = now - provider.read_rtt_s / 2
            lag = (seen_at - end[i]) / gen[i]
            lag_by_item[i] = lag
            lags.append(lag)
            finished += 1
            makespan = now
            stop_probe(i)
            dispatcher.release(i)
            learned.observe(gen[i])
            for j in sorted(waiting):  # every waiting poller re-plans with what was learned
                plan_read(j, now)
            pump(now)

    return SimResult(
        items=n,
        finished=finished,
        generation_s=gen,
        reads=reads,
        rejections=rejections,
        lag_ratios=lags,
        lag_by_item=lag_by_item,
        created_at=created,
        makespan_s=makespan,
        ideal_s=sum(gen) / provider.limit,
        oracle_s=oracle_makespan(gen, provider.limit),
        limit=limit,
        stats=learned,
    )


def run_twice(provider: SimProvider, run: SimRun) -> tuple[SimResult, SimResult]:
    """A cold run (no stats file) and a second run (new seed) reading the first one's file."""
    cold = simulate(provider, run)
    file_text = cold.stats.to_json()
    warm_run = SimRun(
        items=run.items,
        ceiling=run.ceiling,
        plan=run.plan,
        initial_target=run.initial_target,
        seed=run.seed + 1,
    )
    warm = simulate(provider, warm_run, GenerationStats.from_json(file_text))
    return cold, warm


def main() -> None:  # pragma: no cover - a printout for people
    """Print the figures of every case the tests check (`python -m hailuo_batch.pacing_sim`)."""
    plan = LearnedPollPlan()
    print("200 items, ceiling 40. Floor: the reads of this plan (its margins included)")
    print("if it knew the distribution exactly.")
    for sigma in (0.4, 0.2):
        print(
            f"\nsigma {sigma}: reads floor with the distribution known "
            f"{known_distribution_reads(sigma, plan.lag_target, plan.late_fraction):.2f}\n"
        )
        _print_table(sigma)


def _print_table(sigma: float) -> None:  # pragma: no cover - a printout for people
    print(
        "| M s | L | run | reads/item | p95 lag % | late items | 429/item | max 429 |"
        " makespan/ideal | makespan/oracle | oracle/ideal | learned limit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for limit in (8, 25):
        for median in (10, 20, 60, 120, 300):
            runs = run_twice(
                SimProvider(median_s=median, limit=limit, sigma=sigma),
                SimRun(seed=case_seed(median, limit)),
            )
            for name, r in zip(("cold", "warm"), runs, strict=True):
                print(
                    f"| {median} | {limit} | {name} | {r.reads_per_item:.2f} "
                    f"| {100 * r.p95_lag_ratio:.1f} | {r.late_items()} "
                    f"| {r.rejections_per_item:.3f} | {r.max_rejections} "
                    f"| {r.makespan_ratio:.3f} | {r.oracle_ratio:.3f} "
                    f"| {r.oracle_s / r.ideal_s:.3f} | {r.limit.learned_limit} |"
                )


def case_seed(median: float, limit: int) -> int:
    """The fixed seed of one benchmark case."""
    return int(median) * 100 + limit


if __name__ == "__main__":  # pragma: no cover
    main()
