"""The OpenAI-compatible HTTP API under random input and under a thousand connections at once.

A real Serve app (own name and actors) with the real engine and the tiny model on CPU, reached
over loopback HTTP. Hand-picked bad inputs are covered by tests/test_serve_app.py and
tests/test_serve_protocol.py; here hypothesis generates bodies and headers no one thought of.
The contract checked: every answer is a 200 or a 4xx carrying the OpenAI error object, never a
5xx, and a good request streaming meanwhile still completes.
"""

from __future__ import annotations

import asyncio
import json
import resource
import threading

import httpx
import pytest
from conftest_ray import free_port, tiny_runtime_args
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.ray

APP_NAME = "flowprefill-fuzz-test"
NAME_PREFIX = "fp-fuzz-test"
MODEL = "flowprefill-tiny"
# Small bounds keep every accepted fuzz request cheap (a few tokens of the tiny model).
MAX_OUTPUT_TOKENS = 8
# The engine's in-flight bound: far below the connection storm, so the storm meets it.
MAX_IN_FLIGHT = 48
STORM_CONNECTIONS = 1000
ERROR_KEYS = {"message", "type", "param", "code", "request_id"}


@pytest.fixture(scope="module")
def fuzz_url(ray_local, runtime_cache_dir):
    from ray import serve

    from flowprefill_ray.serve.app import build_app

    runtime = tiny_runtime_args(
        runtime_cache_dir,
        NAME_PREFIX,
        slo={"scale": 50.0},
        decode={"max_batch_size": 32},
        requests={
            "max_output_tokens": MAX_OUTPUT_TOKENS,
            "max_prompt_tokens": 512,
            "max_in_flight": MAX_IN_FLIGHT,
        },
    )
    args = {"runtime": runtime, "api": {"default_max_tokens": 4}}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete(APP_NAME)
    serve.shutdown()


# ----------------------------------------------------------------------------- strategies

# Issue 15's hostile inputs: integers far outside every numeric field's range (2**64 overflowed
# torch's seed inside a shared batch), strings with lone surrogates (the tokenizer raised),
# and strings or numbers where a boolean belongs ("false" was once read as true).
_huge_ints = st.sampled_from([2**63, 2**64, 10**40, -(2**63) - 1, -(10**40)]) | st.integers(
    min_value=-(2**200), max_value=2**200
)
_surrogate_text = st.builds(
    lambda a, s, b: a + s + b,
    st.text(max_size=5),
    st.sampled_from(["\ud800", "\udfff", "\ud83d", "\udc00\ud800"]),
    st.text(max_size=5),
)
_not_bools = st.sampled_from(["false", "true", "", 0, 1, 0.0, [], {}])
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | _surrogate_text
)
_json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "n", "stop", "seed", "stream", "stream_options", "user", "slo_class",
    "ttft_slo_ms", "ignore_eos", "logprobs", "echo", "best_of", "tools", "response_format",
]  # fmt: skip
# Values that pass validation often enough for the engine itself to be reached.
_plausible = {
    "model": st.sampled_from([MODEL, "gpt-4", ""]),
    "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 70000), max_size=8),
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                "content": st.text(max_size=20) | _json_values,
            }
        ),
        max_size=3,
    ),  # fmt: skip
    "max_tokens": st.integers(-2, 20) | _json_values,
    "temperature": st.floats(-1, 3) | _json_values,
    "stream": st.booleans() | _json_values,
    "slo_class": st.sampled_from(["text", "file", "nope"]) | _json_values,
    "ttft_slo_ms": st.floats(-10, 1e7) | _json_values,
}
_bodies = (
    st.fixed_dictionaries(
        {},
        optional={name: _plausible.get(name, _json_values) for name in _FIELDS},
    )
    | st.dictionaries(st.text(max_size=12), _json_values, max_size=6)
    | _json_values
)
# Nearly valid bodies (right model, a prompt or messages, in-range values most of the time),
# so that a good share of cases gets past validation into the engine and back.
_near_valid_options = {
    "max_tokens": st.integers(1, MAX_OUTPUT_TOKENS) | st.integers(-1, 40),
    "temperature": st.floats(0, 2) | st.floats(allow_nan=True),
    "top_p": st.floats(0.01, 1.0),
    "stream": st.booleans(),
    "seed": st.integers(0, 2**31),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
    "slo_class": st.sampled_from(["text", "image", "search", "file", "bogus"]),
    "ttft_slo_ms": st.floats(1, 1e6),
    "ignore_eos": st.booleans(),
}
# The same with one hostile value: each must be refused alone with a 4xx.
_hostile_values = {
    "max_tokens": _huge_ints,
    "temperature": _huge_ints,
    "top_p": _huge_ints,
    "n": _huge_ints,
    "seed": _huge_ints,
    "ttft_slo_ms": _huge_ints,
    "stream": _not_bools,
    "ignore_eos": _not_bools,
    "stop": st.lists(_surrogate_text, min_size=1, max_size=2),
    "user": _surrogate_text,
    "prompt": _surrogate_text,
}
_completion_bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL), "prompt": st.text(min_size=1, max_size=30)},
    optional=_near_valid_options,
)
_chat_bodies = st.fixed_dictionaries(
    {
        "model": st.just(MODEL),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=20)}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional=_near_valid_options,
)
_hostile_bodies = st.builds(
    lambda body, hostile: {**body, hostile[0]: hostile[1]},
    _completion_bodies,
    st.sampled_from(sorted(_hostile_values)).flatmap(
        lambda field: st.tuples(st.just(field), _hostile_values[field])
    ),
)
# (path, body, hostile): a hostile body must get a 4xx, never a 200.
_cases = (
    st.tuples(st.just("/v1/completions"), _completion_bodies, st.just(False))
    | st.tuples(st.just("/v1/completions"), _hostile_bodies, st.just(True))
    | st.tuples(st.just("/v1/chat/completions"), _chat_bodies, st.just(False))
    | st.tuples(
        st.sampled_from(["/v1/completions", "/v1/chat/completions"]), _bodies, st.just(False)
    )
)
# Printable ASCII; no surrounding blanks (the HTTP client itself refuses those).
_header_values = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30
).map(str.strip)
_headers = st.fixed_dictionaries(
    {},
    optional={
        "x-slo-class": _header_values,
        "x-ttft-slo-ms": _header_values | st.sampled_from(["100", "-1", "nan", "1e400"]),
        "content-type": st.sampled_from(["application/json", "text/plain", "", "x/y"]),
        "authorization": _header_values,
    },
)


