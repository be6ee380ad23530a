"""Pacing as policies: polling that learns the generation time, concurrency that finds the limit.

Pure parts (no clock, no I/O; the time is passed in):

- `GenerationStats`: recent generation times (bounded, recency-weighted), quantiles, a small
  JSON form for `{output}/stats/generation.json`, `merge` of an earlier run's stats.
- `LearnedPollPlan`: when to read a task's status next, from the stats (possibly empty) and the
  provider's guidance (`PollSchedule`).
- `AdaptiveLimit`: the in-flight target under the user's `--concurrency` ceiling: additive
  increase, multiplicative decrease once per congestion epoch, Retry-After honoured.
- `Dispatcher`: who gets a slot next (refused items first, then FIFO), on top of an
  `AdaptiveLimit`.

Asyncio wrappers, free of Prefect: `AdaptiveSlots` (slots for submissions, a refused item waits
for a slot again and is never dropped), `StatsBoard` and `ItemPacer` (status reads re-planned
as soon as the run learns something).

How the poll plan works. Every read can only say "not finished yet", so any policy for one item
is a sequence of read times t1 < t2 < ... . An item that ends at g in (t_k, t_k+1] is noticed
with a lag of t_k+1 - g, which is under `lag_target` x g for every such g exactly when
t_k+1 <= (1 + lag_target) x t_k. The plan therefore reads at a constant ratio
(1 + lag_target) of the elapsed time, and places the first read at (1 + lag_target) x the
`late_fraction` quantile of the observed times: only that share of items ends too early to be
noticed within the lag target. Before anything is observed a few probe items read densely
(from `probe_first_s`, same ratio); the others keep the provider's guidance and are re-planned
(by `ItemPacer`) the moment the first generation time is observed.

Cost of that guarantee: reads per item grow with the spread of the generation times divided by
ln(1 + lag_target). For lognormal times with sigma 0.4, no read schedule, not even one that
knows the distribution, keeps the p95 notice lag under 10 % of the generation time with fewer
than ~7.5 status reads per item on average (the 5 % of items allowed a longer lag all spent
before the first read). The defaults keep a margin: `late_fraction` 3 % (for the noise of
learning and the probing of a cold start) and `lag_target` 9 % (for reads that leave late on a
busy event loop): ~9.5 reads per item once learned at sigma 0.4, ~5 at sigma 0.2.
`hailuo_batch.pacing_sim` measures all this.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import json
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from hailuo_batch.policy import PollSchedule

#: Generation times outside (0, MAX_GENERATION_S] are refused as garbage.
MAX_GENERATION_S = 86_400.0

STATS_FORMAT = 1

_IQR_SIGMAS = 2 * NormalDist().inv_cdf(0.75)  # a normal's interquartile range in sigmas


def _clean_seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_GENERATION_S:
        return None
    return seconds


def generation_seconds(
    create_ms: int | None, complete_ms: int | None, cost_ms: int | None
) -> float | None:
    """A finished task's generation time in seconds, or None when the fields say nothing usable.

    Prefers `completeTime - createTime` (what a poller waits for, queueing included, both on the
    provider's clock) and falls back to `costTime`.
    """
    if create_ms is not None and complete_ms is not None:
        seconds = _clean_seconds((complete_ms - create_ms) / 1000)
        if seconds is not None:
            return seconds
    if cost_ms is not None:
        return _clean_seconds(cost_ms / 1000)
    return None


class GenerationStats:
    """Recent generation times (seconds) with recency-weighted quantiles, in bounded memory.

    At most `window` samples are kept (oldest dropped first). A sample's weight halves every
    `half_life` newer samples, so the distribution follows the provider when its speed changes.
    """

    def __init__(
        self, samples: Iterable[float] = (), *, window: int = 512, half_life: float = 128.0
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        if not half_life > 0:
            raise ValueError("half_life must be positive")
        self.window = window
        self.half_life = half_life
        self._samples: deque[float] = deque(maxlen=window)
        self._version = 0
        self._sorted: tuple[list[float], list[float]] | None = None
        for s in samples:
            self.observe(s)

    @property
    def count(self) -> int:
        """How many samples are held (at most `window`)."""
        return len(self._samples)

    @property
    def version(self) -> int:
        """Increases with every accepted observation (to notice that the stats changed)."""
        return self._version

    @property
    def samples(self) -> list[float]:
        """The samples held, oldest first."""
        return list(self._samples)

    def observe(self, seconds: float) -> bool:
        """Record one generation time; garbage (not a number, <= 0, NaN, > a day) is ignored."""
        clean = _clean_seconds(seconds)
        if clean is None:
            return False
        self._samples.append(clean)
        self._version += 1
        self._sorted = None
        return True

    def _cumulative(self) -> tuple[list[float], list[float]]:
        if self._sorted is None:
            n = len(self._samples)
            weighted = sorted(
                (v, 0.5 ** ((n - 1 - i) / self.half_life)) for i, v in enumerate(self._samples)
            )
            values = [v for v, _ in weighted]
            cumulative: list[float] = []
            total = 0.0
            for _, w in weighted:
                total += w
                cumulative.append(total)
            self._sorted = (values, cumulative)
        return self._sorted

    def quantile(self, q: float) -> float | None:
        """Weighted nearest-rank quantile, q in [0, 1]; None when there are no samples."""
        if not self._samples:
            return None
        values, cumulative = self._cumulative()
        q = min(1.0, max(0.0, q))
        index = bisect.bisect_left(cumulative, q * cumulative[-1] * (1 - 1e-12))
        return values[min(index, len(values) - 1)]

    def summary(self) -> dict[str, Any]:
        """What a run's summary says of the generation time: samples, p5, p50, p95 (seconds)."""
        q = {f"p{int(p * 100)}": self.quantile(p) for p in (0.05, 0.5, 0.95)}
        return {"samples": self.count, **{k: round(v, 1) for k, v in q.items() if v is not None}}

    def to_json(self) -> str:
        """The small stats file: `{"format": 1, "samples": [seconds, ... oldest first]}`."""
        return json.dumps(
            {"format": STATS_FORMAT, "samples": [round(s, 3) for s in self._samples]},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(
        cls, text: str | bytes | None, *, window: int = 512, half_life: float = 128.0
    ) -> GenerationStats:
        """Stats from a stats file's text. Never raises: an unreadable file, another format or
        bad values give fresh (or partial) stats instead."""
        stats = cls(window=window, half_life=half_life)
        if not text:
            return stats
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return stats
        if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
            return stats
        samples = data.get("samples")
        if not isinstance(samples, list):
            return stats
        for s in samples[-window:]:
            stats.observe(s)
        return stats

    @staticmethod
    def merge(older: GenerationStats, newer: GenerationStats) -> GenerationStats:
        """New stats holding `older`'s samples then `newer`'s (newest kept within `newer`'s
        window, so an earlier run's times weigh less and fall out first). Inputs unchanged."""
        return GenerationStats(
            [*older.samples, *newer.samples], window=newer.window, half_life=newer.half_life
        )

    def __repr__(self) -> str:
        return (
            f"GenerationStats(count={self.count}, p50={self.quantile(0.5)}, "
            f"p95={self.quantile(0.95)})"
        )


@dataclass(frozen=True)
class LearnedPollPlan:
    """When to read a task's status next, learned from the generation times observed so far.

    - no observations, probe item: first read at `probe_first_s`, then every read at
      (1 + `lag_target`) x the elapsed time of the previous one;
    - no observations, other items: the provider's guidance (`guidance`, as `PollSchedule`);
    - with observations: first read at (1 + lag_target) x the `late_fraction` quantile, then the
      same constant ratio, so an item that ends after the first read is noticed within
      `lag_target` of its generation time;
    - give up at max(guidance timeout, `giveup_factor` x the `giveup_quantile` quantile), never
      beyond `max_giveup_s`; a last read is placed exactly at the give-up time.

    Times are seconds since the task was submitted (take the clock just before sending the
    request). Pure: the caller passes the stats and the elapsed time.
    """

    guidance: PollSchedule = field(default_factory=PollSchedule)
    lag_target: float = 0.09
    late_fraction: float = 0.03
    prior_spread: float = 0.6
    prior_weight: float = 8.0
    probe_first_s: float = 2.0
    probes: int = 8
    min_interval_s: float = 0.25
    giveup_factor: float = 3.0
    giveup_quantile: float = 0.99
    max_giveup_s: float = 6 * 3600.0

    def __post_init__(self) -> None:
        if not self.lag_target > 0:
            raise ValueError("lag_target must be positive")
        if not 0 <= self.late_fraction < 1:
            raise ValueError("late_fraction must be in [0, 1)")
        if not self.probe_first_s > 0 or not self.min_interval_s > 0:
            raise ValueError("probe_first_s and min_interval_s must be positive")
        if self.probes < 0:
            raise ValueError("probes must be >= 0")

    @classmethod
    def from_schedule(cls, guidance: PollSchedule, **overrides: Any) -> LearnedPollPlan:
        return cls(guidance=guidance, **overrides)

    @property
    def ratio(self) -> float:
        return 1.0 + self.lag_target

    def give_up_s(self, stats: GenerationStats) -> float:
        """Seconds after submission at which a task is given up on."""
        floor = self.guidance.timeout_s
        high = stats.quantile(self.giveup_quantile)
        if high is None:
            return floor
        return max(floor, min(self.max_giveup_s, self.giveup_factor * high))

    def low_quantile_s(self, stats: GenerationStats) -> float | None:
        """The `late_fraction` quantile of the generation time, estimated cautiously.

        The smaller of the empirical quantile and a lognormal extrapolation from the median
        and the interquartile spread; the spread is shrunk towards `prior_spread` while there
        are few samples (a handful of samples says little about a 3 % tail: their minimum
        alone lies above it most of the time). None without observations.
        """
        empirical = stats.quantile(self.late_fraction)
        median = stats.quantile(0.5)
        if empirical is None or median is None:
            return None
        n = stats.count
        spread = self.prior_spread
        if n >= 4:
            q25, q75 = stats.quantile(0.25), stats.quantile(0.75)
            assert q25 is not None and q75 is not None
            observed = math.log(q75 / q25) / _IQR_SIGMAS
            w = self.prior_weight
            spread = math.sqrt((w * spread**2 + n * observed**2) / (w + n))
        z = NormalDist().inv_cdf(max(1e-6, self.late_fraction))
        lognormal = median * math.exp(z * spread)
        return min(empirical, lognormal)

    def first_read_s(self, stats: GenerationStats) -> float | None:
        """The learned first read (None without observations)."""
        low = self.low_quantile_s(stats)
        if low is None:
            return None
        return max(self.min_interval_s, self.ratio * low)

    def for_batch(self, items: int) -> LearnedPollPlan:
        """This plan with its probes fitted to a batch of `items`: a probe costs ~25 reads, so
        a batch gets one per 25 items (at least one, at most `probes`): a 6-item batch pays
        for one probe, not six."""
        return dataclasses.replace(self, probes=min(self.probes, max(1, items // 25)))

    def wants_probe(self, stats: GenerationStats, probes_active: int) -> bool:
        """Whether an item starting to poll now should probe (read densely to learn fast)."""
        return stats.count == 0 and probes_active < self.probes

    def _guidance_at(self, last_read: float, reads: int) -> float:
        g = self.guidance
        if reads <= 0:
            return g.initial_s
        cap = max(g.max_interval_s, g.interval_s)
        try:
            interval = g.interval_s * g.backoff ** min(reads - 1, 1000)
        except OverflowError:
            interval = cap
        return last_read + min(interval, cap)

    def next_read_at(
        self, last_read: float, reads: int, stats: GenerationStats, *, probe: bool = False
    ) -> float | None:
        """Elapsed seconds at which to read next, or None to give up.

        `last_read`: elapsed seconds when the previous read was sent (0 before the first);
        `reads`: how many reads were sent. The answer can be before "now" (the stats changed
        since the last read): read at once then.
        """
        deadline = self.give_up_s(stats)
        if last_read >= deadline:
            return None
        first = self.first_read_s(stats)
        if first is None and not probe:
            at = self._guidance_at(last_read, reads)
        elif reads <= 0:
            at = self.probe_first_s if first is None else first
            at = max(at, last_read) if last_read > 0 else at
        else:
            at = max(last_read * self.ratio, last_read + self.min_interval_s)
            if first is not None:
                at = max(at, first)
        return min(at, deadline)

    def delay(
        self, elapsed: float, reads: int, stats: GenerationStats, *, probe: bool = False
    ) -> float | None:
        """Seconds to wait now (just after a read sent at `elapsed`, or at submission when
        `reads` is 0) before the next read; None to give up."""
        at = self.next_read_at(elapsed, reads, stats, probe=probe)
        return None if at is None else max(0.0, at - elapsed)

    def delays(self, stats: GenerationStats, *, probe: bool = False) -> Iterator[float]:
        """The whole schedule for fixed `stats`, as `PollSchedule.delays()` gives it."""
        elapsed, reads = 0.0, 0
        while (at := self.next_read_at(elapsed, reads, stats, probe=probe)) is not None:
            yield at - elapsed
            elapsed, reads = at, reads + 1


@dataclass
class AdaptiveLimit:
    """The in-flight target under the user's ceiling, found from HTTP 429 alone.

    - Slow start: begin at `initial` (default min(ceiling, 4)) and add one slot per accepted
      submission until the first 429.
    - Multiplicative decrease: a 429 that opens a congestion epoch sets the target to
      `decrease` x min(target, in_flight), in_flight being what the provider holds for us
      (accepted, not yet seen finished). Refusals of submissions started before that decrease
      (the rest of a burst) are the same epoch and do not decrease again. 0.9 rather than
      TCP's 0.5: the provider's limit is a fixed count of tasks, and every slot left empty
      below it is lost throughput.
    - Additive increase: back to the level of the last refusal at one slot per acceptance,
      then one slot per round of acceptances (1/target each) to probe above it.
    - Every 429 stops new submissions until its Retry-After has passed (`min_cooldown_s` when
      it came without one; Retry-After capped at `max_cooldown_s`).
    - Refused items are retried only below the level set by the last decrease
      (`retry_level`): probing above it risks fresh items, so an item is refused at most once
      while the limit holds still.
    - `learned_limit`: what the provider held for us when it last refused (None: never).

    Pure: the caller passes the clock and the in-flight counts.
    """

    ceiling: int
    initial: int | None = None
    decrease: float = 0.9
    min_cooldown_s: float = 1.0
    max_cooldown_s: float = 300.0
    target: float = field(init=False)
    slow_start: bool = field(init=False, default=True)
    retry_level: float = field(init=False)
    cooldown_until: float = field(init=False, default=-math.inf)
    learned_limit: int | None = field(init=False, default=None)
    peak: float = field(init=False, default=math.inf)
    rate_limited: int = field(init=False, default=0)
    congestion_events: int = field(init=False, default=0)
    _tickets: int = field(init=False, default=0)
    _epoch_ticket: int = field(init=False, default=-1)

    def __post_init__(self) -> None:
        if self.ceiling < 1:
            raise ValueError("ceiling must be at least 1")
        if not 0 < self.decrease < 1:
            raise ValueError("decrease must be in (0, 1)")
        start = min(self.ceiling, 4) if self.initial is None else self.initial
        self.target = float(max(1, min(self.ceiling, start)))
        self.retry_level = float(self.ceiling)

    @property
    def slots(self) -> int:
        """How many items may be in flight now (the target, rounded down, at least 1)."""
        return max(1, min(self.ceiling, math.floor(self.target + 1e-9)))

    def wait_s(self, now: float) -> float:
        """Seconds until the current Retry-After cool-down ends (0 when none)."""
        return max(0.0, self.cooldown_until - now)

    def can_start(self, in_flight: int, now: float, *, retry: bool = False) -> bool:
        """Whether one more submission may start with `in_flight` items holding a slot."""
        if now < self.cooldown_until:
            return False
        level = min(self.slots, max(1, math.floor(self.retry_level))) if retry else self.slots
        return in_flight < level

    def started(self) -> int:
        """Record a submission about to be sent; returns its ticket (for `on_rate_limited`)."""
        self._tickets += 1
        return self._tickets

    def on_success(self) -> None:
        """A submission was accepted."""
        if self.slow_start:
            target = self.target + 1.0
        elif self.target < self.peak:  # back quickly to the level of the last refusal
            target = min(self.peak, self.target + 1.0)
        else:  # probe above it: one more slot per round of acceptances
            target = self.target + 1.0 / max(self.target, 1.0)
        self.target = min(float(self.ceiling), target)

    def on_rate_limited(
        self,
        retry_after: float | None,
        now: float,
        *,
        ticket: int | None = None,
        in_flight: int | None = None,
    ) -> bool:
        """A submission was refused with 429. Returns True when this opened a congestion epoch
        (the target was decreased).

        `ticket`: from `started()`; without it a refusal during the cool-down counts as the same
        epoch. `in_flight`: items the provider holds for us, the refused one excluded.
        """
        self.rate_limited += 1
        same_epoch = (
            ticket <= self._epoch_ticket if ticket is not None else now < self.cooldown_until
        )
        wait = self.min_cooldown_s
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            wait = min(self.max_cooldown_s, retry_after)
        self.cooldown_until = max(self.cooldown_until, now + wait)
        if same_epoch:
            return False
        base = self.target if in_flight is None else min(self.target, float(max(in_flight, 1)))
        self.target = max(1.0, self.decrease * base)
        self.retry_level = self.target
        self.slow_start = False
        self._epoch_ticket = self._tickets
        self.congestion_events += 1
        self.peak = base
        if in_flight is not None:
            self.learned_limit = max(1, in_flight)
        return True

    def summary(self) -> dict[str, Any]:
        """For the run summary: the ceiling, the learned limit (None: never rate limited) etc."""
        return {
            "ceiling": self.ceiling,
            "learned_limit": self.learned_limit,
            "target": round(self.target, 2),
            "rate_limited": self.rate_limited,
            "congestion_events": self.congestion_events,
        }


class Dispatcher:
    """Who may submit next: refused items first (in the order refused), then FIFO.

    Pure bookkeeping on top of an `AdaptiveLimit`; keys are whatever the caller uses for items.
    A refused item keeps its place at the head and blocks the others until it may go again.
    """

    def __init__(self, limit: AdaptiveLimit) -> None:
        self.limit = limit
        self._fresh: deque[Hashable] = deque()
        self._retry: deque[Hashable] = deque()
        self._holding: dict[Hashable, int] = {}  # key -> ticket of its current submission
        self._accepted: set[Hashable] = set()

    @property
    def in_flight(self) -> int:
        """Items holding a slot (being submitted, or accepted and not yet finished)."""
        return len(self._holding)

    @property
    def accepted_in_flight(self) -> int:
        return len(self._accepted)

    @property
    def waiting(self) -> int:
        return len(self._fresh) + len(self._retry)

    def request(self, key: Hashable) -> None:
        """`key` wants a slot (queued behind everyone)."""
        if key in self._holding or key in self._fresh or key in self._retry:
            raise ValueError(f"{key!r} already holds or waits for a slot")
        self._fresh.append(key)

    def cancel(self, key: Hashable) -> None:
        """Forget a waiting `key` (a no-op when it is not waiting)."""
        for q in (self._fresh, self._retry):
            with contextlib.suppress(ValueError):
                q.remove(key)

    def admit(self, now: float) -> list[Hashable]:
        """Keys that get a slot now; each holds it until `release` or `rejected`."""
        granted: list[Hashable] = []
        while True:
            queue = self._retry or self._fresh
            if not queue or not self.limit.can_start(
                self.in_flight, now, retry=queue is self._retry
            ):
                return granted
            key = queue.popleft()
            self._holding[key] = self.limit.started()
            granted.append(key)

    def wake_at(self, now: float) -> float | None:
        """When `admit` may grant again without any other event (the cool-down's end)."""
        if self.waiting and self.limit.wait_s(now) > 0:
            return self.limit.cooldown_until
        return None

    def accepted(self, key: Hashable) -> None:
        """`key`'s submission was accepted; it keeps its slot until `release`."""
        if key not in self._holding:
            raise KeyError(key)
        self._accepted.add(key)
        self.limit.on_success()

    def rejected(self, key: Hashable, retry_after: float | None, now: float) -> bool:
        """`key`'s submission was refused with 429: it gives up its slot and waits at the head.
        Returns True when this decreased the target."""
        ticket = self._holding.pop(key)
        self._accepted.discard(key)
        self._retry.append(key)
        return self.limit.on_rate_limited(
            retry_after,
            now,
            ticket=ticket,
            in_flight=self.accepted_in_flight,
        )

    def release(self, key: Hashable) -> None:
        """`key` is finished (or failed, or given up on): its slot is free."""
        self._holding.pop(key, None)
        self._accepted.discard(key)
        self.cancel(key)


Clock = Callable[[], float]


@dataclass
class RefusalWatch:
    """How long every submission of the run has been refused with 429 (one per run, shared by
    its items): since the first 429 while items have waited on 429s without a POST accepted
    in between. A provider that refuses everything for the patience stops the run once, rather
    than each item waiting out its own patience after the other (items retry one at a time at
    the lowest target: N items took N patiences). The watch starts again when a POST is
    accepted, and when no item waits on a 429 any more (the last one that did ended otherwise:
    a 403, the cap), so an old refusal never counts against a later one."""

    since: float | None = None
    waiting: int = 0  # items between a 429 and the end of their submission

    def refused(self, now: float, *, first: bool) -> float:
        """A 429 at `now` (`first`: the item's first since its submission began): seconds
        since the watch's first refusal."""
        self.waiting += first
        if self.since is None:
            self.since = now
        return now - self.since

    def left(self) -> None:
        """An item that met a 429 no longer waits (its submission ended, or was accepted)."""
        self.waiting = max(0, self.waiting - 1)
        if self.waiting == 0:
            self.since = None

    def accepted(self) -> None:
        """A POST was accepted: the provider takes submissions."""
        self.since = None


class AdaptiveSlots:
    """Asyncio slots for submissions, sized by an `AdaptiveLimit` (Prefect-free).

    ```
    async with slots.slot() as slot:     # waits for a slot
        while True:
            try:
                task_id = await submit()
            except RateLimitedError as exc:
                await slot.rate_limited(exc.retry_after)   # waits for a slot again
                continue
            slot.accepted()
            break
        ...poll until finished...          # the slot is held until the block ends
    ```
    """

    def __init__(self, limit: AdaptiveLimit, *, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.dispatcher = Dispatcher(limit)
        self._clock = clock
        self._waiters: dict[Hashable, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._next_key = 0

    @property
    def in_flight(self) -> int:
        return self.dispatcher.in_flight

    def _pump(self) -> None:
        now = self._clock()
        for key in self.dispatcher.admit(now):
            fut = self._waiters.pop(key, None)
            if fut is None or fut.done():
                self.dispatcher.release(key)  # its waiter went away
            else:
                fut.set_result(None)
        wake = self.dispatcher.wake_at(now)
        if wake is not None and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, wake - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    async def _wait(self, key: Hashable) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        self._pump()
        try:
            await fut
        except BaseException:
            self._waiters.pop(key, None)
            if fut.done() and not fut.cancelled():
                self.dispatcher.release(key)  # granted, but we are leaving
            else:
                self.dispatcher.cancel(key)
            self._pump()
            raise

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        """Hold a slot for one item, from its submission until the block ends."""
        key = self._next_key
        self._next_key += 1
        self.dispatcher.request(key)
        await self._wait(key)
        try:
            yield Slot(self, key)
        finally:
            self.dispatcher.release(key)
            self._waiters.pop(key, None)
            self._pump()


class Slot:
    """One item's slot (see `AdaptiveSlots`)."""

    def __init__(self, owner: AdaptiveSlots, key: Hashable) -> None:
        self._owner = owner
        self._key = key

    def accepted(self) -> None:
        """The provider accepted the submission."""
        self._owner.dispatcher.accepted(self._key)
        self._owner._pump()

    async def rate_limited(self, retry_after: float | None) -> None:
        """The provider refused the submission with 429: give the slot up and wait (ahead of
        items not yet refused) until one may be tried again."""
        o = self._owner
        o.dispatcher.rejected(self._key, retry_after, o._clock())
        await o._wait(self._key)


class StatsBoard:
    """A run's `GenerationStats` and poll plan, shared by its pollers (asyncio, Prefect-free).

    `observe` wakes every poller so it re-plans its next read with what was just learned.
    """

    def __init__(
        self, stats: GenerationStats, plan: LearnedPollPlan, *, clock: Clock = time.monotonic
    ) -> None:
        self.stats = stats
        self.plan = plan
        self.clock = clock
        self.probes_active = 0
        self._changed = asyncio.Event()

    def observe(self, seconds: float | None) -> bool:
        """Record a finished task's generation time (None or garbage is ignored).

        The pollers are woken to re-plan at the 1st, 2nd, 4th, 8th, ... observation only: early
        ones change the plan most, and waking every poller on every observation would cost
        O(items x in-flight) re-plans; later observations are used at each poller's next read.
        """
        if seconds is None or not self.stats.observe(seconds):
            return False
        version = self.stats.version
        if version & (version - 1) == 0:  # a power of two
            self._changed.set()
            self._changed = asyncio.Event()
        return True

    async def wait_changed(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a new observation; True when one came."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))
        return event.is_set()

    def pacer(self, *, started: float | None = None, immediate: bool = False) -> ItemPacer:
        """A pacer for one task submitted at `started` (clock time; default: now)."""
        return ItemPacer(
            self, started=self.clock() if started is None else started, immediate=immediate
        )


class ItemPacer:
    """One task's status reads, planned by `LearnedPollPlan` and re-planned on every new
    observation. Use as a context manager (it frees its probe place on exit):

    ```
    with board.pacer(started=t_sent) as pacer:
        while await pacer.next_read():
            status = await read_status()
            if status is final:
                board.observe(generation_seconds(...)); break
        else:
            ...  # given up: board.plan.give_up_s(board.stats) seconds have passed
    ```
    """

    def __init__(self, board: StatsBoard, *, started: float, immediate: bool = False) -> None:
        self.board = board
        self.started = started
        self.reads = 0
        self.last_read = 0.0
        self.immediate = immediate
        self.probe = board.plan.wants_probe(board.stats, board.probes_active)
        if self.probe:
            board.probes_active += 1

    def __enter__(self) -> ItemPacer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.probe:
            self.probe = False
            self.board.probes_active -= 1

    def elapsed(self) -> float:
        return self.board.clock() - self.started

    def next_read_at(self) -> float | None:
        """Elapsed seconds of the next read (None: give up)."""
        b = self.board
        return b.plan.next_read_at(self.last_read, self.reads, b.stats, probe=self.probe)

    async def next_read(self) -> bool:
        """Wait until the next read is due and count it as sent; False when given up."""
        if self.immediate and self.reads == 0:
            self.immediate = False
            self._sent()
            return True
        while True:
            at = self.next_read_at()
            if at is None:
                self.close()
                return False
            wait = at - self.elapsed()
            if wait <= 1e-3:  # timers may fire a hair early
                self._sent()
                return True
            await self.board.wait_changed(wait)

    def _sent(self) -> None:
        self.reads += 1
        self.last_read = self.elapsed()


class RecorderLag:
    """Back-pressure from the orchestrator's record keeping (asyncio, Prefect-free).

    A run counts the task runs it finished (`finished`), and a background job reports how many
    of them the orchestrator has recorded as finished (`recorded`). While the difference passes
    `max_lag`, new items wait (`wait_ready`) and the items in flight go on: a run never gets so
    far ahead of the server that the server's event queue overflows and drops task runs. It
    costs time only when the server is the bottleneck; `waited_s` is the wall time new items
    were held. A count that stops rising while items are held (a server that records nothing,
    or dropped records before) is given up on after `stall_s`: the run goes on and says so.
    """

    def __init__(
        self, max_lag: int, *, stall_s: float = 60.0, clock: Clock = time.monotonic
    ) -> None:
        if max_lag < 1:
            raise ValueError("max_lag must be at least 1")
        self.max_lag = max_lag
        self.stall_s = stall_s
        self.clock = clock
        self.finished = 0
        self.recorded = 0
        self.worst_lag = 0
        self._offset = 0  # records given up on after a stall
        self._held_s = 0.0
        self._closed_at: float | None = None
        self._rose_at = clock()
        self._ready = asyncio.Event()
        self._ready.set()

    @property
    def lag(self) -> int:
        return max(0, self.finished - self.recorded)

    @property
    def waited_s(self) -> float:
        """Wall time new items have been held so far."""
        now = self.clock()
        return self._held_s + (now - self._closed_at if self._closed_at is not None else 0.0)

    def task_finished(self, n: int = 1) -> None:
        """`n` more task runs of this run ended on this side."""
        self.finished += n
        self._update()

    def recorded_now(self, count: int) -> None:
        """The orchestrator reports `count` finished task runs for this run."""
        if count + self._offset > self.recorded:
            self.recorded = count + self._offset
            self._rose_at = self.clock()
        self._update()

    def _update(self) -> None:
        self.worst_lag = max(self.worst_lag, self.lag)
        if self.lag > self.max_lag and self._closed_at is None:
            self._closed_at = self.clock()
            self._ready.clear()
        elif self.lag <= self.max_lag and self._closed_at is not None:
            self._held_s += self.clock() - self._closed_at
            self._closed_at = None
            self._ready.set()

    async def follow(
        self,
        count: Callable[[], Awaitable[int]],
        every_s: float = 2.0,
        warn: Callable[[str], None] = lambda msg: None,
    ) -> None:
        """Every `every_s` seconds, take `count()` (the finished task runs the orchestrator has
        recorded) until cancelled. A count that fails holds nothing (taken as caught up); one
        that has not risen for `stall_s` while items are held is given up on, with a warning."""
        while True:
            await asyncio.sleep(every_s)
            try:
                counted = await count()
            except Exception:  # noqa: BLE001 - an unknown count must never hold the run forever
                self.recorded, self._rose_at = max(self.recorded, self.finished), self.clock()
                self._update()
                continue
            stalled = self.clock() - self._rose_at > self.stall_s
            if self._closed_at is not None and stalled:
                warn(
                    f"the Prefect server recorded no task run of this run for {self.stall_s:.0f} s "
                    f"({self.lag} behind): going on without waiting for it; the results file "
                    "and the ledger stay complete, the server's view of this run may not be"
                )
                self._offset = self.finished - counted
            self.recorded_now(counted)

    async def wait_ready(self) -> None:
        """Return once the orchestrator is within `max_lag` task runs of this run."""
        await self._ready.wait()
