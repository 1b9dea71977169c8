"""TTFT predictor: robust cubic fit, the long-prompt chunk rule, online correction, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from flowprefill_ray.scheduling import PredictorConfig, TTFTPredictor

# A known cubic in seconds: 2 ms fixed cost, 40 us/token, quadratic and cubic attention terms.
TRUE = (3e-13, 4e-9, 4e-5, 2e-3)  # highest power first


def truth(tokens: int) -> float:
    return float(np.polyval(TRUE, tokens))


def paper_profile() -> list[tuple[int, float]]:
    """The release's profile grid: 16..256 step 16 and 512..20480 step 512."""
    grid = list(range(16, 257, 16)) + list(range(512, 20481, 512))
    return [(t, truth(t)) for t in grid]


def test_fit_recovers_a_known_cubic_despite_outliers():
    profile = paper_profile()
    outliers = {1024: 3.0, 8192: 0.3, 15360: 2.5, 64: 4.0}  # token count -> corruption factor
    corrupted = [(t, s * outliers.get(t, 1.0)) for t, s in profile]
    predictor = TTFTPredictor.fit(corrupted)
    assert sorted(t for t, _ in predictor.dropped_points) == sorted(outliers)
    for tokens in (16, 100, 777, 4096, 12345, 20480):
        assert predictor.predict(tokens) == pytest.approx(truth(tokens), rel=1e-6)
    # Without the outlier rule the same data gives a visibly wrong fit.
    naive = np.polyfit(*zip(*corrupted, strict=True), 3)
    assert abs(np.polyval(naive, 16) - truth(16)) / truth(16) > 0.5


def test_absolute_least_squares_throws_away_the_short_prompts():
    # Why the fit is relative by default: fitted on absolute seconds, the corrupted long points
    # pull the cubic so far that most short-prompt points look like outliers and are dropped.
    corrupted = [(t, s * (3.0 if t == 15360 else 1.0)) for t, s in paper_profile()]
    absolute = TTFTPredictor.fit(corrupted, PredictorConfig(fit_weighting="absolute"))
    relative = TTFTPredictor.fit(corrupted)
    assert relative.dropped_points == [(15360, 3.0 * truth(15360))]
    assert len([t for t, _ in absolute.dropped_points if t <= 256]) >= 8


def test_fit_needs_four_distinct_token_counts():
    with pytest.raises(ValueError, match="at least 4 distinct"):
        TTFTPredictor.fit([(16, 0.01), (16, 0.011), (32, 0.02), (64, 0.03)])
    with pytest.raises(ValidationError):
        TTFTPredictor.fit([(16, 0.01), (32, -0.02), (64, 0.03), (128, 0.05)])


