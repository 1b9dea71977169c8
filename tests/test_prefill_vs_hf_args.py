"""benchmarks/prefill_vs_hf.py without running it: its command line (the run, a minute, is the
benchmark itself; docs/results/prefill_vs_hf.json)."""

from __future__ import annotations

import pytest
from repo_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/prefill_vs_hf.py")


def test_defaults_time_the_shipped_prefill_shape(bench):
    args = bench.parse_args([])
    assert args.tokens == [16, 128, 384] and args.threads == 1 and args.repeats == 7
    assert bench.parse_args(["--tokens", "32"]).tokens == [32]


@pytest.mark.parametrize("argv", [["--tokens", "16,x"], ["--tokens", "0"], ["--repeats", "0"]])
def test_bad_arguments_are_refused(bench, argv):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_server_mode_is_opt_in(bench):
    assert not bench.parse_args([]).servers and bench.parse_args(["--servers"]).servers
    assert bench.parse_args([]).our_cpu_matmul is None
    assert bench.parse_args(["--our-cpu-matmul", "onednn"]).our_cpu_matmul == "onednn"
    with pytest.raises(SystemExit):
        bench.parse_args(["--our-cpu-matmul", "mkl"])


def test_prompts_of_two_salts_share_no_prefix_while_one_salt_nests(bench):
    # Why every lone request takes a fresh salt: the same salt's shorter prompt is a prefix of
    # its longer one, which a prefix cache (vLLM's is on by default) would answer from KV.
    first, second = bench.prompt_ids(64, 49152, salt=1), bench.prompt_ids(64, 49152, salt=2)
    assert len(first) == len(second) == 64
    assert all(a != b for a, b in zip(first, second, strict=True))
    assert all(5 <= t < 49152 - 5 for t in first + second)
    assert bench.prompt_ids(16, 49152, salt=1) == first[:16]
