"""Cost models (roofline, measured profile) and the generic goodput bisection."""

from __future__ import annotations

import pytest
from repo_scripts import load_script

from flowprefill_ray.simulator.cost_model import (
    ItemShape,
    UnitCost,
    chunked_prefill_time_s,
    prefill_time_s,
)
from flowprefill_ray.simulator.goodput import GoodputSearchConfig, find_goodput
from flowprefill_ray.simulator.measured import (
    BlockMeasurement,
    MeasuredCostModel,
    MeasuredProfile,
    default_profile_path,
    fit_profile,
    profile_path,
)
from flowprefill_ray.simulator.roofline import (
    A800_SXM,
    H100_SXM,
    LLAMA_3_1_8B,
    RooflineConfig,
    RooflineCostModel,
)

# ----------------------------------------------------------------------------- roofline


def test_llama_8b_has_8b_parameters_and_one_token_costs_about_two_flops_per_parameter():
    assert LLAMA_3_1_8B.params == pytest.approx(8.03e9, rel=0.01)
    model = RooflineCostModel()
    flops = model.unit_flops([ItemShape(1)])
    # The input embedding is a gather, not a matmul: 2 * (params - embedding) exactly-ish.
    embedding = LLAMA_3_1_8B.vocab * LLAMA_3_1_8B.hidden
    assert flops == pytest.approx(2 * (LLAMA_3_1_8B.params - embedding), rel=0.001)
    assert flops == pytest.approx(2 * LLAMA_3_1_8B.params, rel=0.08)


def test_one_token_is_memory_bound_and_long_prompts_compute_bound():
    h100 = RooflineCostModel(RooflineConfig(gpu=H100_SXM, unit_overhead_s=0.0, kernel_launch_s=0.0))
    # Every weight is read once, except the input embedding, of which one row is gathered.
    weight_bytes = 2 * (LLAMA_3_1_8B.params - LLAMA_3_1_8B.vocab * LLAMA_3_1_8B.hidden)
    read_time = weight_bytes / (H100_SXM.memory_gbps * 1e9 * 0.8)
    assert prefill_time_s(h100, 1) == pytest.approx(read_time, rel=0.05)
    t8k = prefill_time_s(h100, 8192)
    ideal = h100.unit_flops([ItemShape(8192)]) / (H100_SXM.peak_tflops * 1e12)
    assert ideal < t8k < ideal / 0.6  # compute bound at ~70 % of peak, not faster than peak


def test_a800_is_slower_than_h100_by_about_its_flops_ratio_on_long_prompts():
    h100 = RooflineCostModel(RooflineConfig(gpu=H100_SXM))
    a800 = RooflineCostModel(RooflineConfig(gpu=A800_SXM))
    ratio = prefill_time_s(a800, 8192) / prefill_time_s(h100, 8192)
    assert ratio == pytest.approx(H100_SXM.peak_tflops / A800_SXM.peak_tflops, rel=0.1)


def test_small_chunks_cost_more_in_total_and_later_chunks_pay_for_earlier_kv():
    h100 = RooflineCostModel()
    whole = prefill_time_s(h100, 8192)
    by_chunk = {c: chunked_prefill_time_s(h100, 8192, c) for c in (256, 512, 2048, 8192)}
    assert by_chunk[8192] == pytest.approx(whole)
    assert whole < by_chunk[2048] < by_chunk[512] < by_chunk[256]
    first = h100.unit_cost([ItemShape(512, 0)]).attention_s
    last = h100.unit_cost([ItemShape(512, 7680)]).attention_s
    assert last > 1.5 * first  # attention over 8k of earlier KV
    assert h100.unit_cost([ItemShape(512, 7680)]).mlp_s == pytest.approx(
        h100.unit_cost([ItemShape(512)]).mlp_s
    )


