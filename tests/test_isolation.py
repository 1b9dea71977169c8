"""One request's failure never fails another, and a unit that ends leaves nothing behind.

Executor level (no Ray): a batched unit with a member whose forward raises (a token id outside
the vocabulary) and a member whose first-token sampling raises (a seed torch cannot take, built
without validation as a hostile caller of the engine could) completes for the innocent member,
with the same KV as that prompt alone, and frees what the failed members held.
"""

from __future__ import annotations

import pytest
import torch

from flowprefill_ray.model import load_model
from flowprefill_ray.model.checkpoints import tiny_checkpoint
from flowprefill_ray.runtime.messages import PrefillItemSpec
from flowprefill_ray.runtime.model_source import TINY_MODEL_SHAPE
from flowprefill_ray.runtime.prefill_executor import PrefillExecutor
from flowprefill_ray.sampling_params import MAX_SEED, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    return load_model(tiny_checkpoint(tmp_path_factory.mktemp("isolation"), **TINY_MODEL_SHAPE))


def _item(request_id, tokens, sampling=GREEDY, start=0, end=None):
    end = len(tokens) if end is None else end
    return PrefillItemSpec(request_id, start, end, tuple(tokens[start:end]), len(tokens), sampling)


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 37 + salt) % 480 + 3 for i in range(n)]


def _idle(executor: PrefillExecutor) -> dict:
    stats = executor.stats()
    return {k: stats[k] for k in ("paused_units", "held_kv_bytes", "paused_bytes", "held_bytes")}


IDLE = {"paused_units": 0, "held_kv_bytes": 0, "paused_bytes": 0, "held_bytes": 0}


def test_seed_outside_torch_range_is_refused_at_validation():
    with pytest.raises(ValueError, match="less than or equal"):
        SamplingParams(seed=MAX_SEED + 1)
    assert SamplingParams(seed=-(2**63)).make_generator() is not None


def test_poisoned_members_fail_alone_and_the_innocent_member_is_served(model):
    vocab = model.config.vocab_size
    innocent, bad_token, bad_seed = _prompt(90, 1), _prompt(60, 2), _prompt(70, 3)
    bad_token[30] = vocab + 7  # the embedding lookup raises for the whole batched forward
    overflow = SamplingParams.model_construct(**{**GREEDY.model_dump(), "seed": 2**64})
    executor = PrefillExecutor(model, "block")

    outcome = executor.run(
        1,
        [
            _item("innocent", innocent),
            _item("bad-token", bad_token),
            _item("bad-seed", bad_seed, sampling=overflow),
        ],
    )

    assert outcome.status == "completed"
    assert [f.request_id for f in outcome.first_tokens] == ["innocent"]
    failed = {f.request_id: f.detail for f in outcome.failed}
    assert set(failed) == {"bad-token", "bad-seed"}
    assert "Overflow" in failed["bad-seed"]
    reference = model.prefill(innocent)
    assert outcome.first_tokens[0].token_id == int(reference.last_logits[0].argmax())
    kv = executor.take_kv("innocent")
    torch.testing.assert_close(kv.k, reference.kv[0].k, rtol=1e-4, atol=1e-5)
    # Nothing of the failed members stays: no paused unit, no KV, no unit record.
    assert _idle(executor) == IDLE
    assert executor.stats()["paused_unit_ids"] == []


def test_failed_first_chunk_of_a_chunked_request_keeps_no_partial_kv(model):
    tokens = _prompt(200, 4)
    tokens[10] = model.config.vocab_size  # fails in the first chunk
    executor = PrefillExecutor(model, "block")
    outcome = executor.run(1, [_item("r", tokens, end=100)])
    assert [f.request_id for f in outcome.failed] == ["r"]
    assert executor.stats()["partial_kv_requests"] == 0
    # Its next chunk (the scheduler cancels the request, but a late unit must not crash the
    # worker either) fails alone as well: there is no KV to continue from.
    late = executor.run(2, [_item("r", tokens, start=100), _item("ok", _prompt(20, 5))])
    assert [f.request_id for f in late.failed] == ["r"]
    assert [f.request_id for f in late.first_tokens] == ["ok"]
    executor.drop_request("ok")
    assert _idle(executor) == IDLE


# ------------------------------------------------------------------ through the Ray runtime


def test_a_poisoned_request_fails_alone_in_the_live_runtime(runtime_engines):
    """Six requests and one whose sampler raises arrive while a long prefill runs, so they
    queue together and are batched: the six are served, the culprit gets a RequestFailedError
    that names no internals, and once idle the worker holds nothing and agrees with the
    scheduler."""
    import asyncio

    from waiting import async_wait_until

    from flowprefill_ray.errors import RequestFailedError

    engine = runtime_engines("flowprefill")
    overflow = SamplingParams.model_construct(**{**GREEDY.model_dump(), "seed": 2**64})

    async def scenario():
        async def stats():
            return await engine.stats()

        before = (await stats())["scheduler"]["counts"].get("failed", 0)
        long = asyncio.create_task(engine.generate(_prompt(3000, 9), GREEDY, 600.0))
        await async_wait_until(
            lambda: _has(stats, lambda s: any(s["scheduler"]["running_units"].values())),
            60,
            "the long prefill to run",
        )
        innocents = [
            asyncio.create_task(engine.generate(_prompt(40 + i, 20 + i), GREEDY, 600.0))
            for i in range(6)
        ]
        poisoned = asyncio.create_task(engine.generate(_prompt(50, 30), overflow, 600.0))
        outs = await asyncio.gather(long, *innocents)
        with pytest.raises(RequestFailedError) as failure:
            await poisoned
        settled = await async_wait_until(
            lambda: _has(stats, _settled), 30, "the worker to hold nothing and agree"
        )
        return before, outs, failure.value, settled

    before, outs, failure, stats = asyncio.run(scenario())
    for out in outs:
        assert out[-1].finish_reason == "length" and len(out) == GREEDY.max_tokens
    assert "Overflow" not in str(failure) and "Traceback" not in str(failure)
    assert stats["scheduler"]["counts"]["failed"] == before + 1
    assert stats["prefill_workers"]["prefill-0"]["held_bytes"] == 0


async def _has(stats, check):
    value = await stats()
    return value if check(value) else None


def _settled(stats: dict) -> bool:
    worker = stats["prefill_workers"]["prefill-0"]
    return (
        stats["scheduler"]["in_prefill"] == 0
        and worker["held_bytes"] == 0
        and worker["running_unit"] is None
        and stats["disagreements"] == []
    )