def test_predictions_never_fall_as_tokens_grow():
    # A cubic with a dip between 0 and ~2000 tokens; the table must not pass it on.
    predictor = TTFTPredictor([1e-10, -3e-7, 3e-4, 0.05], max_tokens=4096)
    values = [predictor.predict(t) for t in range(0, 4097, 7)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert predictor.predict(0) == 0.0


def test_beyond_the_profiled_range_long_prompts_run_as_8192_chunks():
    predictor = TTFTPredictor.fit(paper_profile())
    tokens = 3 * 8192 + 1000  # 25576 > 20480 profiled
    expected = 3 * (predictor.predict(8192) + 0.010) + predictor.predict(1000)
    assert predictor.predict(tokens) == pytest.approx(expected, rel=1e-12)
    # Exactly at the end of the profile the table is used, not the rule.
    assert predictor.predict(20480) == pytest.approx(truth(20480), rel=1e-6)


def test_chunk_rule_when_the_profile_stops_short_of_a_chunk():
    short = [(t, truth(t)) for t in range(256, 4097, 256)]
    predictor = TTFTPredictor.fit(short, PredictorConfig(chunk_overhead_s=0.0))
    # 8192 is extrapolated from the cubic; 5000 (< a chunk) too.
    assert predictor.predict(8192) == pytest.approx(truth(8192), rel=1e-6)
    assert predictor.predict(5000) == pytest.approx(truth(5000), rel=1e-6)
    assert predictor.predict(2 * 8192 + 300) == pytest.approx(
        2 * truth(8192) + truth(300), rel=1e-6
    )


# Single-prompt prefill times (s) of the ENVIRONMENT tiny model on one CPU thread, from
# flowprefill_ray/simulator/profiles/tiny_cpu.json: attention makes the cost per token grow.
MEASURED_TINY = [
    (16, 0.0051),
    (32, 0.0081),
    (64, 0.0096),
    (128, 0.0170),
    (256, 0.0366),
    (384, 0.0489),
    (512, 0.0638),
    (1024, 0.1359),
    (2048, 0.3509),
    (4096, 0.9234),
]


def test_a_profile_of_short_prompts_never_predicts_long_ones_as_free():
    # The runtime used to time 16..512 tokens only; the cubic fitted there turns down beyond
    # and, extrapolated, predicted 0 s for every prompt over ~1500 tokens.
    short = [(t, s) for t, s in MEASURED_TINY if t <= 512]
    predictor = TTFTPredictor.fit(short)
    a, b, c, d = predictor.coefficients
    assert np.polyval([a, b, c, d], 2048) <= 0.0  # the raw cubic really does fail there
    assert "power law" in predictor.extrapolation
    beyond = [predictor.predict(t) for t in range(512, 20000, 97)]
    assert all(x <= y for x, y in zip(beyond, beyond[1:], strict=False))
    for tokens, seconds in MEASURED_TINY:
        if tokens > 512:
            # At least linear growth from the last profiled point; an underestimate remains
            # (attention's quadratic share only shows past the profile), hence the warning
            # the engine logs and the longer default profile.
            assert predictor.predict(tokens) >= predictor.predict(512) * tokens / 512 * 0.999
            assert 0.5 * seconds <= predictor.predict(tokens) <= seconds
    # Profiled over the range it serves, the same model is predicted within 15 %.
    full = TTFTPredictor.fit(MEASURED_TINY)
    for tokens, seconds in MEASURED_TINY:
        assert full.predict(tokens) == pytest.approx(seconds, rel=0.15)


def test_online_correction_converges_toward_a_two_times_slower_truth():
    predictor = TTFTPredictor.fit(paper_profile())
    rng = np.random.default_rng(3)
    errors = []
    for _ in range(6):
        for _ in range(10):
            tokens = int(rng.integers(64, 20000))
            predictor.observe(tokens, 2.0 * truth(tokens))
        probe = 3000
        errors.append(abs(predictor.predict(probe) - 2 * truth(probe)) / (2 * truth(probe)))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[0] > 0.15 and errors[-1] < 0.01
    assert predictor.predict_uncorrected(3000) == pytest.approx(truth(3000), rel=1e-6)


def test_online_correction_is_bounded():
    predictor = TTFTPredictor.fit(paper_profile(), PredictorConfig(max_correction=3.0))
    for _ in range(200):
        predictor.observe(1000, 100.0 * truth(1000))
    assert predictor.correction == 3.0
    predictor.observe(1000, 0.0)  # a meaningless measurement is ignored
    assert predictor.correction == 3.0


def test_json_round_trip_keeps_fit_points_and_correction(tmp_path):
    predictor = TTFTPredictor.fit(
        [(t, s * (3.0 if t == 1024 else 1.0)) for t, s in paper_profile()]
    )
    predictor.observe(2048, 1.5 * truth(2048))
    path = tmp_path / "predictor.json"
    predictor.save(path)
    loaded = TTFTPredictor.load(path)
    assert loaded.correction == predictor.correction
    assert loaded.dropped_points == predictor.dropped_points == [(1024, 3.0 * truth(1024))]
    for tokens in (1, 555, 8192, 40000):
        assert loaded.predict(tokens) == predictor.predict(tokens)


def test_loading_a_bad_file_names_the_problem(tmp_path):
    path = tmp_path / "bad.json"
    data = TTFTPredictor.linear(1e-3).to_file_model().model_dump()
    data["coefficients"] = [1.0, 2.0]
    path.write_text(json.dumps(data))
    with pytest.raises(ValidationError, match="coefficients"):
        TTFTPredictor.load(path)


def test_config_rejects_bounds_that_exclude_one():
    with pytest.raises(ValidationError, match="min_correction <= 1 <= max_correction"):
        PredictorConfig(min_correction=1.5, max_correction=4.0)


def test_unit_overhead_is_learned_added_to_every_prediction_and_capped():
    predictor = TTFTPredictor.linear(0.001, max_tokens=4096)
    assert predictor.predict(1000) == pytest.approx(1.0)
    for _ in range(200):  # a live runtime: each unit took 10 ms beyond its compute
        predictor.observe_unit_overhead(0.010)
    assert predictor.unit_overhead_s == pytest.approx(0.010, rel=1e-6)
    assert predictor.predict(1000) == pytest.approx(1.010, rel=1e-6)
    assert predictor.predict(0) == 0.0
    for _ in range(200):  # negative samples (clock noise) count as none
        predictor.observe_unit_overhead(-0.5)
    assert predictor.unit_overhead_s == pytest.approx(0.0, abs=1e-9)
    for _ in range(200):
        predictor.observe_unit_overhead(30.0)
    assert predictor.unit_overhead_s == predictor.config.max_unit_overhead_s


def test_a_simulated_run_learns_no_unit_overhead():
    """The simulator's clock is the compute itself: its predictions stay exactly the fit's,
    so simulated results do not move with this term."""
    from flowprefill_ray.scheduling import PolicyConfig, SLOConfig, make_policy
    from flowprefill_ray.simulator.engine import Simulator
    from flowprefill_ray.simulator.overload import linear_cost_model, overload_requests

    predictor = TTFTPredictor.linear(4e-4, max_tokens=4096)
    policy = make_policy(PolicyConfig(), predictor, slo=SLOConfig())
    result = Simulator(policy, linear_cost_model()).run(
        overload_requests(200, SLOConfig(), rate_per_s=5.0)
    )
    assert len(result.outcomes) == 200
    assert predictor.unit_overhead_s == 0.0


def test_the_policy_feeds_each_units_wall_time_beyond_its_compute():
    """A unit dispatched at 0 s whose completion (1 s of compute on the worker) is heard at
    1.02 s cost 20 ms of dispatch and report: the policy's predictor learns that."""
    from flowprefill_ray.scheduling import PolicyConfig, Request, make_policy
    from flowprefill_ray.scheduling.events import Arrival, UnitCompleted, WorkerJoined

    predictor = TTFTPredictor.linear(2.0**-10, max_tokens=8192)
    policy = make_policy(PolicyConfig(), predictor)
    policy.on_event(WorkerJoined("w0"), 0.0)
    request = Request(request_id="r", arrival_s=0.0, prompt_tokens=1024, slo_class="file")
    (run,) = policy.on_event(Arrival(request), 0.0)
    policy.on_event(UnitCompleted("w0", run.unit.unit_id, 1.0), 1.02)
    weight = predictor.config.ewma_weight
    assert predictor.unit_overhead_s == pytest.approx(weight * 0.02)


def test_overrun_ratio_is_the_recent_90th_percentile_of_actual_over_predicted():
    p = TTFTPredictor.linear(2.0**-10, max_tokens=4096)
    assert p.overrun_ratio == 1.0  # nothing observed yet
    for _ in range(200):
        p.observe(1024, 0.5 * p.predict(1024))  # all faster than predicted
    assert p.overrun_ratio == 1.0  # never below 1: an underrun asks for no margin
    for i in range(128):  # the window now holds only these: ratios 1.00 .. 2.27
        p.observe(1024, (1.0 + i / 100) * p.predict(1024))
    assert p.overrun_ratio == pytest.approx(1.0 + int(0.9 * 127) / 100, abs=0.02)


def test_underrun_ratio_is_the_recent_10th_percentile_and_never_above_one():
    p = TTFTPredictor.linear(2.0**-10, max_tokens=4096)
    assert p.underrun_ratio == 1.0  # nothing observed yet
    for _ in range(200):
        p.observe(1024, 2.0 * p.predict(1024))  # all slower than predicted
    assert p.underrun_ratio == 1.0  # never above 1: an overrun grants no grace
    for i in range(128):  # the window now holds only these: ratios 0.50 .. 1.77
        p.observe(1024, (0.5 + i / 100) * p.predict(1024))
    assert p.underrun_ratio == pytest.approx(0.5 + int(0.1 * 127) / 100, abs=0.02)
