"""The scheduler timeline, the why-late attribution and the Gantt chart.

Scenarios run the real policies in the discrete-event simulator (deterministic: nothing here
waits on a clock). The cost model is the hand-checkable one of test_simulator.py: every block
(attention or MLP) costs 1e-4 s per token, 2 layers, so a prompt of n tokens takes 4e-4 * n s
(250 tokens: 0.1 s) and, under ``block`` granularity, can stop every 1e-4 * n s. The
predictor is fitted to that cost model, so predictions are exact unless a test says otherwise.
"""

from __future__ import annotations

import gc
import json

import pytest
from policy_helpers import arrive, policy
from repo_scripts import load_script

from flowprefill_ray.__main__ import main as cli
from flowprefill_ray.scheduling import KVBudget, PolicyConfig, Request, make_policy
from flowprefill_ray.scheduling.events import Arrival, Cancelled, UnitCompleted, WorkerLeft
from flowprefill_ray.scheduling.timeline import Timeline
from flowprefill_ray.scheduling.timeline_records import UnitTrace
from flowprefill_ray.scheduling.why_late import CAUSES, format_summary, summarize, why_late
from flowprefill_ray.simulator import UnitCost
from flowprefill_ray.simulator.engine import Simulator, SimulatorConfig
from flowprefill_ray.simulator.experiment import fit_predictor, fresh_copy
from flowprefill_ray.simulator.overload import linear_cost_model
from flowprefill_ray.workloads import SLOAssignmentConfig, assign_slo_classes, load_builtin

# 4e-4 s per prompt token, nothing else: every time in these scenarios is easy to follow.
ROUND = linear_cost_model()
PREDICTOR = fit_predictor(ROUND)


class BatchPenalty:
    """Like ROUND for one sequence, three times slower for a packed batch: the predictor
    (fitted to single prompts) underestimates every batch."""

    name = "batch-penalty"
    num_layers = 2

    def unit_cost(self, items):
        block = 1e-4 * sum(i.new_tokens for i in items) * (3.0 if len(items) > 1 else 1.0)
        return UnitCost(0.0, block, block, 2, 0.0)


def req(rid: str, t: float, tokens: int, slo_s: float, cls: str = "text") -> Request:
    return Request(
        request_id=rid, arrival_s=t, prompt_tokens=tokens, slo_class=cls, ttft_slo_s=slo_s
    )


def simulate(requests, cost=ROUND, name="flowprefill", capacity=2000, sim=None, **config):
    """(result, timeline) of one run with a timeline attached."""
    p = make_policy(
        PolicyConfig(name=name, online_correction=False, **config), fresh_copy(PREDICTOR)
    )
    timeline = Timeline.for_policy(p, capacity=capacity)
    result = Simulator(p, cost, SimulatorConfig(**(sim or {})), timeline=timeline).run(requests)
    return result, timeline


def causes(timeline: Timeline) -> dict[str, str]:
    return {v["request_id"]: v["cause"] for v in why_late(timeline.export(None))}


# ----------------------------------------------------------------------------- one per cause


def test_a_target_shorter_than_its_own_prefill_is_infeasible_at_arrival():
    result, timeline = simulate([req("x", 0.0, 1000, 0.2)])  # 0.4 s of prefill for 0.2 s
    assert not result.outcomes[0].met_slo
    assert causes(timeline) == {"x": "infeasible_at_arrival"}


def test_a_tight_request_behind_more_urgent_work_on_one_worker_queued():
    # Deadlines 0.25 / 0.26 / 0.27 / 0.28 s, 0.1 s each: a1 and a2 run first (earlier
    # deadlines), x turns late at 0.18 s while a2 runs.
    result, timeline = simulate(
        [req("a1", 0, 250, 0.25), req("a2", 0, 250, 0.26), req("a3", 0, 250, 0.27)]
        + [req("x", 0, 250, 0.28)]
    )
    by_id = {o.request_id: o for o in result.outcomes}
    assert by_id["a1"].met_slo and by_id["a2"].met_slo and not by_id["x"].met_slo
    verdict = {v["request_id"]: v for v in why_late(timeline.export(None))}["x"]
    assert verdict["cause"] == "queued_behind_higher_ranked"
    assert verdict["turned_late_in"] == "queued"
    assert verdict["turned_late_s"] == pytest.approx(0.18)