def _check_answer(response: httpx.Response) -> None:
    status = response.status_code
    assert status < 500, (status, response.text[:500])
    if status == 200:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        else:
            assert response.json()["choices"], response.text[:300]
        return
    assert 400 <= status < 500
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"]
    if status == 429:
        assert int(response.headers["Retry-After"]) >= 1


class _GoodTraffic:
    """Well-formed streaming requests sent back to back while the fuzzing runs."""

    def __init__(self, url: str):
        self.url = url
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        body = {"model": MODEL, "prompt": "a good request", "max_tokens": MAX_OUTPUT_TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        with httpx.Client(base_url=self.url, timeout=60.0) as http:
            while not self._stop.is_set():
                response = http.post("/v1/completions", json=body)
                self.results.append((response.status_code, response.text))

    def __enter__(self) -> _GoodTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def test_random_bodies_and_headers_get_200_or_an_openai_4xx_never_a_5xx(fuzz_url):
    with httpx.Client(base_url=fuzz_url, timeout=60.0) as http, _GoodTraffic(fuzz_url) as good:

        @settings(
            max_examples=200,
            deadline=None,
            derandomize=True,  # the same cases on every CI run; a failure reproduces
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(
            case=_cases,
            headers=_headers,
            raw=st.integers(0, 9),
            depth=st.sampled_from([0, 0, 0, 0, 8, 40, 1000, 50_000]),
        )
        def one_request(case, headers, raw, depth):
            path, body, hostile = case
            # allow_nan: NaN/Infinity literals are what a sloppy client sends.
            content = json.dumps(body, allow_nan=True).encode()
            if depth and content.startswith(b"{"):  # one field nested ``depth`` arrays deep
                content = b'{"deep": ' + b"[" * depth + b"]" * depth + b", " + content[1:]
                content = content.replace(b", }", b"}")
            if raw == 0:  # sometimes cut the body short: malformed JSON
                content = content[: max(0, len(content) // 2)]
            response = http.post(path, content=content, headers=headers)
            statuses.append(response.status_code)
            _check_answer(response)
            if hostile:
                assert 400 <= response.status_code < 500, (body, response.text[:300])

        statuses: list[int] = []
        one_request()
    # The generated cases reached the engine (some served) as well as the validators.
    assert 200 in statuses and any(400 <= s < 500 for s in statuses), sorted(set(statuses))
    # The well-formed stream kept working throughout, every one to its last token.
    assert len(good.results) >= 1
    for status, text in good.results:
        assert status == 200, text[:300]
        assert '"finish_reason":"length"' in text.replace(" ", "") and text.rstrip().endswith(
            "data: [DONE]"
        ), text[-300:]


async def _storm(url: str, connections: int) -> list[httpx.Response | BaseException]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=180.0, limits=limits) as http:
        body = {"model": MODEL, "prompt": "storm", "max_tokens": 2, "temperature": 0}
        return await asyncio.gather(
            *(http.post("/v1/completions", json=body) for _ in range(connections)),
            return_exceptions=True,
        )


def test_a_thousand_concurrent_connections_each_get_a_valid_answer(fuzz_url):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # One socket per connection plus what pytest and Ray hold already.
    need = STORM_CONNECTIONS + 1024
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    answers = asyncio.run(_storm(fuzz_url, STORM_CONNECTIONS))
    errors = [a for a in answers if isinstance(a, BaseException)]
    assert not errors, errors[:3]
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
    for answer in answers:
        if answer.status_code == 503:  # engine busy/unavailable: still an OpenAI error body
            assert set(answer.json()["error"]) == ERROR_KEYS
        else:
            _check_answer(answer)
    # The in-flight bound admitted some and refused the rest quickly rather than queueing all.
    assert statuses.count(200) >= 1
    assert statuses.count(429) >= 1
    # And the server is still fine afterwards.
    with httpx.Client(base_url=fuzz_url, timeout=60.0) as http:
        after = http.post(
            "/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 2}
        )
    assert after.status_code == 200, after.text
