"""The vLLM peer comparison's own logic, without vLLM: which systems a command line runs, what
each request carries, how vLLM is started and bound, and how steady trials become a goodput.

The run itself (vLLM installed, both servers up) is ``benchmarks/peer_vllm.py --smoke``;
docs/BENCHMARKS.md, "vLLM on CPU as a peer".
"""

from __future__ import annotations

import json

import pytest
from local_http import serving
from repo_scripts import load_script
from test_loadgen import PREFILL_S_PER_TOKEN, StreamingServer

from flowprefill_ray.scheduling.slo import SLOConfig
from loadgen import EndpointConfig, PlannedRequest, ReplayConfig
from loadgen.client import request_body
from loadgen.plan import load_trace_workload, plan_requests, ttft_targets

peer = load_script("benchmarks/peer_vllm.py")
steady = load_script("benchmarks/peer_steady.py")
vllm_server = load_script("benchmarks/vllm_server.py")


def test_every_vllm_policy_runs_once_per_swept_token_budget_and_the_reference_first():
    args = peer.parse_args(["--max-num-batched-tokens", "256,1024", "--max-num-seqs", "4"])
    chosen = peer.systems(args)
    # vLLM fcfs (work-conserving, no admission control) sets the grid: its sessions go first.
    assert [name for name, _ in chosen] == [
        "vllm-fcfs-mnbt256",
        "flowprefill",
        "vllm-priority-mnbt256",
        "vllm-priority-mnbt1024",
        "vllm-fcfs-mnbt1024",
    ]
    assert chosen[1][1] == peer.OurFlags()
    assert {f.max_num_seqs for _, f in chosen if isinstance(f, vllm_server.VllmFlags)} == {4}
    ours_first = peer.systems(peer.parse_args(["--reference", "flowprefill"]))
    assert ours_first[0][0] == "flowprefill"
    with pytest.raises(ValueError, match="sglang"):
        peer.systems(peer.parse_args(["--systems", "flowprefill,sglang"]))
    with pytest.raises(ValueError, match="--reference 'vllm-fcfs'"):
        peer.systems(peer.parse_args(["--systems", "flowprefill,vllm-priority"]))


def test_our_policy_json_reaches_every_one_of_our_systems_and_bad_json_is_a_usage_error(capsys):
    args = peer.parse_args(
        ["--systems", "flowprefill,flowprefill-giveup", "--reference", "flowprefill"]
        + ["--our-policy-json", '{"late_grace": true}']
    )
    for _, flags in peer.systems(args):
        policy = peer.our_app_args(4.0, flags)["runtime"]["policy"]
        assert policy["late_grace"] is True
    shipped = peer.our_app_args(4.0, peer.OurFlags())["runtime"]["policy"]
    assert shipped["late_grace"] is False
    for bad, says in (("{late", "is not JSON"), ("[1]", "must be a JSON object")):
        with pytest.raises(SystemExit):
            peer.parse_args(["--our-policy-json", bad])
        assert says in capsys.readouterr().err
    with pytest.raises(ValueError, match="late_grce"):  # a misspelt field: pydantic names it
        peer.our_app_args(4.0, peer.OurFlags(policy={"late_grce": True}))
    # why_late_replay.py's --policy-json goes through the same parser.
    replay = load_script("benchmarks/why_late_replay.py")
    assert replay.parse_args(["--label", "a", "--policy-json", '{"late_grace": true}']).policy == {
        "late_grace": True
    }
    with pytest.raises(SystemExit):
        replay.parse_args(["--label", "a", "--policy-json", "[1]"])
    assert "--policy-json must be a JSON object" in capsys.readouterr().err


def test_an_our_variant_runs_beside_the_shipped_app_under_its_own_name():
    args = peer.parse_args(
        ["--systems", "flowprefill,flowprefill+grace", "--reference", "flowprefill"]
        + ["--our-policy-json", '{"late_give_up_factor": 2.0}']
        + ["--our-variant", 'grace={"late_grace": true}']
    )
    (shipped_name, shipped), (variant_name, variant) = peer.systems(args)
    assert (shipped_name, variant_name) == ("flowprefill", "flowprefill+grace")
    shipped_policy = peer.our_app_args(4.0, shipped)["runtime"]["policy"]
    variant_policy = peer.our_app_args(4.0, variant)["runtime"]["policy"]
    # The variant's fields go over --our-policy-json's, which both systems keep.
    assert (shipped_policy["late_grace"], variant_policy["late_grace"]) == (False, True)
    assert shipped_policy["late_give_up_factor"] == variant_policy["late_give_up_factor"] == 2.0
    with pytest.raises(ValueError, match="flowprefill\\+grace"):  # not given: not offered
        peer.systems(peer.parse_args(["--systems", "flowprefill+grace"]))
    with pytest.raises(SystemExit, match="given twice"):
        peer.parse_args(["--our-variant", "a={}", "--our-variant", "a={}"])


