"""benchmarks/baselines_sim.py on a small cut: every configuration searched in every window,
the ratio taken against the best baseline (never FlowPrefill's own ablations), provenance."""

from __future__ import annotations

import json

from repo_scripts import load_script


def test_baselines_sim_divides_flowprefill_by_the_best_baseline(tmp_path):
    load_script("benchmarks/provenance.py")  # the script imports its sibling by name
    bench = load_script("benchmarks/baselines_sim.py")
    out = tmp_path / "b.json"
    argv = [
        "--out",
        str(out),
        "--traces",
        "azure_2023_conv",
        "--requests",
        "80",
        "--workers",
        "1",
        "--chunk-sizes",
        "512",
        "--baseline-chunks",
        "512",
    ]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "baselines_sim" and report["commit"]
    assert "benchmarks/baselines_sim.py" in report["command"]
    roles = {name: c["role"] for name, c in report["configurations"].items()}
    assert roles["fp-operator"] == "ablation" and roles["edf_giveup-512"] == "baseline"
    assert report["configurations"]["fp-operator"]["granularity"] == "operator"
    windows = report["groups"]
    assert [w["window"] for w in windows] == [0, 1]
    # Two different cuts of the trace, each searched for every configuration.
    assert windows[0]["trace_rate_req_per_s"] != windows[1]["trace_rate_req_per_s"]
    assert all(set(w["policies"]) == set(roles) for w in windows)
    (summary,) = report["summaries"]
    mean = summary["mean_goodput_req_per_s"]
    for name in roles:
        got = [w["policies"][name]["goodput_req_per_s"] for w in windows]
        assert mean[name] == sum(got) / 2
    baselines = [n for n, r in roles.items() if r == "baseline"]
    best = summary["best_baseline"]
    assert best in baselines and mean[best] == max(mean[n] for n in baselines)
    assert summary["flowprefill_over_best"] == mean["flowprefill"] / mean[best]
    assert set(summary["ablation_over_flowprefill"]) == {
        n for n, r in roles.items() if r == "ablation"
    }
