"""The discrete-event simulator driving the real scheduling policies.

Hand-checkable cases use a measured-profile cost model with round coefficients: every block
(attention or MLP) costs 1e-4 s per token, 2 layers, no overheads, so a prompt of n tokens
takes 4e-4 * n s and its checkpoints fall every 1e-4 * n s.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest

from flowprefill_ray.scheduling.config import PolicyConfig
from flowprefill_ray.scheduling.events import RunUnit, WorkItem, WorkUnit
from flowprefill_ray.scheduling.request import Request
from flowprefill_ray.scheduling.slo import SLOConfig
from flowprefill_ray.simulator.engine import PolicyContractError, Simulator, SimulatorConfig
from flowprefill_ray.simulator.experiment import fit_predictor, fresh_copy, prefill_s, simulate
from flowprefill_ray.simulator.measured import MeasuredCostModel, MeasuredProfile
from flowprefill_ray.simulator.roofline import RooflineCostModel
from flowprefill_ray.workloads import SLOAssignmentConfig, assign_slo_classes, load_builtin

BLOCK_S_PER_TOKEN = 1e-4


@pytest.fixture(scope="module")
def round_cost():
    profile = MeasuredProfile(
        name="round",
        num_layers=2,
        attention=(0.0, BLOCK_S_PER_TOKEN, 0.0),
        mlp=(0.0, BLOCK_S_PER_TOKEN),
        overhead=(0.0, 0.0),
        tail=(0.0, 0.0),
    )
    return MeasuredCostModel(profile)


@pytest.fixture(scope="module")
def conv_sample():
    """400 requests of the Azure conversation trace with the paper's four classes."""
    return assign_slo_classes(
        load_builtin("azure_2023_conv").head(400), SLOAssignmentConfig(seed=1)
    )


def run_policy(policy_config, cost_model, requests, **sim):
    from flowprefill_ray.scheduling import make_policy

    policy = make_policy(policy_config, fresh_copy(fit_predictor(cost_model)))
    return Simulator(policy, cost_model, SimulatorConfig(**sim)).run(requests)


# ----------------------------------------------------------------------------- hand-computed


@pytest.mark.parametrize(
    "granularity,urgent_ttft_s,blocking_s",
    [
        # The long prompt's checkpoints are every 0.1 s; the urgent one arrives at 0.05 s.
        ("block", 0.1 + 0.02 - 0.05, 0.05),  # stops after the first attention block
        ("layer", 0.2 + 0.02 - 0.05, 0.15),  # stops after the first layer
    ],
)
def test_urgent_request_preempts_a_long_prefill_at_the_next_checkpoint(
    round_cost, granularity, urgent_ttft_s, blocking_s
):
    long = Request(request_id="long", arrival_s=0.0, prompt_tokens=1000, slo_class="file")  # 0.4 s
    urgent = Request(
        request_id="urgent", arrival_s=0.05, prompt_tokens=50, slo_class="text"
    )  # 0.02 s
    result = run_policy(
        PolicyConfig(name="flowprefill"), round_cost, [long, urgent], granularity=granularity
    )
    by_id = {o.request_id: o for o in result.outcomes}
    assert by_id["urgent"].ttft_s == pytest.approx(urgent_ttft_s, abs=1e-9)
    assert by_id["urgent"].met_slo  # text SLO 0.25 s
    # The long one lost exactly the urgent one's 0.02 s; nothing was recomputed.
    assert by_id["long"].ttft_s == pytest.approx(0.4 + 0.02, abs=1e-9)
    assert by_id["long"].preemptions == 1 and by_id["urgent"].preemptions == 0
    assert result.workers[0].blocking_s == [pytest.approx(blocking_s, abs=1e-9)]
    assert result.decisions == {"RunUnit": 2, "Preempt": 1, "Resume": 1}
    assert result.workers[0].busy_s == pytest.approx(0.42, abs=1e-9)


class _TwoOperatorBlocks:
    """``round_cost`` with each block split into two operators of equal time."""

    def __init__(self, base):
        self.base, self.name, self.num_layers = base, "round-ops", base.num_layers

    def unit_cost(self, items):
        cost = self.base.unit_cost(items)
        return dataclasses.replace(cost, attention_ops=(0.5, 0.5), mlp_ops=(0.5, 0.5))


@pytest.mark.parametrize(
    "granularity,blocking_s", [("operator", 0.05 - 0.03), ("block", 0.1 - 0.03)]
)
def test_operator_granularity_stops_at_the_next_operator(round_cost, granularity, blocking_s):
    long = Request(request_id="long", arrival_s=0.0, prompt_tokens=1000, slo_class="file")
    urgent = Request(request_id="urgent", arrival_s=0.03, prompt_tokens=50, slo_class="text")
    result = run_policy(
        PolicyConfig(name="flowprefill"),
        _TwoOperatorBlocks(round_cost),
        [long, urgent],
        granularity=granularity,
    )
    by_id = {o.request_id: o for o in result.outcomes}
    assert result.workers[0].blocking_s == [pytest.approx(blocking_s, abs=1e-9)]
    assert by_id["urgent"].ttft_s == pytest.approx(blocking_s + 0.02, abs=1e-9)
    assert by_id["long"].ttft_s == pytest.approx(0.42, abs=1e-9)