def test_the_prefix_system_is_the_shipped_app_with_the_cache_on_and_priced_by_the_policy():
    args = peer.parse_args(
        ["--systems", "flowprefill,flowprefill-prefix", "--reference", "flowprefill"]
        + ["--prefix-block-tokens", "32"]
    )
    (plain, plain_flags), (cached, cached_flags) = peer.systems(args)
    assert (plain, cached) == ("flowprefill", "flowprefill-prefix")
    off = peer.our_app_args(4.0, plain_flags)["runtime"]
    on = peer.our_app_args(4.0, cached_flags)["runtime"]
    assert not off["prefill"]["prefix_cache"]["enabled"] and not off["policy"]["prefix"]["enabled"]
    assert on["prefill"]["prefix_cache"] == {**off["prefill"]["prefix_cache"], "enabled": True,
                                             "block_tokens": 32}  # fmt: skip
    assert on["policy"]["prefix"]["enabled"] and on["policy"]["prefix"]["block_tokens"] == 32
    # Everything else is the shipped app, the same for both.
    for key in ("model", "placement", "slo", "requests"):
        assert on[key] == off[key]
    assert {k: v for k, v in on["policy"].items() if k != "prefix"} == {
        k: v for k, v in off["policy"].items() if k != "prefix"
    }
    results = {
        "flowprefill": {"goodput_rps": 1.5},
        "flowprefill-prefix": {"goodput_rps": 3.0},
    }
    assert peer.goodput_ratios(results)["goodput_ratio_prefix_cache"] == 2.0
    assert peer.goodput_ratios({"flowprefill": {"goodput_rps": 0.0}})[
        "goodput_ratio_prefix_cache"
    ] is None  # fmt: skip
    # A scheduler restarted during a trial counts from zero: its reading is the increase.
    assert peer.counts_over({"submitted": 10, "rejected": 2}, {"submitted": 15, "rejected": 1}) == {
        "submitted": 5,
        "rejected": 1,
    }


def test_the_giveup_systems_change_only_the_policys_late_give_up_factor():
    args = peer.parse_args(
        ["--systems", "flowprefill,flowprefill-giveup,flowprefill-prefix-giveup"]
        + ["--reference", "flowprefill", "--late-give-up-factor", "0.5"]
    )
    chosen = peer.systems(args)
    assert [name for name, _ in chosen] == [
        "flowprefill",
        "flowprefill-giveup",
        "flowprefill-prefix-giveup",
    ]
    shipped, giveup, both = (peer.our_app_args(4.0, flags)["runtime"] for _, flags in chosen)
    assert shipped["policy"]["late_give_up_factor"] is None  # off as shipped
    assert giveup["policy"] == {**shipped["policy"], "late_give_up_factor": 0.5}
    assert {k: v for k, v in giveup.items() if k != "policy"} == {
        k: v for k, v in shipped.items() if k != "policy"
    }
    assert (
        both["policy"]["late_give_up_factor"] == 0.5 and both["prefill"]["prefix_cache"]["enabled"]
    )
    with pytest.raises(ValueError, match="flowprefill-giveup"):
        peer.systems(peer.parse_args(["--systems", "flowprefill-late"]))


def test_smoke_is_one_short_low_rate_session_and_the_full_run_keeps_the_steady_rules():
    smoke = peer.parse_args(["--smoke", "--repeats", "5"])
    assert (smoke.smoke, smoke.repeats, smoke.fractions, smoke.min_requests) == (True, 1, "0.3", 0)
    assert [name for name, _ in peer.systems(smoke)] == [
        "vllm-fcfs-mnbt512",
        "flowprefill",
        "vllm-priority-mnbt512",
    ]
    with pytest.raises(SystemExit):
        peer.parse_args(["--smoke", "--out", "docs/results/peer_vllm_cpu.json"])
    full = peer.parse_args([])
    assert (full.min_steady_s, full.min_requests, full.repeats) == (180.0, 300, 2)
    assert full.max_output_tokens == 8 and full.max_prompt_tokens == 384