def test_unit_checkpoints_at_block_layer_and_unit_granularity():
    cost = UnitCost(overhead_s=1.0, attention_s=2.0, mlp_s=3.0, num_layers=2, tail_s=0.5)
    assert cost.total_s == 11.5
    assert cost.checkpoints("block") == [3.0, 6.0, 8.0, 11.0]
    assert cost.checkpoints("layer") == [6.0, 11.0]
    assert cost.checkpoints("unit") == []
    assert cost.next_checkpoint(0.0, "block") == 3.0
    assert cost.next_checkpoint(6.0, "block") == 6.0  # already at a checkpoint: stop there
    assert cost.next_checkpoint(6.5, "layer") == 11.0
    assert cost.next_checkpoint(11.2, "block") is None  # in the tail: it just completes


def test_operator_checkpoints_follow_each_operators_share_of_its_block():
    cost = UnitCost(
        overhead_s=1.0,
        attention_s=2.0,
        mlp_s=4.0,
        num_layers=2,
        tail_s=0.5,
        attention_ops=(0.25, 0.75),
        mlp_ops=(0.5, 0.5),
    )
    # After the embedding, then after every operator; the last one ends at the tail.
    assert cost.checkpoints("operator") == [1.0, 1.5, 3.0, 5.0, 7.0, 7.5, 9.0, 11.0, 13.0]
    assert set(cost.checkpoints("block")) <= set(cost.checkpoints("operator"))
    # Without an operator split a block is one operator: block checkpoints plus the embedding.
    plain = UnitCost(overhead_s=1.0, attention_s=2.0, mlp_s=3.0, num_layers=2, tail_s=0.5)
    assert plain.checkpoints("operator") == [1.0, *plain.checkpoints("block")]


def test_roofline_prices_nine_operators_a_layer_summing_to_its_blocks():
    h100 = RooflineCostModel()
    cost = h100.unit_cost([ItemShape(2048)])
    assert len(cost.attention_ops) == 5 and len(cost.mlp_ops) == 4
    assert sum(cost.attention_ops) == pytest.approx(1.0)
    assert sum(cost.mlp_ops) == pytest.approx(1.0)
    points = cost.checkpoints("operator")
    assert len(points) == 1 + 9 * LLAMA_3_1_8B.num_layers
    # Every block checkpoint is an operator checkpoint too (up to float summation order).
    for block_end in cost.checkpoints("block"):
        assert min(abs(block_end - p) for p in points) < 1e-12
    # The GEMMs dominate a 2048-token block: QKV and the gate/up projection are the largest.
    assert max(cost.attention_ops) == cost.attention_ops[1]
    assert max(cost.mlp_ops) == cost.mlp_ops[1]


# ----------------------------------------------------------------------------- measured profile


def test_measured_fit_recovers_known_coefficients():
    truth = dict(a=(1e-4, 2e-6, 3e-9), m=(2e-4, 5e-6), o=(1e-4, 1e-7), t=(5e-5, 1e-5))
    shapes = [[(n, c)] for n in (16, 128, 512, 2048) for c in (0, 1024)] + [[(64, 0)] * 4]
    measurements = []
    for items in shapes:
        tok = sum(n for n, _ in items)
        pairs = sum(n * c + n * (n + 1) / 2 for n, c in items)
        measurements.append(
            BlockMeasurement(
                items=items,
                attention_s=truth["a"][0] + truth["a"][1] * tok + truth["a"][2] * pairs,
                mlp_s=truth["m"][0] + truth["m"][1] * tok,
                overhead_s=truth["o"][0] + truth["o"][1] * tok,
                tail_s=truth["t"][0] + truth["t"][1] * len(items),
                total_s=0.0,
            )
        )
    profile = fit_profile("synthetic", 4, measurements)
    assert profile.attention == pytest.approx(truth["a"], rel=1e-6)
    assert profile.mlp == pytest.approx(truth["m"], rel=1e-6)
    model = MeasuredCostModel(profile)
    cost = model.unit_cost([ItemShape(512, 1024)])
    assert cost.attention_s == pytest.approx(
        1e-4 + 2e-6 * 512 + 3e-9 * (512 * 1024 + 512 * 513 / 2)
    )


