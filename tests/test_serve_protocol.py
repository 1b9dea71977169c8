"""The HTTP front end's pure parts: request validation, error format, SSE, SLO selection,
API key check and the body reader. The live-server behaviour is in test_serve_app.py."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from pydantic import ValidationError

from flowprefill_ray.engine_request import RequestLimits
from flowprefill_ray.errors import InvalidRequestError
from flowprefill_ray.sampling_params import SamplingParams
from flowprefill_ray.scheduling.slo import SLOConfig
from flowprefill_ray.serve.auth import APIKeyCheck
from flowprefill_ray.serve.errors import APIError, from_validation_error
from flowprefill_ray.serve.frontend import engine_error
from flowprefill_ray.serve.protocol import ChatCompletionRequest, CompletionRequest
from flowprefill_ray.serve.request_body import read_json_object
from flowprefill_ray.serve.slo_selection import RequestSLO, resolve_slo
from flowprefill_ray.serve.sse import DONE, sse_event

# The default SLO classes: text, image, search, file (text is the default class).
LIMITS = RequestLimits(
    vocab_size=100,
    context_tokens=64,
    max_prompt_tokens=63,
    max_output_tokens=32,
    decode_capacity_tokens=64,
    slo=SLOConfig(),
)


def slo_of(body_class, body_ms, headers):
    """(class, TTFT target in force) as the front end resolves them: the headers read by
    ``resolve_slo``, then the engine's one validator, its errors mapped to HTTP."""
    asked = resolve_slo(body_class, body_ms, headers)
    try:
        request = LIMITS.build(
            [1, 2],
            SamplingParams(max_tokens=1),
            slo_class=asked.slo_class,
            ttft_slo_s=asked.ttft_slo_s,
        )
    except InvalidRequestError as exc:
        raise engine_error(exc) from None
    return request.slo_class, request.ttft_slo_s


def status_of(body: dict, model=CompletionRequest) -> int:
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return from_validation_error(exc).status_code
    return 200


@pytest.mark.parametrize(
    "body, status",
    [
        ({"model": "m", "prompt": "hello"}, 200),
        ({"model": "m", "prompt": [1, 2, 3]}, 200),
        ({"model": "m", "prompt": ["one prompt"]}, 200),
        ({"model": "m", "prompt": ""}, 400),
        ({"model": "m", "prompt": []}, 400),
        ({"model": "m", "prompt": ["a", "b"]}, 400),
        ({"model": "m", "prompt": "x", "temperature": math.nan}, 400),
        ({"model": "m", "prompt": "x", "temperature": -0.5}, 400),
        ({"model": "m", "prompt": "x", "top_p": 0}, 400),
        ({"model": "m", "prompt": "x", "n": 2}, 400),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, 400),
        ({"model": "m", "prompt": "x", "ttft_slo_ms": -1}, 400),
        ({"model": "m", "prompt": "x", "logprobs": 2}, 400),
        ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
        ({"model": "m", "prompt": "x", "cache_salt": "tenant-a"}, 200),
        ({"model": "m", "prompt": "x", "cache_salt": ""}, 400),
        ({"model": "m", "prompt": "x", "cache_salt": "s" * 257}, 400),
        ({"model": "m", "prompt": "x", "cache_salt": 7}, 422),
        ({"model": "m", "prompt": "x", "cache_salt": ["a"]}, 422),
        ({"model": "m", "prompt": "x", "max_tokens": "10"}, 422),
        ({"model": "m", "prompt": "x", "stream": "yes"}, 422),
        ({"model": "m", "prompt": 7}, 422),
        ({"prompt": "x"}, 422),
    ],
)
def test_completion_bodies_map_bad_values_to_400_and_bad_types_to_422(body, status):
    assert status_of(body) == status


def test_unknown_vendor_fields_are_ignored_but_unsupported_openai_ones_refused():
    request = CompletionRequest.model_validate(
        {"model": "m", "prompt": "x", "some_vendor_flag": True, "logprobs": None, "echo": False}
    )
    assert request.prompt == "x"
    with pytest.raises(ValidationError, match="'echo' is not supported"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": True})


def test_chat_messages_flatten_text_parts_and_prefer_max_completion_tokens():
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "max_tokens": 5,
            "max_completion_tokens": 9,
        }
    )
    assert request.template_messages()[1] == {"role": "user", "content": "Hi there"}
    assert request.requested_max_tokens == 9
    assert status_of({"model": "m", "messages": []}, ChatCompletionRequest) == 400
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert status_of({"model": "m", "messages": [image]}, ChatCompletionRequest) == 422


@pytest.mark.parametrize("salt, status", [("t1", 200), ("", 400), ("s" * 257, 400), (1, 422)])
def test_chat_cache_salt_is_a_bounded_string(salt, status):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "cache_salt": salt}
    assert status_of(body, ChatCompletionRequest) == status
    if status != 200:
        with pytest.raises(ValidationError) as caught:
            ChatCompletionRequest.model_validate(body)
        assert from_validation_error(caught.value).param == "cache_salt"


def test_error_body_is_openai_shaped_and_retry_after_rounds_up():
    error = APIError(429, "busy", code="rejected", retry_after_s=1.2)
    assert error.body("r1") == {
        "error": {
            "message": "busy",
            "type": "rate_limit_error",
            "param": None,
            "code": "rejected",
            "request_id": "r1",
        }
    }
    assert error.headers["Retry-After"] == "2"


def test_validation_error_names_the_field():
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "temperature": -1})
    error = from_validation_error(info.value)
    assert error.param == "temperature" and "temperature" in error.message


