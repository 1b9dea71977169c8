"""Regressions for defects the HTTP fuzz test (tests/test_api_fuzz.py) found, each checked
directly at the layer where it was fixed."""

from __future__ import annotations

import torch

from flowprefill_ray.model.sampling import SamplingParams, sample, sample_with_params


def test_a_vanishingly_small_temperature_samples_greedily_instead_of_failing():
    # Found by the fuzzer: temperature=1.77e-53 is 0 in float32, logits / 0 gave NaN
    # probabilities and torch.multinomial raised inside the prefill worker (HTTP 500).
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.5, 2.9]])
    for temperature in (1.7723516818492382e-53, 1e-30, 1e-8):
        tokens = sample(logits, [temperature, temperature], [1.0, 1.0])
        assert tokens.tolist() == [1, 0]
    params = [SamplingParams(temperature=1e-53, seed=3), SamplingParams(temperature=0.0)]
    assert sample_with_params(logits, params).tolist() == [1, 0]
    assert params[0].greedy


def test_ordinary_temperatures_still_sample():
    logits = torch.zeros(1, 50)
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, [1.0], [1.0], [generator])[0]) for _ in range(40)}
    assert len(draws) > 10  # uniform logits: many different tokens, not an argmax
