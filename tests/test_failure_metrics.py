"""Requests that fail, time out, are aborted or rejected are counted, by the engine's real
request path (``FlowPrefillEngine.submit`` / its stream) around a fake scheduler: no Ray, no
model. What the dashboard and alerts make of these counters: test_dashboard.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import ray.util.metrics
from recorded_metrics import FakeRay, fake_engine

from flowprefill_ray.errors import (
    EngineUnavailableError,
    RequestFailedError,
    RequestRejectedError,
    RequestTimeoutError,
)
from flowprefill_ray.runtime.config import RuntimeConfig
from flowprefill_ray.runtime.messages import PrefillDone
from flowprefill_ray.runtime.metrics import FINISH_REASONS, METRICS_BY_NAME
from flowprefill_ray.sampling_params import SamplingParams

FINISHED = "flowprefill_requests_finished_total"
REJECTED = "flowprefill_requests_rejected_total"
PROMPT = [5, 6, 7]


class FakeScheduler:
    """``submit.remote`` answers with what the test sets: a PrefillDone, None (cancelled), an
    exception, or never."""

    def __init__(self, answer=None, hang: bool = False):
        self.answer, self.hang = answer, hang
        self.cancelled: list[str] = []
        self.submit = SimpleNamespace(remote=self._submit)
        self.cancel = SimpleNamespace(remote=self._cancel)

    async def _submit(self, request_id, *_):
        if self.hang:
            await asyncio.Event().wait()
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def _cancel(self, request_id):
        self.cancelled.append(request_id)
        return True


@pytest.fixture
def fake_ray():
    fake = FakeRay()
    with pytest.MonkeyPatch.context() as patch:
        for kind in ("Counter", "Gauge", "Histogram"):
            patch.setattr(ray.util.metrics, kind, getattr(fake, kind))
        with fake.process("head", "engine"):
            yield fake


def make_engine(scheduler, **requests):
    config = RuntimeConfig.model_validate({"requests": requests}) if requests else RuntimeConfig()
    engine = fake_engine(config, scheduler=scheduler)
    engine.tokenizer = SimpleNamespace(
        eos_token_id=2, decode=lambda ids, skip_special_tokens=True: " ".join(map(str, ids))
    )
    return engine


def counted(fake: FakeRay, name: str) -> dict[tuple, float]:
    """{label values in the registry's label order: count} of a counter, zeros included."""
    order = METRICS_BY_NAME[name].labels
    return {
        tuple(dict(tags)[label] for label in order): series.value
        for (_, _, series_name, tags), series in fake.series.items()
        if series_name == name
    }


def moved(fake: FakeRay, name: str) -> dict[tuple, float]:
    return {labels: value for labels, value in counted(fake, name).items() if value}


async def _drain(stream) -> list:
    return [out async for out in stream]


def test_engine_start_creates_every_class_counter_at_zero(fake_ray):
    engine = make_engine(FakeScheduler())
    classes = engine.config.slo.class_names
    finished = counted(fake_ray, FINISHED)
    assert finished == {(c, r): 0.0 for c in classes for r in FINISH_REASONS}
    assert counted(fake_ray, REJECTED) == {(c,): 0.0 for c in classes}
    for name in ("flowprefill_slo_met_total", "flowprefill_slo_missed_total"):
        assert counted(fake_ray, name) == {(c,): 0.0 for c in classes}
    assert counted(fake_ray, "flowprefill_preemptions_total") == {
        ("prefill-0",): 0.0,
        ("prefill-1",): 0.0,
    }


@pytest.mark.parametrize(
    "error",
    [
        RequestFailedError("the prefill of request r failed"),
        EngineUnavailableError("a runtime actor is unavailable"),
        RuntimeError("an unexpected worker bug"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_failed_request_counts_as_error(fake_ray, error):
    engine = make_engine(FakeScheduler(error))
    with pytest.raises(type(error)):
        asyncio.run(_drain(engine.submit(PROMPT, slo="search")))
    assert moved(fake_ray, FINISHED) == {("search", "error"): 1.0}


def test_a_timed_out_request_counts_as_timeout(fake_ray):
    scheduler = FakeScheduler(hang=True)
    engine = make_engine(scheduler)
    with pytest.raises(RequestTimeoutError):
        asyncio.run(_drain(engine.submit(PROMPT, slo="image", timeout_s=0.05)))
    assert moved(fake_ray, FINISHED) == {("image", "timeout"): 1.0}
    assert len(scheduler.cancelled) == 1  # and what it held was released


def test_a_rejection_is_not_a_failure(fake_ray):
    engine = make_engine(FakeScheduler(RequestRejectedError("r", "queue full", 1.0)))
    with pytest.raises(RequestRejectedError):
        asyncio.run(_drain(engine.submit(PROMPT, slo="text")))
    # The scheduler counts its own rejections; the engine counts no failure for it.
    assert moved(fake_ray, FINISHED) == {} and moved(fake_ray, REJECTED) == {}


def test_the_in_flight_bound_counts_a_rejection(fake_ray):
    engine = make_engine(FakeScheduler(hang=True), max_in_flight=1)

    async def scenario():
        first = asyncio.create_task(_drain(engine.submit(PROMPT, slo="text")))
        await asyncio.sleep(0.01)  # the first request is in flight now
        with pytest.raises(RequestRejectedError):
            engine.submit(PROMPT, slo="file")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first

    asyncio.run(scenario())
    assert moved(fake_ray, REJECTED) == {("file",): 1.0}
    # The first request's consumer went away: an abort.
    assert moved(fake_ray, FINISHED) == {("text", "abort"): 1.0}


def test_a_request_cancelled_before_its_first_token_counts_as_abort(fake_ray):
    engine = make_engine(FakeScheduler(None))  # the scheduler answers None: cancelled
    outputs = asyncio.run(_drain(engine.submit(PROMPT, slo="text")))
    assert [o.finish_reason for o in outputs] == ["abort"]
    assert moved(fake_ray, FINISHED) == {("text", "abort"): 1.0}


def test_a_request_ending_with_its_first_token_is_counted_even_if_the_consumer_stops(fake_ray):
    done = PrefillDone("r", 9, "length", None, 0.0, 0, 0.25, "text")
    engine = make_engine(FakeScheduler(done))

    async def take_first_and_stop():
        stream = engine.submit(PROMPT, SamplingParams(max_tokens=1), slo="text")
        first = await stream.__anext__()
        await stream.aclose()  # e.g. an HTTP handler that returns at the final output
        return first

    first = asyncio.run(take_first_and_stop())
    assert first.finish_reason == "length"
    assert moved(fake_ray, FINISHED) == {("text", "length"): 1.0}


def test_one_ttft_clock_judges_the_slo_counters_and_the_api_alike(fake_ray):
    """The scheduler saw the first token 10 ms after the request reached it (within 0.25 s);
    the request had reached the server 0.3 s before that. The TTFT is the server's, measured
    once from the request's clock: the counters, ``TokenOutput`` and the API all say missed."""
    from flowprefill_ray.request_clock import RequestClock
    from flowprefill_ray.serve.frontend import _extension

    done = PrefillDone("r", 9, "length", None, 0.0, 0, 0.25, "text", hops={"x": 1.0})
    scheduler = FakeScheduler(done)
    noted = []
    scheduler.note_client_ttft = SimpleNamespace(remote=lambda rid, s: noted.append((rid, s)))
    engine = make_engine(scheduler)
    clock = RequestClock("http_received", started_s=time.monotonic() - 0.3)
    (out,) = asyncio.run(
        _drain(engine.submit(PROMPT, SamplingParams(max_tokens=1), slo="text", clock=clock))
    )
    assert out.ttft_s >= 0.3 and out.slo_met is False
    assert moved(fake_ray, "flowprefill_slo_missed_total") == {("text",): 1.0}
    assert moved(fake_ray, "flowprefill_slo_met_total") == {}
    assert noted == [("r", out.ttft_s)]  # the timeline hears the same number
    api = _extension(SimpleNamespace(request_id="cmpl-r"), out)["flowprefill"]
    assert api["ttft_s"] == out.ttft_s and api["slo_met"] is False
    # The scheduler's stamps came back with the first token, beside the engine's own.
    assert {"http_received", "engine_submit", "x", "engine_first_token"} <= set(api["hops"])


def test_a_request_within_its_slo_on_the_one_clock_counts_as_met(fake_ray):
    done = PrefillDone("r", 9, "length", None, 0.0, 0, 0.25, "text")
    engine = make_engine(FakeScheduler(done))
    (out,) = asyncio.run(_drain(engine.submit(PROMPT, SamplingParams(max_tokens=1), slo="text")))
    assert out.ttft_s < 0.25 and out.slo_met is True
    assert moved(fake_ray, "flowprefill_slo_met_total") == {("text",): 1.0}
    assert moved(fake_ray, "flowprefill_slo_missed_total") == {}
