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