def test_a_batch_that_ran_three_times_its_prediction_overran():
    # `blk` holds the worker while h and two loose requests arrive; h then heads an SLO-aware
    # batch predicted at 0.18 s (fits h's 0.25 s) that actually takes 0.54 s.
    requests = [req("blk", 0.0, 100, 0.05), req("h", 0.001, 250, 0.25)]
    requests += [req("b1", 0.002, 100, 5.0, "file"), req("b2", 0.003, 100, 5.0, "file")]
    result, timeline = simulate(requests, cost=BatchPenalty())
    export = timeline.export(None)
    unit = next(u for u in export["units"] if len(u["members"]) == 3)
    assert unit["actual_s"] == pytest.approx(3 * unit["predicted_s"])
    assert causes(timeline) == {"h": "batch_overran"}


def test_a_paused_unit_starved_after_its_request_turned_late():
    # h (0.2 s, due 0.3) is paused for u1 at 0.05; u2 takes the worker at 0.15, when h turns
    # late; late h then waits behind the feasible u3 too and resumes only at 0.35.
    requests = [req("h", 0.0, 500, 0.3), req("u1", 0.01, 250, 0.15)]
    requests += [req("u2", 0.14, 250, 0.15), req("u3", 0.2, 250, 0.15)]
    result, timeline = simulate(requests)
    assert [o.met_slo for o in result.outcomes] == [False, True, True, True]
    verdict = why_late(timeline.export(None))[0]
    assert verdict["cause"] == "paused_after_late"
    assert verdict["stalled_after_late_s"] == pytest.approx(0.2)
    assert verdict["late_by_s"] == pytest.approx(0.2)
    unit = timeline.export(None)["units"][0]
    assert [p["by_unit"] for p in unit["pauses"]] == [2]  # u1's unit took the worker
    assert unit["pauses"][0]["preempt_s"] == 0.01 and unit["pauses"][0]["paused_s"] == 0.05
    assert unit["runs"] == [[0.0, 0.05], [pytest.approx(0.35), pytest.approx(0.5)]]


@pytest.mark.parametrize(
    "granularity,victim,urgent,worker_went_to",
    [
        # The preempt is decided at 0.01 for u (due 0.11), with u's unit sent along (one-hop
        # handover); the victim stops at 0.1, and u, already late, takes the worker as sent.
        ("block", ("long", 0.0, 1000, 6.0, "file"), ("u", 0.01, 50, 0.1), "u"),
        # Both late at the stop (0.2 s, layer granularity): the later deadline (u) goes first.
        ("layer", ("long", 0.0, 1000, 0.05, "file"), ("u", 0.06, 50, 0.1), "u"),
    ],
)
def test_waiting_for_the_victim_to_reach_its_checkpoint_is_preemption_latency(
    granularity, victim, urgent, worker_went_to
):
    _, timeline = simulate([req(*victim), req(*urgent)], sim={"granularity": granularity})
    export = timeline.export(None)
    victim_unit = next(u for u in export["units"] if u["members"][0]["request_id"] == "long")
    took = victim_unit["pauses"][0]["by_unit"]
    assert (
        next(u for u in export["units"] if u["unit_id"] == took)["members"][0]["request_id"]
        == worker_went_to
    )
    assert causes(timeline)["u"] == "preemption_latency"


def test_serving_overhead_from_the_simulator_and_from_note_client_ttft():
    # The scheduler's TTFT is 0.2 s for a 0.25 s target; 0.1 s on the serving path makes it late.
    _, timeline = simulate([req("s", 0.0, 500, 0.25)], sim={"response_overhead_s": 0.1})
    assert causes(timeline) == {"s": "serving_overhead"}
    _, timeline = simulate([req("s", 0.0, 500, 0.25)])
    assert causes(timeline) == {}
    assert timeline.note_client_ttft("s", 0.26)
    verdict = why_late(timeline.export(None))[0]
    assert verdict["cause"] == "serving_overhead"
    assert verdict["scheduler_ttft_s"] == pytest.approx(0.2) and verdict["ttft_s"] == 0.26
    assert not timeline.note_client_ttft("never-seen", 0.1)


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def conv_sample():
    """200 requests of the Azure conversation trace with the paper's four classes."""
    return assign_slo_classes(
        load_builtin("azure_2023_conv").head(200), SLOAssignmentConfig(seed=1)
    ).to_requests()