def test_without_checkpoints_the_urgent_request_waits_and_misses(round_cost):
    long = Request(request_id="long", arrival_s=0.0, prompt_tokens=1000, slo_class="file")
    urgent = Request(request_id="urgent", arrival_s=0.05, prompt_tokens=50, slo_class="text")
    for name, granularity in (("fcfs", "block"), ("flowprefill", "unit")):
        result = run_policy(
            PolicyConfig(name=name), round_cost, [long, urgent], granularity=granularity
        )
        by_id = {o.request_id: o for o in result.outcomes}
        assert by_id["urgent"].ttft_s == pytest.approx(0.4 + 0.02 - 0.05, abs=1e-9), name
        assert not by_id["urgent"].met_slo and by_id["long"].met_slo
        assert result.preemptions == 0


def test_two_workers_run_two_long_prompts_side_by_side(round_cost):
    reqs = [
        Request(request_id=f"r{i}", arrival_s=0.0, prompt_tokens=1000, slo_class="file")
        for i in range(2)
    ]
    result = run_policy(
        PolicyConfig(name="fcfs", max_batch_tokens=1000), round_cost, reqs, num_workers=2
    )
    assert [o.ttft_s for o in result.outcomes] == [pytest.approx(0.4), pytest.approx(0.4)]
    assert sorted(w.busy_s for w in result.workers) == [pytest.approx(0.4), pytest.approx(0.4)]


def test_prompts_longer_than_one_forward_run_as_back_to_back_pieces(round_cost):
    # 3000 tokens with 1000-token forwards: pieces attend earlier KV (no pair cost here), so
    # the time is the same as one forward; with a pair cost it would be more.
    one = Request(request_id="big", arrival_s=0.0, prompt_tokens=3000, slo_class="file")
    result = run_policy(PolicyConfig(name="fcfs"), round_cost, [one], max_forward_tokens=1000)
    assert result.outcomes[0].ttft_s == pytest.approx(1.2)
    roofline = RooflineCostModel()
    assert prefill_s(roofline, 16384, 8192) > prefill_s(roofline, 16384, 16384)


# ----------------------------------------------------------------------------- conservation


@pytest.mark.parametrize(
    "policy_config,workers",
    [
        (PolicyConfig(name="flowprefill"), 1),
        (PolicyConfig(name="flowprefill"), 3),
        (PolicyConfig(name="fcfs"), 2),
        (PolicyConfig(name="edf"), 1),
        (PolicyConfig(name="chunked", chunk_size=256, chunk_order="fcfs"), 1),
        (PolicyConfig(name="chunked", chunk_size=512, chunk_order="edf"), 2),
        (PolicyConfig(name="srpf", chunk_size=512), 2),
        (PolicyConfig(name="priority_chunked", chunk_size=1024), 1),
        (PolicyConfig(name="edf_giveup", chunk_size=512), 2),
        (PolicyConfig(name="flowprefill", preemption=False), 2),
        (PolicyConfig(name="flowprefill", batching="token_bound"), 1),
        (PolicyConfig(name="flowprefill", batching="off"), 2),
    ],
    ids=[
        "flowprefill-1w",
        "flowprefill-3w",
        "fcfs-2w",
        "edf-1w",
        "chunked256fcfs-1w",
        "chunked512edf-2w",
        "srpf512-2w",
        "priority1024-1w",
        "edfgiveup512-2w",
        "flowprefill-nopreempt-2w",
        "flowprefill-tokenbound-1w",
        "flowprefill-nobatch-2w",
    ],
)
def test_every_request_finishes_once_and_busy_time_equals_work(conv_sample, policy_config, workers):
    cost = MeasuredCostModel()
    slo = SLOConfig(scale=4.0)
    # Load high enough that queues form and preemptions happen.
    workload = conv_sample.scale_rate(6.0 * workers)
    result = simulate(
        workload,
        policy_config,
        cost,
        slo,
        SimulatorConfig(num_workers=workers, resume_overhead_s=1e-4),
    )
    assert len(result.outcomes) == len(workload)
    assert all(
        o.prefill_completions == 1 and o.finished and not o.rejected for o in result.outcomes
    )
    busy = sum(w.busy_s for w in result.workers)
    assert busy == pytest.approx(result.work_s, rel=1e-9)
    # The fitted forms have non-negative terms, so sharing a unit or splitting a prompt into
    # chunks never makes a prompt cheaper than prefilling it alone: a TTFT lower bound.
    for o in result.outcomes:
        assert o.ttft_s >= prefill_s(cost, o.prompt_tokens) * (1 - 1e-9)
    if policy_config.name == "flowprefill" and policy_config.preemption:
        assert result.preemptions > 0  # the load is high enough to exercise pause/resume
    else:
        assert result.preemptions == 0
    w_pauses = sum(w.pauses for w in result.workers)
    assert w_pauses == sum(w.resumes for w in result.workers)  # no paused work left behind
    assert result.decisions.get("Preempt", 0) >= w_pauses
    assert sum(w.units_completed for w in result.workers) == sum(
        w.units_started for w in result.workers
    )
    assert all(w.busy_s <= result.makespan_s + 1e-9 for w in result.workers)