def _body(flags, slo_class: str) -> dict:
    slo = SLOConfig(scale=4)
    endpoint = EndpointConfig(
        base_url="http://127.0.0.1:1",
        model="m",
        send_slo=False,
        priority=peer.request_priorities(flags, slo),
    )
    planned = PlannedRequest("r0", 0.0, 12, 8, slo_class, 1.0)
    return request_body(endpoint, ReplayConfig(), planned)


def test_under_vllms_priority_policy_each_class_carries_its_rank_and_fcfs_carries_none():
    priority = vllm_server.VllmFlags(scheduling_policy="priority")
    fcfs = vllm_server.VllmFlags(scheduling_policy="fcfs")
    by_class = {c: _body(priority, c)["priority"] for c in ("text", "image", "search", "file")}
    assert by_class == {"text": 0, "image": 1, "search": 2, "file": 3}
    # vLLM refuses a non-zero priority under fcfs; ours reads slo_class, not priority.
    assert "priority" not in _body(fcfs, "file")
    assert peer.request_priorities(peer.OurFlags(), SLOConfig()) is None
    assert "slo_class" not in _body(priority, "text")


def test_vllm_listens_on_loopback_with_the_recorded_flags_and_binding(tmp_path):
    flags = vllm_server.VllmFlags(
        max_num_batched_tokens=256, max_num_seqs=4, scheduling_policy="fcfs", kvcache_gib=2
    )
    command = vllm_server.server_command(tmp_path, "SmolLM2", 8123, flags, venv=tmp_path)
    assert command[:3] == [
        str(tmp_path / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]
    pairs = {command[i]: command[i + 1] for i in range(3, len(command) - 1)}
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "8123"
    assert pairs["--dtype"] == "float32" and pairs["--max-num-batched-tokens"] == "256"
    assert pairs["--max-num-seqs"] == "4" and pairs["--scheduling-policy"] == "fcfs"
    assert {"--enforce-eager", "--enable-chunked-prefill"} <= set(command)
    env = vllm_server.server_environment(flags)
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    log = (
        "(EngineCore pid=1) INFO [ompmultiprocessing.py:185] OpenMP thread binding info: \n"
        "(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]\n"
        "(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \treserved_cpus=[1]\n"
    )
    assert vllm_server.thread_binding_from_log(log) == {
        "omp_core_ids": ["[0]"],
        "reserved_cpus": "[1]",
    }
    assert vllm_server.thread_binding_from_log("no such line") == {}
    assert peer.parse_cpu_list("0-2,5") == {0, 1, 2, 5}


def test_a_trial_window_holds_the_target_rate_of_the_trace():
    slo = SLOConfig(scale=4)
    replay = ReplayConfig(trace="azure-conv", prompt_scale=0.1)
    offsets = steady.trace_offsets_s(replay, slo)
    rules = steady.SteadyRules(min_steady_s=60, min_requests=100, warmup_s=10)
    assert rules.sending_s(0.5) == 10 + 200  # 100 requests at 0.5 req/s need 200 s
    assert rules.sending_s(4.0) == 10 + 60
    for rate in (0.5, 2.0, 6.0):
        sending = rules.sending_s(rate)
        scale = steady.rate_scale_for(offsets, rate, sending)
        sent = sum(1 for t in offsets if t / scale < sending)
        assert abs(sent / sending - rate) <= 1.5 / sending, (rate, sent)
    with pytest.raises(ValueError, match="needs"):
        steady.rate_scale_for(offsets[:10], 1.0, 100.0)


def test_the_grid_is_fractions_of_the_capacity_rounded_and_ascending():
    assert steady.grid_rates(3.0, [1.0, 0.4, 0.6]) == [1.2, 1.8, 3.0]


def test_ratios_compare_ours_with_the_best_budget_of_each_vllm_policy():
    results = {
        "flowprefill": {"goodput_rps": 3.0},
        "vllm-priority-mnbt256": {"goodput_rps": 1.0},
        "vllm-priority-mnbt1024": {"goodput_rps": 1.5},
        "vllm-fcfs-mnbt256": {"goodput_rps": 0.0},
    }
    ratios = peer.goodput_ratios(results)
    assert ratios["goodput_ratio_vs_vllm_priority"] == 2.0
    assert ratios["best_vllm_priority"] == "vllm-priority-mnbt1024"
    assert ratios["goodput_ratio_vs_vllm_fcfs"] is None  # vLLM fcfs held no rate of the grid


def test_aiperfs_ttft_is_read_from_its_export_and_set_beside_ours(tmp_path):
    aiperf = load_script("benchmarks/peer_aiperf.py")
    assert aiperf.aiperf_ttft_ms(tmp_path) is None  # aiperf failed: nothing exported
    # The layout aiperf 0.13 wrote in the smoke run (profile_export_aiperf.json), trimmed.
    export = {
        "schema_version": "1",
        "request_latency": {"unit": "ms", "avg": 2000.0, "p50": 1900.0, "p99": 2500.0},
        "time_to_first_token": {
            "unit": "ms",
            "avg": 901.5,
            "p50": 1040.4,
            "p90": 1184.8,
            "p99": 1246.6,
        },
    }
    (tmp_path / "profile_export_aiperf.json").write_text(json.dumps(export))
    ttft = aiperf.aiperf_ttft_ms(tmp_path)
    assert ttft == {"avg": 901.5, "p50": 1040.4, "p90": 1184.8, "p99": 1246.6}
    trial = {"ttft_s": {"p50": 0.5, "p90": 1.0, "p99": None}}
    check = aiperf.cross_check({"ttft_ms": ttft}, trial)
    assert check["loadgen_ttft_ms"] == {"p50": 500.0, "p90": 1000.0, "p99": None}
    assert check["p50_ratio_aiperf_over_loadgen"] == pytest.approx(1040.4 / 500.0)
    assert aiperf.cross_check({"ttft_ms": None}, trial)["p50_ratio_aiperf_over_loadgen"] is None


@pytest.fixture(scope="module")
def sse_server():
    """test_loadgen's OpenAI-style SSE endpoint on 127.0.0.1: a first token after
    ``PREFILL_S_PER_TOKEN`` s per prompt token (model ``serial``: one prefill at a time)."""
    fake = StreamingServer()
    with serving(fake.app(), "the local SSE server") as url:
        fake.url = url
        yield fake


def test_a_steady_trial_sends_its_rate_and_judges_only_requests_after_the_warm_up(
    sse_server, tmp_path
):
    slo = SLOConfig(scale=4)
    replay = ReplayConfig(
        trace="azure-conv", prompt_scale=0.1, max_prompt_tokens=64, max_output_tokens=2
    )
    endpoint = EndpointConfig(base_url=sse_server.url, model="fake", ignore_eos=True)
    rules = steady.SteadyRules(min_steady_s=3.0, min_requests=8, warmup_s=1.0)
    offsets = steady.trace_offsets_s(replay, slo)
    trial = steady.steady_trial(endpoint, replay, slo, 4.0, rules, offsets, tmp_path)
    assert trial["sending_s"] == 4.0 and trial["meets_rules"]
    assert abs(trial["sent"] - 16) <= 1  # 4 req/s for 4 s
    # Requests sent in the first second (the trace's first one at 0 s at least) are left out.
    records = json.loads((tmp_path / "results.json").read_text())["requests"]
    after_warmup = [r for r in records if r["sent_s"] is not None and r["sent_s"] >= 1.0]
    assert trial["steady_requests"] == len(after_warmup) < trial["sent"]
    # <= 64 tokens at 2 ms each: every first token within the tightest target (1 s).
    assert trial["attainment"] == 1.0 and trial["stable"]
    assert 0 < trial["ttft_s"]["p50"] <= trial["ttft_s"]["p99"] < 1.0
    assert set(trial["per_class"]) <= {"text", "image", "search", "file"}
    # A server without a scheduler timeline (vLLM, this one) leaves no timeline.json behind,
    # nor per-hop stamps to split its TTFT with.
    assert not (tmp_path / "timeline.json").exists() and "ttft_path" not in trial
    # The CPU of the trial: this process (client and the fake server) spent some.
    assert trial["cpu"]["wall_s"] >= 3.0 and trial["cpu"]["cpu_s_total"] > 0


def test_capacity_is_what_a_serial_server_gets_through_a_burst(sse_server):
    slo = SLOConfig(scale=4)
    replay = ReplayConfig(
        trace="azure-conv", prompt_scale=0.1, max_prompt_tokens=200, max_output_tokens=1
    )
    endpoint = EndpointConfig(base_url=sse_server.url, model="serial", ignore_eos=True)
    measured = steady.measure_capacity(endpoint, replay, slo, requests=10)
    burst = plan_requests(
        load_trace_workload("azure-conv"),
        replay.model_copy(update={"max_requests": 10}),
        ttft_targets(slo),
    )
    serial_s = sum(p.prompt_tokens for p in burst) * PREFILL_S_PER_TOKEN
    assert measured["served"] == 10 and measured["rejected"] == 0
    # One prefill at a time: the burst cannot end before the prefills' sum.
    assert measured["span_s"] >= serial_s
    assert 0.5 * 10 / (serial_s + 1.0) < measured["capacity_rps"] <= 10 / serial_s
