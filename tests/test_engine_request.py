"""The one request validator (engine_request.py): each bound, the error it raises, and what a
valid request carries inward. The live paths through it (HTTP and the Python API) are in
test_serve_app.py and test_runtime_engine.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flowprefill_ray.engine_request import RequestLimits
from flowprefill_ray.errors import InvalidRequestError, PromptTooLongError
from flowprefill_ray.sampling_params import SamplingParams
from flowprefill_ray.scheduling.slo import SLOConfig

LIMITS = RequestLimits(
    vocab_size=100,
    context_tokens=64,
    max_prompt_tokens=40,
    max_output_tokens=32,
    decode_capacity_tokens=60,
    slo=SLOConfig(),
    request_timeout_s=30.0,
)
ONE = SamplingParams(max_tokens=1)


@pytest.mark.parametrize(
    "prompt, sampling, kwargs, error, param, code",
    [
        ([], ONE, {}, InvalidRequestError, "prompt", None),
        ([1, 100], ONE, {}, InvalidRequestError, "prompt", "invalid_token_id"),
        ([-1], ONE, {}, InvalidRequestError, "prompt", "invalid_token_id"),
        ([1] * 41, ONE, {}, PromptTooLongError, "prompt", "context_length_exceeded"),
        ([1] * 40, SamplingParams(max_tokens=22), {}, InvalidRequestError, "max_tokens", None),
        (
            [1] * 2,
            SamplingParams(max_tokens=33),
            {},
            InvalidRequestError,
            "max_tokens",
            "max_tokens_too_large",
        ),
        ([1], ONE, {"slo_class": "gold"}, InvalidRequestError, "slo_class", "unknown_slo_class"),
        ([1], ONE, {"ttft_slo_s": 0.0}, InvalidRequestError, "ttft_slo_ms", "invalid_ttft_slo"),
        (
            [1],
            ONE,
            {"ttft_slo_s": float("nan")},
            InvalidRequestError,
            "ttft_slo_ms",
            "invalid_ttft_slo",
        ),
        ([1], ONE, {"cache_salt": ""}, InvalidRequestError, "cache_salt", None),
        ([1], ONE, {"timeout_s": -1.0}, InvalidRequestError, "timeout_s", None),
    ],
)
def test_each_bound_names_its_field(prompt, sampling, kwargs, error, param, code):
    with pytest.raises(error) as info:
        LIMITS.build(prompt, sampling, **kwargs)
    assert type(info.value) is error
    assert (info.value.param, info.value.code) == (param, code)
    assert info.value.http_status == (413 if error is PromptTooLongError else 400)


def test_a_valid_request_carries_everything_resolved_once():
    request = LIMITS.build([5, 6, 7], SamplingParams(max_tokens=4), slo_class="search")
    assert request.prompt_ids == (5, 6, 7) and request.prompt_tokens == 3
    assert (request.slo_class, request.ttft_slo_s) == ("search", 4.0)
    assert request.timeout_s == 30.0 and request.cache_salt is None
    assert len(request.request_id) == 32  # a fresh uuid when none is given
    explicit = LIMITS.build([5], ONE, ttft_slo_s=0.08, request_id="r1", timeout_s=2.0)
    assert (explicit.request_id, explicit.slo_class, explicit.ttft_slo_s) == ("r1", "text", 0.08)
    assert explicit.timeout_s == 2.0
    with pytest.raises(AttributeError):
        explicit.slo_class = "file"  # frozen: passed inward unchanged


def test_default_max_tokens_stays_within_the_context_and_the_server_bound():
    assert LIMITS.default_max_tokens(10, 256) == 32
    assert LIMITS.default_max_tokens(50, 256) == 14
    assert LIMITS.default_max_tokens(10, 5) == 5


def test_the_validator_imports_neither_torch_nor_ray():
    code = (
        "import sys, flowprefill_ray.engine_request; "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
