"""Goodput read off a grid of steady trials: the strict rule and the mean attainment curve."""

from __future__ import annotations

import pytest

from loadgen.steady_goodput import curve_crossing, grid_goodput


def _trial(rate: float, attainment: float, stable: bool = True, repeat: int = 0) -> dict:
    return {"rate_rps": rate, "attainment": attainment, "stable": stable, "repeat": repeat}


def test_goodput_is_the_highest_rate_at_and_below_which_every_repeat_held():
    trials = [
        _trial(1.0, 0.97),
        _trial(1.0, 0.95, repeat=1),
        _trial(2.0, 0.93),
        _trial(2.0, 0.91, repeat=1),
        _trial(3.0, 0.95),
        _trial(3.0, 0.80, repeat=1),  # one repeat missed: the rate fails
        _trial(4.0, 0.92),  # above a failed rate: does not count
        _trial(4.0, 0.92, repeat=1),
    ]
    result = grid_goodput(trials, 0.9)
    assert result["goodput_rps"] == 2.0 and not result["censored"]
    # An unstable trial (backlog not drained) fails its rate whatever its attainment.
    assert grid_goodput([_trial(1.0, 0.99, stable=False)], 0.9)["goodput_rps"] == 0.0
    top = grid_goodput([_trial(1.0, 0.99), _trial(2.0, 0.95)], 0.9)
    assert top["goodput_rps"] == 2.0 and top["censored"]


def test_the_mean_curve_is_interpolated_where_it_crosses_the_target():
    trials = [
        _trial(1.0, 0.98),
        _trial(1.0, 0.96, repeat=1),
        _trial(2.0, 0.95),
        _trial(2.0, 0.85, repeat=1),  # mean 0.90: holds, though one repeat missed
        _trial(3.0, 0.80),
        _trial(3.0, 0.70, repeat=1),  # mean 0.75
    ]
    result = grid_goodput(trials, 0.9)
    # The strict rule stops at 1.0; the mean curve holds at 2.0 and crosses at exactly 2.0.
    assert result["goodput_rps"] == 1.0
    assert result["goodput_mean_curve_rps"] == pytest.approx(2.0)
    assert result["mean_curve"] == [[1.0, pytest.approx(0.97)], [2.0, pytest.approx(0.90)],
                                    [3.0, pytest.approx(0.75)]]  # fmt: skip
    # Repeat 0: 0.95 at 2.0 -> 0.80 at 3.0 crosses a third of the way; repeat 1: 0.96 at
    # 1.0 -> 0.85 at 2.0 crosses at 1 + 0.06 / 0.11.
    low, high = sorted(result["goodput_by_repeat_rps"])
    assert low == pytest.approx(1.0 + 0.06 / 0.11)
    assert high == pytest.approx(2.0 + 1 / 3)


def test_an_unstable_rate_is_not_interpolated_into():
    # Its attainment counts only what was served before the trial ended: a backlog that did
    # not drain is a miss at the last rate that held, whatever the number says.
    points = [(1.0, 0.97), (2.0, None), (3.0, 0.95)]
    assert curve_crossing(points, 0.9) == 1.0
    trials = [_trial(1.0, 0.97), _trial(2.0, 0.99, stable=False), _trial(2.0, 0.99, repeat=1)]
    result = grid_goodput(trials, 0.9)
    assert result["mean_curve"][1] == [2.0, None]
    assert result["goodput_mean_curve_rps"] == 1.0
    assert sorted(result["goodput_by_repeat_rps"]) == [1.0, 2.0]


def test_a_curve_that_never_holds_reads_zero_and_one_that_always_holds_its_top_rate():
    assert curve_crossing([(1.0, 0.85), (2.0, 0.60)], 0.9) == 0.0
    assert curve_crossing([(1.0, 0.99), (2.0, 0.91)], 0.9) == 2.0
    assert curve_crossing([], 0.9) == 0.0
