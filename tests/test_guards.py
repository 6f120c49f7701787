"""The guard rule of reproduce/guards.py on synthetic timings (fast, deterministic): a clean
measurement holds, a 10 % slower model or baseline fails, a measurement too noisy to tell fails as
inconclusive instead of passing, and the pairs alternate a b, b a."""
import random

import pytest

from reproduce import guards

COMMITTED = 1.15  # a +15 % gain


def ratios(true_ratio: float, spread: float, n: int, seed: int = 1) -> list[float]:
    """n pair ratios around `true_ratio` with a relative spread like this VM's (lognormal-ish)."""
    rng = random.Random(seed)
    return [true_ratio * (1 + rng.gauss(0, spread)) for _ in range(n)]


def test_the_interval_is_deterministic_and_holds_the_median():
    data = ratios(COMMITTED, 0.04, 30)
    assert guards.median_interval(data) == guards.median_interval(data)
    low, high = guards.median_interval(data)
    assert low <= sorted(data)[15] <= high and high - low < 0.1


@pytest.mark.parametrize("seed", range(5))
def test_a_clean_measurement_holds(seed):
    verdict = guards.judge("r/gain", "gain", ratios(COMMITTED, 0.04, 30, seed), COMMITTED)
    assert verdict.holds and "guard holds" in verdict.line()


@pytest.mark.parametrize("seed", range(5))
def test_a_ten_percent_slower_model_fails(seed):
    verdict = guards.judge("r/gain", "gain", ratios(COMMITTED / 1.1, 0.04, 30, seed), COMMITTED)
    assert verdict.slower and not verdict.holds
    assert "guard failed" in verdict.line() and "below the committed +15.0 %" in verdict.line()


def test_a_ten_percent_slower_baseline_fails_too():
    verdict = guards.judge("r/gain", "gain", ratios(COMMITTED * 1.1, 0.04, 30), COMMITTED)
    assert verdict.faster and not verdict.holds and "above the committed" in verdict.line()


def test_noise_cannot_hide_a_regression_it_is_inconclusive():
    """Ranges that merely overlap let a regression through (issue 19); a wide interval fails."""
    verdict = guards.judge("r/gain", "gain", ratios(COMMITTED / 1.1, 0.3, 8), COMMITTED)
    assert not verdict.slower and not verdict.precise
    assert not verdict.holds and "inconclusive" in verdict.line()


def test_a_ratio_column_is_shown_as_a_ratio():
    verdict = guards.judge("r/speedup", "ratio", ratios(3.0, 0.03, 30), 3.0)
    assert verdict.holds and "committed 3.000" in verdict.line()
    assert guards.to_ratio("gain", 15.0) == pytest.approx(1.15) and guards.from_ratio("gain", 1.15) == pytest.approx(15)


class FakeTimer:
    def __init__(self, name, log, speed):
        self.name, self.log, self.speed = name, log, speed


def test_pairs_alternate_and_more_are_timed_until_precise(monkeypatch):
    log = []
    wobble = iter(ratios(1.0, 0.08, 1000, seed=3))

    def sample(timer):
        log.append(timer.name)
        return timer.speed * next(wobble)

    monkeypatch.setattr(guards, "own_sample", sample)
    a, b = FakeTimer("a", log, 1.15), FakeTimer("b", log, 1.0)
    samples, verdict = guards.judged_pairs(a, b, "r/gain", "gain", COMMITTED)
    assert log[:2 * guards.WARMUP_PAIRS] == ["a", "b"] * guards.WARMUP_PAIRS
    assert log[2 * guards.WARMUP_PAIRS:][:8] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(samples[0]) == len(samples[1]) == verdict.pairs > guards.MIN_PAIRS  # 8 % noise: more pairs
    assert verdict.pairs < guards.MAX_PAIRS and verdict.precise and verdict.holds