@pytest.mark.parametrize(("model_name", "layers"), [("tiny", 4), ("default", 30)])
def test_committed_profiles_load_grow_with_prompt_length_and_fit_their_measurements(
    model_name, layers
):
    model = MeasuredCostModel(MeasuredProfile.load(profile_path(model_name)))
    assert model.num_layers == layers
    times = [prefill_time_s(model, n) for n in (16, 256, 1024, 4096)]
    assert times == sorted(times) and times[0] > 0
    # Every coefficient was fitted non-negative, so a bigger unit is never cheaper.
    p = model.profile
    assert min(p.attention + p.mlp + p.overhead + p.tail) >= 0
    assert len(p.measurements) >= 10 and "threads" in p.provenance
    # The fitted forms reproduce what was timed: a profile whose fit is off prices every
    # simulated unit wrongly. Median relative error over the timed shapes.
    errors = sorted(
        abs(model.unit_cost([ItemShape(t, c) for t, c in m.items]).total_s - m.total_s) / m.total_s
        for m in p.measurements
    )
    assert errors[len(errors) // 2] < 0.15, errors


def test_profile_lookup_names_the_known_models():
    assert profile_path("tiny") == default_profile_path()
    with pytest.raises(ValueError, match="no committed simulator profile for model 'llama-70b'"):
        profile_path("llama-70b")


# ----------------------------------------------------------------------------- goodput search


@pytest.mark.parametrize("threshold", [0.013, 0.7, 3.0, 41.5])
def test_goodput_bisection_finds_the_threshold_of_a_monotone_curve(threshold):
    calls = []

    def attainment(scale: float) -> float:
        calls.append(scale)
        return 1.0 if scale <= threshold else 0.5

    result = find_goodput(attainment, GoodputSearchConfig(rel_tol=0.01))
    assert result.rate_scale <= threshold < result.failing_scale
    assert result.failing_scale - result.rate_scale <= 0.01 * result.rate_scale
    assert len(calls) == len(set(calls)) < 30  # no scale evaluated twice
    assert [p.rate_scale for p in result.points] == sorted(calls)


def test_goodput_uses_the_attainment_attribute_and_reports_edges():
    class Report:
        def __init__(self, attainment: float) -> None:
            self.attainment = attainment

    result = find_goodput(lambda s: Report(0.95 if s < 2.5 else 0.85))
    assert 2.45 < result.rate_scale < 2.5
    assert result.passing_result.attainment == 0.95
    never = find_goodput(lambda s: 0.0, GoodputSearchConfig(min_scale=0.1))
    assert never.rate_scale == 0.0 and never.failing_scale == 0.1
    always = find_goodput(lambda s: 1.0, GoodputSearchConfig(max_scale=64))
    assert always.rate_scale == 64 and always.failing_scale is None
    with pytest.raises(TypeError, match="need a float or an object with .attainment"):
        find_goodput(lambda s: "good")


def test_goodput_with_a_custom_measure_uses_it():
    # Overall attainment stays high, but the worst class collapses above scale 1.5.
    result = find_goodput(
        lambda s: {"overall": 0.95, "worst": 0.95 if s <= 1.5 else 0.4},
        measure=lambda r: r["worst"],
    )
    assert 1.45 < result.rate_scale <= 1.5


def test_profiler_measures_our_model_and_writes_a_loadable_profile(tmp_path):
    pytest.importorskip("torch")
    # The profiler runs the torch model, so it is a script (scripts/), not simulator code.
    profile_main = load_script("scripts/profile_model.py").main

    out = tmp_path / "profile.json"
    profile_main(["--quick", "--repeats", "1", "--out", str(out)])
    model = MeasuredCostModel(MeasuredProfile.load(out))
    assert model.num_layers == 4 and len(model.profile.measurements) == 5
    assert 0 < prefill_time_s(model, 64) < prefill_time_s(model, 2048)