# ----------------------------------------------------------------------------- contract checks


class ScriptedPolicy:
    """Answers each arrival with decisions built by ``script(request_id)``: a stand-in for a
    buggy policy, to check that the simulator refuses what no worker could do."""

    def __init__(self, script):
        self.script = script

    def on_event(self, event, now):
        request = getattr(event, "request", None)
        return self.script(request.request_id) if request is not None else []


def test_a_chunk_without_its_earlier_kv_on_that_worker_is_refused(round_cost):
    req = Request(request_id="r", arrival_s=0.0, prompt_tokens=100)
    bad = ScriptedPolicy(lambda rid: [RunUnit(WorkUnit(1, "prefill-0", (WorkItem(rid, 50, 100),)))])
    with pytest.raises(
        PolicyContractError, match=r"chunk starting at 50 needs the KV of \[0, 50\) on prefill-0"
    ):
        Simulator(bad, round_cost).run([req])


def test_running_on_a_busy_worker_is_refused(round_cost):
    reqs = [Request(request_id=f"r{i}", arrival_s=0.0, prompt_tokens=100) for i in range(2)]
    bad = ScriptedPolicy(
        lambda rid: [RunUnit(WorkUnit(int(rid[1:]), "prefill-0", (WorkItem(rid, 0, 100),)))]
    )
    with pytest.raises(PolicyContractError, match="worker is busy with unit 0"):
        Simulator(bad, round_cost).run(reqs)


def test_a_policy_that_leaves_requests_waiting_is_reported(round_cost):
    from flowprefill_ray.simulator.engine import SimulationStalled

    lazy = ScriptedPolicy(lambda rid: [])
    with pytest.raises(SimulationStalled, match="1 requests never finished"):
        Simulator(lazy, round_cost).run([Request(request_id="r", arrival_s=0.0, prompt_tokens=10)])


def test_predictor_fitted_from_a_cost_model_tracks_it():
    cost = MeasuredCostModel()
    predictor = fit_predictor(cost)
    for n in (64, 700, 3000, 12000):
        assert predictor.predict(n) == pytest.approx(prefill_s(cost, n), rel=0.1)


def test_slo_scale_is_one_on_the_papers_platform_and_tracks_speed(conv_sample):
    from flowprefill_ray.simulator import A800_SXM, RooflineConfig, fitted_slo_scale

    assert fitted_slo_scale(
        RooflineCostModel(RooflineConfig(gpu=A800_SXM)), conv_sample
    ) == pytest.approx(1.0)
    assert fitted_slo_scale(RooflineCostModel(), conv_sample) < 0.5  # an H100 is ~3x faster
    assert fitted_slo_scale(MeasuredCostModel(), conv_sample) > 1.0  # our CPU model is slower


def test_noisy_cost_model_is_seeded_unbiased_in_log_and_scales_every_block():
    from flowprefill_ray.simulator.cost_model import ItemShape
    from flowprefill_ray.simulator.noisy import NoisyCostModel

    base = MeasuredCostModel()
    items = [ItemShape(128)]
    exact = base.unit_cost(items)
    draws = [NoisyCostModel(base, 0.2, seed=7).unit_cost(items) for _ in range(2)]
    assert draws[0] == draws[1]  # same seed, same call order: same cost
    noisy = NoisyCostModel(base, 0.2, seed=1)
    factors = [noisy.unit_cost(items).total_s / exact.total_s for _ in range(2000)]
    logs = sorted(math.log(f) for f in factors)
    assert abs(statistics.mean(logs)) < 0.02 and 0.18 < statistics.stdev(logs) < 0.22
    one = NoisyCostModel(base, 0.2, seed=3).unit_cost(items)
    ratio = one.total_s / exact.total_s
    # Every block moves by the same factor, so checkpoints keep their relative places.
    for field in ("overhead_s", "attention_s", "mlp_s", "tail_s"):
        assert getattr(one, field) == pytest.approx(getattr(exact, field) * ratio)
    assert NoisyCostModel(base, 0.0).unit_cost(items) == exact
    with pytest.raises(ValueError, match="sigma"):
        NoisyCostModel(base, -0.1)