def test_sse_events_are_single_data_lines():
    event = sse_event({"text": "a\nb"})
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert event.count("\n") == 2  # the newline inside the text is escaped by JSON
    assert json.loads(event[len("data: ") :]) == {"text": "a\nb"}
    assert DONE == "data: [DONE]\n\n"


def test_slo_from_body_then_header_then_default():
    assert resolve_slo(None, None, {}) == RequestSLO()
    assert resolve_slo(None, None, {"x-slo-class": "file"}) == RequestSLO("file")
    assert resolve_slo("image", None, {"x-slo-class": "file"}).slo_class == "image"
    assert resolve_slo(None, None, {"x-ttft-slo-ms": "150"}) == RequestSLO(None, 0.15)
    assert resolve_slo("search", 80.0, {}) == RequestSLO("search", 0.08)
    # Resolved once, by the validator: the default class, each class's own target, or the
    # explicit one under the class's label.
    assert slo_of(None, None, {}) == ("text", 0.25)
    assert slo_of(None, None, {"x-slo-class": "file"}) == ("file", 6.0)
    assert slo_of(None, None, {"x-ttft-slo-ms": "150"}) == ("text", 0.15)
    assert slo_of("search", 80.0, {}) == ("search", 0.08)


@pytest.mark.parametrize(
    "body_class, headers",
    [
        ("gold", {}),
        (None, {"x-slo-class": "gold"}),
        (None, {"x-ttft-slo-ms": "soon"}),
        (None, {"x-ttft-slo-ms": "-5"}),
        (None, {"x-ttft-slo-ms": "nan"}),
    ],
)
def test_bad_slo_is_a_400_that_says_what_is_allowed(body_class, headers):
    with pytest.raises(APIError) as info:
        slo_of(body_class, None, headers)
    assert info.value.status_code == 400
    if body_class or "x-slo-class" in headers:
        assert "known classes: file, image, search, text" in info.value.message


def test_api_key_check():
    APIKeyCheck(None).check(None)  # no key configured: open
    check = APIKeyCheck("s3cret")
    check.check("Bearer s3cret")
    for header in (None, "", "Bearer", "Basic s3cret", "Bearer s3cre", "Bearer s3cret2"):
        with pytest.raises(APIError) as info:
            check.check(header)
        assert info.value.status_code == 401
        assert info.value.headers["WWW-Authenticate"] == "Bearer"


def test_api_key_env_must_be_set_when_named(monkeypatch):
    monkeypatch.delenv("FLOWPREFILL_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="FLOWPREFILL_TEST_KEY"):
        APIKeyCheck.from_env("FLOWPREFILL_TEST_KEY")
    monkeypatch.setenv("FLOWPREFILL_TEST_KEY", "k")
    assert APIKeyCheck.from_env("FLOWPREFILL_TEST_KEY").enabled


def read(chunks: list[bytes], content_length: str | None = None, limit: int = 1024) -> dict:
    async def stream():
        for chunk in chunks:
            yield chunk

    return asyncio.run(read_json_object(stream(), content_length, limit))


def test_body_reader_limits_size_before_parsing():
    assert read([b'{"a":', b" 1}"]) == {"a": 1}
    consumed = []

    async def endless():
        while True:
            consumed.append(1)
            yield b"x" * 100

    with pytest.raises(APIError) as info:
        asyncio.run(read_json_object(endless(), None, 1024))
    assert info.value.status_code == 413 and len(consumed) == 11  # stopped just past the limit
    with pytest.raises(APIError) as info:
        read([b"{}"], content_length=str(10 << 20))
    assert info.value.status_code == 413


@pytest.mark.parametrize(
    "raw, status",
    [(b'{"a": "\xff\xfe"}', 400), (b'{"a": ', 422), (b"[1, 2]", 422), (b"", 422)],
)
def test_body_reader_rejects_bad_bytes_and_bad_json(raw, status):
    with pytest.raises(APIError) as info:
        read([raw])
    assert info.value.status_code == status


def test_nan_literal_parses_so_range_checks_can_name_it():
    body = read([b'{"model": "m", "prompt": "x", "temperature": NaN}'])
    assert status_of(body) == 400


def test_build_app_refuses_bad_args_at_deploy_time_naming_the_field():
    from flowprefill_ray.serve.app import build_app

    bad_args = [
        ({"runtime": {"placement": {"num_prefill_workers": 0}}}, "num_prefill_workers"),
        ({"runtime": {"policy": {"name": "lottery"}}}, "policy.name"),
        ({"runtime": {"slo": {"default_class": "gold"}}}, "default_class"),
        ({"api": {"api_key_env": "sk-live abc"}}, "api_key_env"),
        ({"api": {"max_body_bytes": 10}}, "max_body_bytes"),
        ({"runtime": {"model": {"path": "/nonexistent/model"}}}, "model.path"),
        ({"apii": {}}, "apii"),
    ]
    for args, field in bad_args:
        with pytest.raises(ValidationError) as info:
            build_app(args)
        assert field in str(info.value), (args, str(info.value))


def test_served_model_name_follows_the_model_source(tmp_path):
    from flowprefill_ray.serve.config import ServeAppArgs

    assert ServeAppArgs().served_model_name() == "flowprefill-tiny"
    assert (
        ServeAppArgs.model_validate({"runtime": {"model": {"path": "default"}}}).served_model_name()
        == "SmolLM2-135M-Instruct"
    )
    checkpoint = tmp_path / "my-llama"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    assert (
        ServeAppArgs.model_validate(
            {"runtime": {"model": {"path": str(checkpoint)}}}
        ).served_model_name()
        == "my-llama"
    )
    assert (
        ServeAppArgs.model_validate({"api": {"served_model_name": "prod"}}).served_model_name()
        == "prod"
    )
