"""The Ray runtime end to end on a real local cluster: tiny model, CPU, real actors.

Each test drives FlowPrefillEngine exactly as the Serve app does and checks outcomes: token ids
against the single-process reference, first-token order under preemption, completion counts,
and the KV blocks and paused units left behind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time

import psutil
import pytest
from conftest_ray import runtime_test_config
from waiting import async_wait_until

from flowprefill_ray.errors import InvalidRequestError, PromptTooLongError
from flowprefill_ray.model import load_model
from flowprefill_ray.model.generate import generate
from flowprefill_ray.runtime.engine import FlowPrefillEngine
from flowprefill_ray.runtime.model_source import checkpoint_path
from flowprefill_ray.sampling_params import SamplingParams

pytestmark = pytest.mark.ray

# A prompt long enough that its prefill takes about a second on one CPU thread, so an urgent
# request can arrive while it runs (it has hundreds of block checkpoints).
LONG_PROMPT_TOKENS = 3000
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 500) for _ in range(length)]


@pytest.fixture(scope="module")
def reference_model(runtime_engines):
    """The same checkpoint loaded in the test process: the single-process ground truth."""
    engine = runtime_engines("flowprefill")
    return load_model(checkpoint_path(engine.config.model))


async def _collect(engine, prompt, sampling, slo, request_id=None, first_token_times=None):
    outputs = []
    async for out in await engine.submit(prompt, sampling, slo=slo, request_id=request_id):
        if not outputs and first_token_times is not None:
            first_token_times[out.request_id] = time.monotonic()
        outputs.append(out)
    return outputs


def _token_ids(outputs) -> list[int]:
    return [o.token_id for o in outputs if o.token_id is not None]


async def _wait_until_running(engine, timeout_s: float = 30.0) -> None:
    async def running():
        stats = await engine.stats()
        return any(u is not None for u in stats["scheduler"]["running_units"].values())

    await async_wait_until(running, timeout_s, "the long prefill to start", poll_s=0.005)


async def _urgent_during_long(engine):
    """Submit a long relaxed request, then an urgent short one while the long one computes."""
    firsts: dict[str, float] = {}
    long_task = asyncio.create_task(
        _collect(engine, _prompt(LONG_PROMPT_TOKENS, 1), GREEDY, 120.0, "long", firsts)
    )
    await _wait_until_running(engine)
    urgent = await _collect(engine, _prompt(16, 2), GREEDY, 2.0, "urgent", firsts)
    long = await long_task
    return long, urgent, firsts


def test_tokens_after_kv_handoff_equal_single_process_generate(runtime_engines, reference_model):
    engine = runtime_engines("flowprefill")
    prompt = _prompt(300, 3)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)

    async def run():
        return [await _collect(engine, prompt, params, "search") for params in (greedy, seeded)]

    outputs = asyncio.run(run())
    for params, outs in zip((greedy, seeded), outputs, strict=True):
        assert _token_ids(outs) == generate(reference_model, prompt, params)
        assert [o.index for o in outs] == list(range(12))
        assert outs[-1].finish_reason == "length"
        text = engine.tokenizer.decode(_token_ids(outs), skip_special_tokens=True)
        assert "".join(o.text for o in outs) == text
    stats = asyncio.run(engine.stats())
    decode = stats["decode_workers"]["decode-0"]
    moved = decode["kv_transfer_bytes"]
    assert moved >= 2 * 300 * reference_model.config.num_hidden_layers  # KV really travelled
    # Running totals agree with the (bounded) per-hand-off samples while these are few.
    samples = decode["kv_transfer_samples"]
    assert decode["kv_transfers"] == len(samples) and sum(b for b, _ in samples) == moved


def test_kv_by_ray_direct_transport_over_gloo_gives_the_same_tokens(
    ray_local, runtime_cache_dir, reference_model
):
    # Its own engine, removed at the end: torch's rendezvous store behind the gloo group
    # listens on every interface while the group exists (see docs/RUNTIME.md).
    config = runtime_test_config(
        runtime_cache_dir, "flowprefill", kv_transfer={"mode": "gloo"}, name_prefix="fp-test-gloo"
    )
    prompt = _prompt(200, 4)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

    async def run():
        engine = await FlowPrefillEngine.start(config)
        try:
            outputs = await _collect(engine, prompt, greedy, "search")
            return outputs, (await engine.stats())["decode_workers"]["decode-0"]
        finally:
            await engine.shutdown()

    outputs, decode = asyncio.run(run())
    assert _token_ids(outputs) == generate(reference_model, prompt, greedy)
    assert decode["kv_transfers"] == 1 and decode["kv_transfer_bytes"] > 0


def test_urgent_request_preempts_long_prefill_which_still_matches_unpreempted_run(
    runtime_engines, reference_model
):
    engine = runtime_engines("flowprefill")
    long, urgent, firsts = asyncio.run(_urgent_during_long(engine))

    assert firsts["urgent"] < firsts["long"], "the urgent request waited for the long prefill"
    assert long[0].preemptions >= 1
    assert urgent[0].ttft_s < long[0].ttft_s
    assert _token_ids(long) == generate(reference_model, _prompt(LONG_PROMPT_TOKENS, 1), GREEDY)
    stats = asyncio.run(engine.stats())["scheduler"]
    assert stats["preemption_blocking_s"], "the worker reported no blocking time"
    # One-hop handover: the urgent unit went with the preempt and started at the checkpoint.
    handed_over = dict(stats["start_delay_s"]["after_preempt"])
    assert urgent[0].request_id in handed_over
    assert 0.0 < handed_over[urgent[0].request_id] < urgent[0].ttft_s


def test_fcfs_makes_the_urgent_request_wait_for_the_long_prefill(runtime_engines):
    engine = runtime_engines("fcfs")
    long, urgent, firsts = asyncio.run(_urgent_during_long(engine))

    assert firsts["long"] < firsts["urgent"]
    assert long[0].preemptions == 0
    assert urgent[0].queue_s > 0.05  # it queued behind the running prefill


def test_many_concurrent_requests_each_complete_exactly_once(runtime_engines):
    engine = runtime_engines("flowprefill")
    rng = random.Random(11)
    classes = ["text", "image", "search", "file"]
    requests = [
        (
            f"many-{i}",
            _prompt(rng.randrange(4, 200), 100 + i),
            SamplingParams(temperature=0.0, max_tokens=rng.randrange(1, 7), ignore_eos=True),
            classes[i % 4],
        )
        for i in range(24)
    ]

    async def run():
        return await asyncio.gather(*(_collect(engine, p, s, c, rid) for rid, p, s, c in requests))

    results = asyncio.run(run())
    for (rid, _, sampling, _), outs in zip(requests, results, strict=True):
        assert {o.request_id for o in outs} == {rid}
        assert [o.finish_reason for o in outs].count("length") == 1
        assert outs[-1].finish_reason == "length"
        assert [o.index for o in outs] == list(range(sampling.max_tokens))
    stats = asyncio.run(engine.stats())
    assert stats["scheduler"]["in_prefill"] == 0
    assert stats["decode_workers"]["decode-0"]["used_blocks"] == 0


def test_cancel_during_decode_frees_kv_blocks(runtime_engines):
    engine = runtime_engines("flowprefill")
    sampling = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def run():
        outputs = []
        async for out in await engine.submit(_prompt(64, 5), sampling, "text", "cancel-decode"):
            outputs.append(out)
            if len(outputs) == 3:
                busy = (await engine.stats())["decode_workers"]["decode-0"]["used_blocks"]
                assert await engine.cancel("cancel-decode")
        return outputs, busy

    outputs, busy = asyncio.run(run())
    assert busy > 0
    assert outputs[-1].finish_reason == "abort" and outputs[-1].token_id is None
    assert [o.index for o in outputs] == list(range(len(outputs)))
    assert len(outputs) < 400
    decode = asyncio.run(engine.stats())["decode_workers"]["decode-0"]
    assert decode["used_blocks"] == 0 and decode["running"] == 0


def test_abandoned_stream_cancels_its_request(runtime_engines):
    engine = runtime_engines("flowprefill")
    sampling = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def run():
        stream = await engine.submit(_prompt(32, 6), sampling, "text", "abandoned")
        async for _ in stream:
            break  # the client disconnects after the first token
        await stream.aclose()

    asyncio.run(run())
    decode = asyncio.run(engine.stats())["decode_workers"]["decode-0"]
    assert decode["used_blocks"] == 0 and decode["running"] == 0


def test_cancel_during_prefill_frees_the_prefill_worker(runtime_engines):
    engine = runtime_engines("flowprefill")

    async def run():
        stream = await engine.submit(
            _prompt(LONG_PROMPT_TOKENS, 7), GREEDY, 120.0, "cancel-prefill"
        )
        consumer = asyncio.create_task(_drain(stream))
        await _wait_until_running(engine)
        assert await engine.cancel("cancel-prefill")
        outputs = await consumer

        # The running unit finishes its current work, then nothing may be left behind.
        async def settled():
            stats = await engine.stats()
            prefill = stats["prefill_workers"]["prefill-0"]
            if (
                prefill["running_unit"] is None
                and not prefill["held_kv_bytes"]
                and not prefill["paused_units"]
            ):
                return stats
            return None

        stats = await async_wait_until(
            settled, 30, "prefill-0 to hold nothing after the cancel", poll_s=0.05
        )
        return outputs, stats

    outputs, stats = asyncio.run(run())
    assert [o.finish_reason for o in outputs] == ["abort"]
    prefill = stats["prefill_workers"]["prefill-0"]
    assert prefill["running_unit"] is None
    assert prefill["paused_units"] == 0 and prefill["held_kv_bytes"] == 0
    assert stats["decode_workers"]["decode-0"]["used_blocks"] == 0
    assert stats["scheduler"]["in_prefill"] == 0


async def _drain(stream):
    return [out async for out in stream]


def test_bad_requests_are_refused_before_reaching_the_cluster(runtime_engines):
    engine = runtime_engines("flowprefill")

    async def submit(prompt, sampling=GREEDY, slo=None):
        await engine.submit(prompt, sampling, slo)

    with pytest.raises(PromptTooLongError, match="limit"):
        asyncio.run(submit([1] * (engine.max_prompt_tokens + 1)))
    with pytest.raises(InvalidRequestError, match="unknown SLO class"):
        asyncio.run(submit([1, 2, 3], slo="platinum"))
    with pytest.raises(InvalidRequestError, match="empty"):
        asyncio.run(submit([]))
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        asyncio.run(submit([10**7]))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        asyncio.run(submit([1, 2], SamplingParams(max_tokens=10**6)))


def test_ray_listens_only_on_loopback(runtime_engines):
    """Every listening socket of this cluster's processes is bound to a loopback address."""
    import ray

    runtime_engines("flowprefill")  # make sure workers exist
    node = ray._private.worker._global_node
    pids = {node.all_processes[kind][0].process.pid for kind in node.all_processes}
    for pid in list(pids):
        try:
            pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    listeners = [
        (c.pid, c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert listeners, "found no Ray listener at all: the check itself is broken"
    exposed = [listener for listener in listeners if not _is_loopback(listener[1])]
    assert not exposed, exposed


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # "::ffff:127.0.0.1" on dual-stack sockets
    return (mapped or address).is_loopback