@pytest.mark.parametrize("name", ["flowprefill", "fcfs", "edf", "chunked"])
def test_the_timeline_agrees_with_the_simulator_and_every_miss_gets_one_cause(name, conv_sample):
    sim = {"num_workers": 2}
    if name == "flowprefill":
        sim["kv_budget"] = KVBudget.of_tokens(3000)  # 3000 paused tokens: some evictions
    result, timeline = simulate(conv_sample, name=name, sim=sim)
    export = timeline.export(None)
    outcomes = {o.request_id: o for o in result.outcomes}
    assert len(export["requests"]) == len(conv_sample)
    for r in export["requests"]:
        assert r["status"] == "finished"
        assert r["ttft_s"] == pytest.approx(outcomes[r["request_id"]].ttft_s, abs=1e-9)
    for u in export["units"]:
        assert len(u["pauses"]) == len(u["runs"]) - (u["outcome"] == "completed")
        if u["outcome"] == "completed":  # no overheads: run spans are the compute
            assert sum(e - s for s, e in u["runs"]) == pytest.approx(u["actual_s"], abs=1e-9)
    pauses = sum(len(u["pauses"]) for u in export["units"])
    assert pauses == sum(w.pauses for w in result.workers)
    verdicts = why_late(export)
    assert {v["request_id"] for v in verdicts} == {
        o.request_id for o in result.outcomes if not o.met_slo
    }
    table = summarize(export, verdicts)["rows"]
    assert table["all"]["missed"] == len(verdicts) == sum(table["all"][c] for c in CAUSES)
    for cls in {o.slo_class for o in result.outcomes}:
        assert table[cls]["missed"] == sum(table[cls][c] for c in CAUSES)
    if name == "flowprefill":
        assert result.evictions > 0  # discarded units and re-queued requests were recorded
        assert any(r["requeues"] for r in export["requests"])


def test_a_timeline_does_not_change_the_simulation(conv_sample):
    p = make_policy(PolicyConfig(name="flowprefill"), fresh_copy(PREDICTOR))
    plain = Simulator(p, ROUND, SimulatorConfig(num_workers=2)).run(conv_sample)
    p = make_policy(PolicyConfig(name="flowprefill"), fresh_copy(PREDICTOR))
    traced = Simulator(p, ROUND, SimulatorConfig(num_workers=2), Timeline.for_policy(p)).run(
        conv_sample
    )
    assert [o.ttft_s for o in plain.outcomes] == [o.ttft_s for o in traced.outcomes]
    assert plain.decisions == traced.decisions


def test_memory_is_a_ring_of_finished_requests_plus_the_live_ones(conv_sample):
    gc.collect()
    before = sum(type(o) is UnitTrace for o in gc.get_objects())
    result, timeline = simulate(conv_sample, capacity=25, sim={"num_workers": 2})
    assert len(timeline) == 25 and timeline.live_requests == 0
    export = timeline.export(None)
    kept = [r["request_id"] for r in export["requests"]]
    finish = {o.request_id: o.arrival_s + o.ttft_s for o in result.outcomes}
    dropped = set(finish) - set(kept)
    assert min(finish[k] for k in kept) >= max(finish[d] for d in dropped)  # the last 25 done
    arrival = {o.request_id: o.arrival_s for o in result.outcomes}
    assert [arrival[k] for k in kept] == sorted(arrival[k] for k in kept)  # in arrival order
    assert [r["request_id"] for r in timeline.export(10)["requests"]] == kept[-10:]
    gc.collect()
    units = sum(type(o) is UnitTrace for o in gc.get_objects()) - before
    assert units <= len(export["units"])  # finished units die with the requests that held them


def test_the_export_round_trips_through_json(conv_sample):
    _, timeline = simulate(conv_sample[:60], sim={"num_workers": 2, "granularity": "layer"})
    export = timeline.export(40)
    assert json.loads(json.dumps(export)) == export
    assert why_late(json.loads(json.dumps(export))) == why_late(export)
    assert all(
        "prompt" not in key or key == "prompt_tokens" for r in export["requests"] for key in r
    )


# ----------------------------------------------------------------------------- by hand


