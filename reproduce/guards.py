"""The guard gains that `reproduce diff --remeasure` (CI) times again, and the rule that judges them.

A table spec's `guards:` names the throughput gains (or ratios) whose claim must not regress
unseen. docs/benchmarking.md ("Guard gains") gives the figures behind the numbers below.

Measurement (`time_pairs`): the two models of a gain are built once, warmed up, and timed in one
process, alternating pair by pair (a b, b a, a b, ...: the order flips every pair, so that a drift
within a pair favours neither) on one input each, `PAIRS` pairs after `WARMUP_PAIRS` untimed ones.
Each timing is the model's *own* time (`own_sample`): the wall time of its passes minus the time the
thread spent waiting on the CPU's run queue while other processes ran (Linux schedstat). A loaded
machine's time-slicing is gone; the model's own work, and any sleep in it, stays. Each pair gives a
ratio a/b.

Rule (`judge`): m is the median of the pair ratios and [lo, hi] its 95 % percentile-bootstrap
interval (`RESAMPLES` resamples with a fixed seed, so the same timings always give the same
verdict). With c the committed ratio (a gain of g % is the ratio 1 + g/100) and t = `TOLERANCE`,
the guard fails when hi < c·(1 − t) (the claim got slower) or lo > c·(1 + t) (its baseline got
slower, or the claim moved up unexplained). Noise must not hide a regression behind a wide
interval, so pairs are timed in steps of `STEP_PAIRS` from `MIN_PAIRS` until the interval's
half-width is at most `PRECISION` of m (then a 10 % slower model, m ≈ 0.91 c, has hi < 0.95 c), and
at most `MAX_PAIRS`: an interval still wider then fails as inconclusive (the machine is too loaded
to tell), never passes. Otherwise the guard holds.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, replace

import pandas as pd

from reproduce import measure, report
from reproduce.runner import MeasurementCache, TableRun

MIN_PAIRS = 20      # timed pairs per guard at first: ~20 s a guard on an idle 2-core VM
STEP_PAIRS = 10     # more pairs at a time while the interval is wider than PRECISION
MAX_PAIRS = 100     # then inconclusive (docs/benchmarking.md has the figures)
PRECISION = 0.03    # the interval's half-width, relative to the median, that decides
WARMUP_PAIRS = 2    # untimed pairs first (caches, allocator), beyond each Timer's own warm-up
TOLERANCE = 0.05    # relative to the committed ratio; a 10 % slower model moves it by 9.1 %
CONFIDENCE = 0.95
RESAMPLES = 2000


def run_queue_wait() -> float:
    """Seconds the calling thread has spent runnable but waiting for a CPU (the second field of
    Linux's /proc/thread-self/schedstat), 0.0 where the kernel does not say. With one intra-op
    thread the forward pass runs on the calling thread, so this is the time others took from it."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def own_sample(timer: measure.Timer) -> float:
    """One timing of `timer`'s protocol passes (images/s) by the model's own time: wall time less
    the run-queue wait (`run_queue_wait`)."""
    with measure.intra_op_threads(timer.protocol.threads):
        waited, start = run_queue_wait(), time.perf_counter()
        for _ in range(timer.protocol.runs):
            timer._pass()
        elapsed = time.perf_counter() - start - (run_queue_wait() - waited)
    return timer.batch_size * timer.protocol.runs / elapsed


def time_pairs(a: measure.Timer, b: measure.Timer, pairs: int, warmup_pairs: int = WARMUP_PAIRS,
               samples: tuple[list, list] | None = None) -> tuple[list[float], list[float]]:
    """`pairs` more timings of each of two timers, alternating a b, b a, ... (see the module
    docstring), appended to `samples` if given; index i of both lists is pair i."""
    for _ in range(warmup_pairs):
        own_sample(a), own_sample(b)
    samples_a, samples_b = samples or ([], [])
    for i in range(len(samples_a), len(samples_a) + pairs):
        if i % 2:
            samples_b.append(own_sample(b))
            samples_a.append(own_sample(a))
        else:
            samples_a.append(own_sample(a))
            samples_b.append(own_sample(b))
    return samples_a, samples_b


def median_interval(ratios: list[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                    seed: int = 0) -> tuple[float, float]:
    """The percentile-bootstrap interval of the median of `ratios` (deterministic: a fixed seed)."""
    rng = random.Random(seed)
    n = len(ratios)
    medians = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]


def to_ratio(kind: str, value: float) -> float:
    """A gain (%) or ratio cell's value as a ratio of throughputs."""
    return 1 + value / 100 if kind == "gain" else value


def from_ratio(kind: str, ratio: float) -> float:
    return 100 * (ratio - 1) if kind == "gain" else ratio


@dataclass(frozen=True)
class Verdict:
    """One guard judged: the committed ratio against the median of fresh pair ratios."""
    name: str                  # row/column
    kind: str                  # gain or ratio (how the numbers are shown)
    committed: float           # ratio
    median: float              # ratio
    low: float                 # bootstrap interval of the median (ratio)
    high: float
    pairs: int
    tolerance: float = TOLERANCE
    precision: float = PRECISION

    @property
    def precise(self) -> bool:
        return (self.high - self.low) / 2 <= self.precision * self.median

    @property
    def floor(self) -> float:
        return self.committed * (1 - self.tolerance)

    @property
    def ceiling(self) -> float:
        return self.committed * (1 + self.tolerance)

    @property
    def slower(self) -> bool:
        return self.high < self.floor

    @property
    def faster(self) -> bool:
        return self.low > self.ceiling

    @property
    def holds(self) -> bool:
        return self.precise and not (self.slower or self.faster)

    def _show(self, ratio: float) -> str:
        value = from_ratio(self.kind, ratio)
        return f"{value:+.1f} %" if self.kind == "gain" else f"{value:.3f}"

    def line(self) -> str:
        measured = (f"median of {self.pairs} paired ratios {self._show(self.median)} (95 % interval "
                    f"{self._show(self.low)} to {self._show(self.high)})")
        band = f"{self._show(self.floor)} to {self._show(self.ceiling)}"
        if self.slower:
            return (f"{self.name}: guard failed: {measured} lies below the committed {self._show(self.committed)} "
                    f"less {self.tolerance:.0%} ({band}): the gain's model got slower, or its baseline faster")
        if self.faster:
            return (f"{self.name}: guard failed: {measured} lies above the committed {self._show(self.committed)} "
                    f"plus {self.tolerance:.0%} ({band}): the gain's baseline got slower, or its model faster")
        if not self.precise:
            return (f"{self.name}: guard inconclusive: {measured} is wider than ±{self.precision:.0%} of its median: "
                    "this machine is too loaded to tell a 10 % regression; time it again on a quieter one")
        return f"{self.name}: guard holds: {measured} reaches the committed {self._show(self.committed)} ± " \
               f"{self.tolerance:.0%} ({band})"


def judge(name: str, kind: str, ratios: list[float], committed: float, tolerance: float = TOLERANCE) -> Verdict:
    """The rule of the module docstring; `committed` is a ratio (`to_ratio`)."""
    low, high = median_interval(ratios)
    return Verdict(name, kind, committed, statistics.median(ratios), low, high, len(ratios), tolerance)


def judged_pairs(a: measure.Timer, b: measure.Timer, name: str, kind: str, committed: float | None,
                 min_pairs: int = MIN_PAIRS, max_pairs: int = MAX_PAIRS) -> tuple[tuple, Verdict | None]:
    """Time `a` against `b` in steps until the interval is precise (or `max_pairs`): (samples, verdict);
    with no committed ratio, `min_pairs` pairs timed until precise, and no verdict."""
    samples, verdict = time_pairs(a, b, min_pairs), None
    while True:
        ratios = [x / y for x, y in zip(*samples)]
        verdict = judge(name, kind, ratios, statistics.median(ratios) if committed is None else committed)
        if verdict.precise or len(ratios) >= max_pairs:  # judged once precise, not at each look
            return samples, (None if committed is None else verdict)
        samples = time_pairs(a, b, min(STEP_PAIRS, max_pairs - len(ratios)), warmup_pairs=0, samples=samples)


def remeasure(spec, device: str, results: pd.DataFrame, min_pairs: int = MIN_PAIRS,
              max_pairs: int = MAX_PAIRS) -> tuple[pd.DataFrame, list, dict]:
    """Time every guard of `spec` again (uncached) and judge it against its cell in `results`:
    (the fresh guard cells, the verdicts, the run's metadata). A guard whose committed cell is not
    measured, or whose models do not build, gets no verdict; its fresh cell says why."""
    run = TableRun(spec, device, kinds={"throughput"}, cache=MeasurementCache(enabled=False), show_progress=False,
                   only=set(spec.guards))
    recorded = {(r.row, r.column): r for r in results.itertuples()}
    verdicts = []
    for row_id, column_id in spec.guards:
        row, column = spec.rows[row_id], spec.columns[column_id]
        operands = run._operands(row, column)
        if operands is None:
            continue
        targets = [run.target(spec.rows[r], spec.columns[c]) for r, c in operands]
        timers = []
        for t in targets:
            timer = run._measure_or_fail(
                t, lambda t=t: measure.Timer(t.build(), t.img_size, run._protocol(t.img_size), run.device))
            timers.append(timer)
        if None in timers:
            continue
        committed = report.parse_number(getattr(recorded.get((row_id, column_id)), "measured", ""))
        samples, verdict = judged_pairs(*timers, f"{row_id}/{column_id}", column.kind,
                                        to_ratio(column.kind, committed[0]) if committed else None,
                                        min_pairs, max_pairs)
        verdicts += [verdict] if verdict else []
        session = f"guard {row_id}/{column_id}"
        for (r, c), t, timer, timed in zip(operands, targets, timers, samples):
            run.record_throughput(r, c, {**measure.summarize(timed), "batch_size": timer.batch_size,
                                         "notes": timer.notes, "session": session})
            run.protocols_used[t.img_size] = replace(run._protocol(t.img_size), repeats=len(timed))
    cells = [run.cell(ref) for ref in spec.reference.itertuples() if (ref.row, ref.column) in set(spec.guards)]
    return report.cells_frame([c for c in cells if c is not None]), verdicts, run.meta()
