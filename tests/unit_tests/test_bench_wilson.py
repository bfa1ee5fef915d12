"""``bench.common.wilson`` (the 95% Wilson score interval reported with every benchmark accuracy) and ``rate``."""

from __future__ import annotations

import math

import pytest

from bench.common import rate, wilson


@pytest.mark.parametrize(
    "k,n,expected",
    [
        # Worked by hand from the closed form (z = 1.96, z² = 3.8416).
        (0, 10, (0.0, 0.2775)),
        (5, 10, (0.2366, 0.7634)),
        (10, 10, (0.7225, 1.0)),
        (1, 10, (0.0179, 0.4042)),
        (0, 1, (0.0, 0.7935)),
        (1, 1, (0.2065, 1.0)),
        (1, 2, (0.0945, 0.9055)),
        (30, 50, (0.4618, 0.7239)),
    ],
)
def test_known_values(k: int, n: int, expected: tuple[float, float]) -> None:
    low, high = wilson(k, n)
    assert low == pytest.approx(expected[0], abs=5e-5) and high == pytest.approx(expected[1], abs=5e-5)


def _score_test_bound(k: int, n: int, z: float, upper: bool) -> float:
    """The Wilson interval by its definition, independently of the closed form: the ends are the proportions p
    where the score statistic |k/n - p| / sqrt(p(1-p)/n) equals z (found by bisection)."""
    phat = k / n
    if (upper and k == n) or (not upper and k == 0):
        return phat
    lo, hi = (phat, 1.0) if upper else (0.0, phat)
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = abs(phat - mid) <= z * math.sqrt(mid * (1 - mid) / n)
        if inside == upper:  # upper end: move up while still inside; lower end: move down while inside
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 25, 100])
@pytest.mark.parametrize("z", [1.0, 1.96, 2.576])
def test_matches_the_score_test_inverted(n: int, z: float) -> None:
    for k in range(n + 1):
        low, high = wilson(k, n, z)
        assert low == pytest.approx(_score_test_bound(k, n, z, upper=False), abs=1e-9)
        assert high == pytest.approx(_score_test_bound(k, n, z, upper=True), abs=1e-9)
        assert 0.0 <= low <= k / n <= high <= 1.0


def test_symmetry_and_narrowing() -> None:
    for n in (4, 9, 40):
        for k in range(n + 1):
            low, high = wilson(k, n)
            mirror = wilson(n - k, n)
            assert low == pytest.approx(1 - mirror[1]) and high == pytest.approx(1 - mirror[0])
    widths = [wilson(n // 2, n)[1] - wilson(n // 2, n)[0] for n in (10, 40, 160)]
    assert widths[0] > widths[1] > widths[2]  # more trials, narrower


def test_edge_cases() -> None:
    assert wilson(0, 0) == (0.0, 1.0)
    for bad in ((-1, 3), (4, 3), (1, -1)):
        with pytest.raises(ValueError):
            wilson(*bad)


def test_rate_formats_count_and_interval() -> None:
    assert rate(5, 10) == "5/10 (24–76%)"
    assert rate(0, 10) == "0/10 (0–28%)"
    assert rate(10, 10) == "10/10 (72–100%)"
    assert rate(0, 0) == "–"
