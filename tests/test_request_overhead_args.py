"""benchmarks/request_overhead.py without running it: its command line and how it splits a
request's TTFT into hops (the live path is measured by the benchmark itself)."""

from __future__ import annotations

import pytest
from repo_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    load_script("benchmarks/cli_json.py")  # the script imports its sibling by name
    return load_script("benchmarks/request_overhead.py")


def test_defaults_are_the_issue_sizes_twenty_repeats_and_both_shapes(bench):
    args = bench.parse_args([])
    assert args.sizes == [16, 128, 512] and args.repeats >= 20
    assert args.shapes == ["max1", "stream2"]
    assert args.out == "results/request_overhead.json"
    args = bench.parse_args(["--sizes", "32", "--repeats", "2", "--shapes", "stream2"])
    assert args.sizes == [32] and args.repeats == 2 and args.shapes == ["stream2"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--sizes", "16,x"],
        ["--sizes", "0"],
        ["--shapes", "max3"],
        ["--repeats", "0"],
        ["--ray-env", "RAY_SERVE_THROUGHPUT_OPTIMIZED"],
        ["--ray-env", "=1"],
        ["--runtime-json", "{placement"],
        ["--runtime-json", "[1]"],
    ],
)
def test_bad_arguments_are_refused(bench, argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(argv)
    assert stopped.value.code == 2 and "error" in capsys.readouterr().err


def test_ray_env_is_parsed_without_touching_the_environment(bench, monkeypatch):
    # main() applies it just before Ray starts (Ray's processes inherit that environment);
    # parsing alone changes nothing.
    monkeypatch.setenv("FLOWPREFILL_TEST_SWITCH", "before")  # restored after the test
    args = bench.parse_args(["--ray-env", "FLOWPREFILL_TEST_SWITCH=a=b"])
    assert args.ray_env == ["FLOWPREFILL_TEST_SWITCH=a=b"]
    assert args.ray_env_vars == {"FLOWPREFILL_TEST_SWITCH": "a=b"}
    assert bench.os.environ["FLOWPREFILL_TEST_SWITCH"] == "before"


def test_hops_are_split_in_path_order_skipping_those_not_passed(bench):
    hops = {
        "client_received": 1.030,
        "http_received": 1.002,
        "client_sent": 1.000,
        "engine_submit": 1.004,
        "engine_first_token": 1.025,
        "first_chunk": 1.026,
    }
    gaps = bench.hop_segments(hops)
    assert list(gaps) == [
        "client_sent->http_received",
        "http_received->engine_submit",
        "engine_submit->engine_first_token",
        "engine_first_token->first_chunk",
        "first_chunk->client_received",
    ]
    assert sum(gaps.values()) == pytest.approx(0.030)
