"""benchmarks/ingress_scaling.py without running it: its command line and the app it deploys
(the live run, a few minutes, is the benchmark itself; a smoke run is in its commit)."""

from __future__ import annotations

import pytest
from repo_scripts import load_script

from flowprefill_ray.serve.config import ServeAppArgs


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/ingress_scaling.py")


def test_defaults_compare_one_replica_with_two_on_short_streamed_outputs(bench):
    args = bench.parse_args([])
    assert args.replicas == [1, 2] and args.max_tokens == 8
    assert args.out == "results/ingress_scaling.json"
    args = bench.parse_args(["--replicas", "2", "--concurrency", "4,16", "--seconds", "5"])
    assert args.replicas == [2] and args.concurrency == [4, 16] and args.seconds == 5.0
    # The app it deploys is a valid one, with the requested default output length.
    parsed = ServeAppArgs.model_validate(bench.app_args(args))
    assert parsed.api.default_max_tokens == 8 and parsed.runtime.model.path == "tiny"


@pytest.mark.parametrize(
    "argv",
    [
        ["--replicas", "1,x"],
        ["--replicas", "0"],
        ["--concurrency", ""],
        ["--seconds", "0"],
        ["--repeats", "0"],
    ],
)
def test_bad_arguments_are_refused(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_the_summary_compares_each_count_with_the_first_within_each_repeat(bench):
    rows = [
        {"repeat": rep, "replicas": n, "concurrency": 8, "requests_per_s": rate}
        for rep, n, rate in [(0, 1, 50.0), (0, 2, 45.0), (1, 1, 40.0), (1, 2, 44.0)]
    ]
    one, two = bench.summarize(rows, [1, 2])
    assert (one["replicas"], one["ratio_to_first_mean"], one["repeats"]) == (1, 1.0, 2)
    assert two["requests_per_s_mean"] == pytest.approx(44.5)
    assert two["requests_per_s_range"] == [44.0, 45.0]
    # 45/50 = 0.9 and 44/40 = 1.1: each repeat's own ratio, not a ratio of means
    assert two["ratio_to_first_range"] == pytest.approx([0.9, 1.1])
    assert two["ratio_to_first_mean"] == pytest.approx(1.0)
