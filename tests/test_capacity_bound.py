"""The capacity bound read off a scheduler timeline (scripts/capacity_bound.py)."""

from __future__ import annotations

import pytest
from repo_scripts import load_script

bound = load_script("scripts/capacity_bound.py")


def _unit(members: int, predicted: float, actual: float, paused: bool = False, worker="w0"):
    return {
        "worker_id": worker,
        "members": [{"request_id": f"r{i}", "start": 0, "end": 10} for i in range(members)],
        "predicted_s": predicted,
        "actual_s": actual,
        "outcome": "completed",
        "pauses": [{"paused_s": 1.0}] if paused else [],
    }


def test_the_bound_is_the_rate_the_cheapest_share_fills_every_worker_at():
    # Single-request units ran 1.5x, 2x and 2.5x their prediction: the median 2x scales every
    # request's prediction. A batch and a paused unit are left out of that calibration.
    units = [
        _unit(1, 1.0, 1.5),
        _unit(1, 1.0, 2.0, worker="w1"),
        _unit(1, 2.0, 5.0),
        _unit(3, 1.0, 9.0),
        _unit(1, 1.0, 9.0, paused=True),
    ]
    # Ten requests: nine cheap ones (0.1 s predicted -> 0.2 s) and one dear one left out.
    requests = [{"predicted_s": 0.1}] * 9 + [{"predicted_s": 10.0}]
    result = bound.capacity_bound({"requests": requests, "units": units}, share=0.9)
    assert result["actual_over_predicted"] == pytest.approx(2.0)
    assert result["calibrating_units"] == 3
    assert result["workers"] == 2
    # Two workers, 10 requests per 9 x 0.2 s of their cheapest prefill: 2 x 10 / 1.8 req/s.
    assert result["capacity_bound_rps"] == pytest.approx(2 * 10 / 1.8)


def test_a_timeline_with_no_single_request_unit_cannot_be_calibrated():
    with pytest.raises(ValueError, match="no completed single-request unit"):
        bound.capacity_bound({"requests": [{"predicted_s": 1.0}], "units": [_unit(2, 1.0, 1.0)]})