def test_lost_workers_cancels_rejections_and_downgrades_are_recorded():
    p = policy(workers=2, admission={"action": "reject", "estimate": "alone"})
    timeline = Timeline.for_policy(p)

    def step(event, now):
        timeline.record(event, now, p.on_event(event, now))

    def come(rid, now, tokens, slo_s):
        decisions = arrive(p, rid, now, tokens, slo_s)
        timeline.record(Arrival(p.requests[rid].request), now, decisions)

    come("a", 0.0, 512, 2.0)  # runs on w0 (0.5 s predicted)
    come("b", 0.0, 512, 1.0)  # runs on w1; due before a, so a never preempts it
    come("c", 0.0, 512, 2.0)  # waits
    come("nope", 0.0, 4096, 1.0)  # 4 s alone for a 1 s target: rejected
    step(Cancelled("c"), 0.1)
    step(WorkerLeft("w0"), 0.2)  # a's unit is lost; a waits for w1
    step(UnitCompleted("w1", 2, 0.5), 0.5)  # b finishes; a starts on w1 (unit 3)
    step(UnitCompleted("w1", 3, 0.5), 1.0)
    export = timeline.export(None)
    by_id = {r["request_id"]: r for r in export["requests"]}
    assert by_id["nope"]["status"] == "rejected" and by_id["nope"]["reason"]
    assert by_id["c"]["status"] == "cancelled" and by_id["c"]["units"] == []
    assert by_id["a"]["requeues"] == [{"at_s": 0.2, "why": "worker_left"}]
    assert [u["unit_id"] for u in by_id["a"]["units"]] == [1, 3]
    assert by_id["a"]["first_token_s"] == 1.0 and by_id["a"]["status"] == "finished"
    lost = next(u for u in export["units"] if u["unit_id"] == 1)
    assert lost["outcome"] == "lost" and lost["runs"] == [[0.0, 0.2]]
    table = summarize(export)["rows"]["text"]
    assert (table["rejected"], table["cancelled"], table["finished"]) == (1, 1, 2)


# ----------------------------------------------------------------------------- chart and CLI


def test_the_timeline_command_prints_the_causes_and_draws_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    requests = [req("h", 0.0, 500, 0.3), req("u1", 0.01, 250, 0.15)]
    requests += [req("u2", 0.14, 250, 0.15), req("u3", 0.2, 250, 0.15), req("x", 0.3, 1000, 0.2)]
    _, timeline = simulate(requests, sim={"num_workers": 2})
    timeline.save(tmp_path / "timeline.json")
    assert cli(["timeline", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for cause in CAUSES:
        assert cause in out
    assert "infeasible_at_arrival" in out.split("missed requests")[1]  # x is listed
    png = (tmp_path / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli(["timeline", str(tmp_path / "missing.json")]) == 2


def test_the_text_table_has_a_row_per_cause_and_a_column_per_class():
    _, timeline = simulate([req("x", 0.0, 1000, 0.2), req("y", 0.5, 100, 6.0, "file")])
    text = format_summary(summarize(timeline.export(None)))
    header, *rows = text.splitlines()
    assert header.split() == ["all", "file", "text"]
    assert [r.split()[0] for r in rows][-len(CAUSES) :] == list(CAUSES)
    assert next(r for r in rows if r.startswith("infeasible_at_arrival")).split()[1:] == [
        "1",
        "0",
        "1",
    ]


def test_why_late_runs_keeps_each_trials_causes_and_where_its_misses_turned_late(tmp_path):
    """scripts/why_late_runs.py: what the docs cite of a run's git-ignored timelines."""
    runs = load_script("scripts/why_late_runs.py")
    requests = [req("h", 0.0, 500, 0.3), req("u1", 0.01, 250, 0.15)]
    requests += [req("u2", 0.14, 250, 0.15), req("u3", 0.2, 250, 0.15)]
    _, timeline = simulate(requests)  # h: paused, turns late while paused, then stalls
    timeline.save(tmp_path / "timeline.json")
    out = tmp_path / "why_late.json"
    assert runs.main([str(tmp_path / "timeline.json"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (trial,) = report["trials"].values()
    assert trial["summary"]["all"]["missed"] == 1
    assert trial["summary"]["text"]["paused_after_late"] == 1
    assert trial["misses_by_class_turned_late_in_cause"] == {"text/paused/paused_after_late": 1}
    assert trial["paused_after_late_stalled_s_median"] == pytest.approx(0.2)
    assert report["command"].endswith(f"--out {out}") and report["commit"]
