"""The prefix cache: block keys, exact reuse, salts, LRU by bytes (``PrefixCache``), and a
prefill executor that starts prompts from cached blocks with the same result as a cold prefill
(``PrefixReuse``), on the real tiny model."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from pydantic import ValidationError

from flowprefill_ray.model import load_model
from flowprefill_ray.model.checkpoints import tiny_checkpoint
from flowprefill_ray.model.kv import KVCache
from flowprefill_ray.model.prefix_cache import PrefixCache, block_hashes
from flowprefill_ray.runtime.config import RuntimeConfig
from flowprefill_ray.runtime.messages import PrefillItemSpec
from flowprefill_ray.runtime.model_source import TINY_MODEL_SHAPE
from flowprefill_ray.runtime.prefill_executor import PrefillExecutor
from flowprefill_ray.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
BLOCK = 16
# The tolerance of the chunked-prefill tests (test_runtime_parts.py).
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.set_num_threads(1)
    return load_model(tiny_checkpoint(tmp_path_factory.mktemp("prefix"), **TINY_MODEL_SHAPE))


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 37 + salt) % 480 + 3 for i in range(n)]


def _item(request_id, tokens, start=0, end=None, salt=None):
    end = len(tokens) if end is None else end
    return PrefillItemSpec(
        request_id, start, end, tuple(tokens[start:end]), len(tokens), GREEDY, salt
    )


def _fake_kv(tokens: int, layers: int = 2, width: int = 4) -> KVCache:
    """KV whose values name their position, so a block's origin can be checked."""
    k = torch.arange(tokens, dtype=torch.float32).view(1, tokens, 1, 1).expand(layers, -1, 1, width)
    return KVCache(k.contiguous(), (-k).contiguous())


def _block_bytes(layers: int = 2, width: int = 4) -> int:
    return 2 * layers * BLOCK * width * 4


def _cached_tokens(outcome, request_id: str) -> int:
    return dict(outcome.cached_tokens).get(request_id, 0)


# ------------------------------------------------------------------ PrefixCache alone


def test_block_keys_chain_over_everything_before_them():
    tokens = _prompt(5 * BLOCK + 7)
    keys = block_hashes(tokens, BLOCK)
    assert len(keys) == 5  # the partial last block has no key
    assert len(set(keys)) == 5
    # Equal blocks at different places get different keys: the key covers the whole prefix.
    repeated = _prompt(BLOCK) * 3
    assert len(set(block_hashes(repeated, BLOCK))) == 3
    # Changing block 0 changes every key after it.
    changed = [tokens[0] + 1, *tokens[1:]]
    assert not set(block_hashes(changed, BLOCK)) & set(keys)
    # Salts: none, empty and named are three different key spaces.
    spaces = [block_hashes(tokens, BLOCK, salt)[0] for salt in (None, "", "a", "b")]
    assert len(set(spaces)) == 4


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_prompts_differing_in_block_k_share_exactly_the_blocks_before_it(k):
    cache = PrefixCache(BLOCK, 1 << 30)
    first = _prompt(6 * BLOCK)
    cache.insert(first, _fake_kv(len(first)))
    second = list(first)
    second[k * BLOCK + 5] += 1  # one token inside block k
    hit = cache.lookup(second)
    assert (0 if hit is None else hit.tokens) == k * BLOCK
    if hit is not None:  # the KV handed out is the first prompt's, position for position
        assert torch.equal(hit.kv.k[0, :, 0, 0], torch.arange(k * BLOCK, dtype=torch.float32))
    assert cache.lookup(first).tokens == 6 * BLOCK


def test_a_hit_is_whole_blocks_and_respects_max_tokens():
    cache = PrefixCache(BLOCK, 1 << 30)
    tokens = _prompt(4 * BLOCK + 3)
    assert cache.insert(tokens, _fake_kv(len(tokens))) == 4  # the partial block is not kept
    assert cache.lookup(tokens).tokens == 4 * BLOCK
    assert cache.lookup(tokens, max_tokens=4 * BLOCK - 1).tokens == 3 * BLOCK
    assert cache.lookup(tokens, max_tokens=BLOCK - 1) is None
    stats = cache.stats()
    assert stats["blocks"] == 4 and stats["bytes"] == 4 * _block_bytes() == cache.nbytes
    assert stats["query_tokens"] == (4 * BLOCK + 3) + (4 * BLOCK - 1) + (BLOCK - 1)
    assert stats["hit_tokens"] == 7 * BLOCK


def test_salted_entries_are_shared_only_with_the_same_salt():
    cache = PrefixCache(BLOCK, 1 << 30)
    tokens = _prompt(3 * BLOCK)
    cache.insert(tokens, _fake_kv(len(tokens)), salt="tenant-a")
    assert cache.lookup(tokens, salt="tenant-a").tokens == 3 * BLOCK
    for other in (None, "", "tenant-b"):
        assert cache.lookup(tokens, salt=other) is None


def test_eviction_is_least_recently_used_by_bytes_and_shrinks_chains_from_the_tail():
    per_block = _block_bytes()
    cache = PrefixCache(BLOCK, budget_bytes=5 * per_block)
    a, b = _prompt(3 * BLOCK, salt=1), _prompt(2 * BLOCK, salt=2)
    cache.insert(a, _fake_kv(len(a)))
    cache.insert(b, _fake_kv(len(b)))
    assert cache.nbytes == 5 * per_block
    assert cache.lookup(a).tokens == 3 * BLOCK  # a is now the most recent
    c = _prompt(2 * BLOCK, salt=3)
    cache.insert(c, _fake_kv(len(c)))  # needs two blocks: b (least recent) goes
    assert cache.nbytes == 5 * per_block
    assert cache.lookup(b) is None and cache.lookup(a).tokens == 3 * BLOCK
    # Shrinking for a shared budget: c is least recent now; then a loses its tail first.
    assert cache.evict_to(4 * per_block) == per_block
    assert cache.lookup(c).tokens == BLOCK  # c's last block went, its first stayed
    assert cache.evict_to(2 * per_block) == 2 * per_block
    assert cache.lookup(a).tokens == BLOCK and cache.lookup(c).tokens == BLOCK
    assert cache.evict_to(0) == 2 * per_block and cache.nbytes == 0
    assert cache.stats()["evicted_blocks"] == 7


def test_a_zero_budget_caches_nothing_and_bad_sizes_are_refused():
    cache = PrefixCache(BLOCK, 0)
    assert cache.insert(_prompt(BLOCK), _fake_kv(BLOCK)) == 0 and cache.nbytes == 0
    with pytest.raises(ValueError, match="block_tokens"):
        PrefixCache(0, 1)
    with pytest.raises(ValueError, match="budget_bytes"):
        PrefixCache(1, -1)


def test_control_threads_may_read_and_shrink_the_cache_while_it_is_used():
    """The compute thread inserts and looks up while control threads read stats and evict
    (a shared memory budget): the byte count always matches the blocks held."""
    cache = PrefixCache(BLOCK, budget_bytes=12 * _block_bytes())
    stop = threading.Event()
    seen = []

    def control() -> None:
        while not stop.is_set():
            stats = cache.stats()
            seen.append(stats["bytes"] == stats["blocks"] * _block_bytes())
            cache.evict_to(6 * _block_bytes())

    readers = [threading.Thread(target=control) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for i in range(200):
            tokens = _prompt(4 * BLOCK, salt=i % 9)
            cache.insert(tokens, _fake_kv(len(tokens)))
            hit = cache.lookup(tokens)
            assert hit is None or hit.kv.num_tokens == hit.tokens <= 4 * BLOCK
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert seen and all(seen)
    stats = cache.stats()
    assert stats["bytes"] == stats["blocks"] * _block_bytes() <= 12 * _block_bytes()


def test_cached_blocks_do_not_keep_the_prompts_kv_alive():
    cache = PrefixCache(BLOCK, 1 << 30)
    kv = _fake_kv(10 * BLOCK)
    cache.insert(_prompt(2 * BLOCK), kv)  # only 2 of the 10 blocks of this KV are the prompt's
    assert cache.nbytes == 2 * _block_bytes()
    kv.k.fill_(7.0)  # the cache holds copies, not views
    assert torch.equal(cache.lookup(_prompt(2 * BLOCK)).kv.k[0, :, 0, 0], torch.arange(32.0))


@pytest.mark.parametrize(
    "setting, field",
    [({"block_tokens": 0}, "block_tokens"), ({"budget_bytes": -1}, "budget_bytes")],
)
def test_config_refuses_bad_cache_settings_naming_the_field(setting, field):
    with pytest.raises(ValidationError, match=rf"prefill\.prefix_cache\.{field}") as caught:
        RuntimeConfig.model_validate({"prefill": {"prefix_cache": setting}})
    assert "greater than" in str(caught.value)
    with pytest.raises(ValidationError, match="extra"):
        RuntimeConfig.model_validate({"prefill": {"prefix_cache": {"block_size": 16}}})
    assert RuntimeConfig().prefill.prefix_cache.enabled is False


def test_prefix_routing_needs_worker_caches_of_its_block_size():
    with pytest.raises(ValidationError, match="set prefill.prefix_cache.enabled too"):
        RuntimeConfig.model_validate({"policy": {"prefix": {"enabled": True}}})
    with pytest.raises(ValidationError, match=r"policy.prefix.block_tokens \(32\) must equal"):
        RuntimeConfig.model_validate(
            {
                "policy": {"prefix": {"enabled": True, "block_tokens": 32}},
                "prefill": {"prefix_cache": {"enabled": True}},
            }
        )


# ----------------------------------------------------------------- on the executor


def _warm_executor(model, tokens, **kwargs) -> PrefillExecutor:
    executor = PrefillExecutor(model, "block", prefix_cache=PrefixCache(BLOCK, 1 << 30), **kwargs)
    executor.run(1, [_item("warm", tokens)])
    executor.take_kv("warm")
    return executor


@pytest.mark.parametrize("shared", [BLOCK, 3 * BLOCK, 6 * BLOCK, 6 * BLOCK + 5, 7 * BLOCK])
def test_a_hit_gives_the_kv_and_first_token_of_a_cold_prefill(model, shared):
    """Prompts sharing ``shared`` tokens with a cached one: at block boundaries, with a partial
    last shared block (never reused), and the whole cached prompt repeated."""
    cached = _prompt(7 * BLOCK, salt=1)
    executor = _warm_executor(model, cached)
    tokens = cached[:shared] + _prompt(9, salt=2)
    reference = model.prefill(tokens)
    done = executor.run(2, [_item("r", tokens)])
    assert _cached_tokens(done, "r") == shared // BLOCK * BLOCK
    kv = executor.take_kv("r")
    assert kv.num_tokens == len(tokens)  # the decode worker gets the whole prompt's KV
    torch.testing.assert_close(kv.k, reference.kv[0].k, **TOL)
    torch.testing.assert_close(kv.v, reference.kv[0].v, **TOL)
    assert done.first_tokens[0].token_id == int(reference.last_logits[0].argmax())


@pytest.mark.parametrize("blocks", [1, 2, 4])
def test_logits_after_a_hit_equal_a_cold_prefill(model, blocks):
    """The model-level contract the executor relies on: a cached prefix of whole blocks, then
    the rest (ending in a partial block), gives the cold prefill's last-token logits."""
    cache = PrefixCache(BLOCK, 1 << 30)
    cached = _prompt(5 * BLOCK, salt=3)
    cache.insert(cached, model.prefill(cached).kv[0])
    tokens = cached[: blocks * BLOCK] + _prompt(11, salt=4)
    hit = cache.lookup(tokens, max_tokens=len(tokens) - 1)
    assert hit.tokens == blocks * BLOCK
    state = model.start_prefill([tokens[hit.tokens :]], prefixes=[hit.kv])
    state.run(lambda: False)
    cold = model.prefill(tokens)
    torch.testing.assert_close(state.result().last_logits, cold.last_logits, **TOL)


def test_a_hit_followed_by_chunks_of_the_rest_matches_too(model):
    cached = _prompt(8 * BLOCK, salt=14)
    executor = _warm_executor(model, cached, chunk_tokens=24)  # the rest runs as 24-token chunks
    tokens = cached + _prompt(70, salt=15)
    done = executor.run(2, [_item("r", tokens)])
    assert _cached_tokens(done, "r") == 8 * BLOCK
    reference = model.prefill(tokens)
    torch.testing.assert_close(executor.take_kv("r").k, reference.kv[0].k, **TOL)
    assert done.first_tokens[0].token_id == int(reference.last_logits[0].argmax())


@pytest.mark.parametrize("evicted", [False, True])
def test_an_item_the_policy_started_at_a_cached_prefix_runs_from_it_or_recomputes(model, evicted):
    """With prefix routing the policy sends ``[start, end)`` of a whole prompt, ``start`` being
    the prefix it believes cached here, and the tokens before it."""
    cached = _prompt(6 * BLOCK, salt=16)
    executor = _warm_executor(model, cached)
    if evicted:  # the policy's view was stale: the blocks went while the request waited
        executor.prefix_reuse.cache.evict_to(0)
    tokens = cached + _prompt(9, salt=17)
    start = 6 * BLOCK
    spec = _item("r", tokens, start)
    policy_started = PrefillItemSpec(**{**_fields(spec), "prefix_token_ids": tuple(tokens[:start])})
    done = executor.run(2, [policy_started])
    assert done.failed == ()
    assert _cached_tokens(done, "r") == (0 if evicted else start)
    reference = model.prefill(tokens)
    kv = executor.take_kv("r")
    assert kv.num_tokens == len(tokens)
    torch.testing.assert_close(kv.k, reference.kv[0].k, **TOL)
    assert done.first_tokens[0].token_id == int(reference.last_logits[0].argmax())
    # Without the prefix's tokens such an item still fails alone, as before.
    assert executor.run(3, [_item("s", tokens, start)]).failed[0].request_id == "s"


def _fields(spec: PrefillItemSpec) -> dict:
    return {name: getattr(spec, name) for name in PrefillItemSpec.__slots__}


def test_an_exact_repeat_still_computes_its_last_token(model):
    tokens = _prompt(4 * BLOCK, salt=5)  # whole blocks only
    executor = _warm_executor(model, tokens)
    done = executor.run(2, [_item("again", tokens)])
    assert _cached_tokens(done, "again") == 3 * BLOCK  # the last block holds the last token
    reference = model.prefill(tokens)
    assert done.first_tokens[0].token_id == int(reference.last_logits[0].argmax())
    torch.testing.assert_close(executor.take_kv("again").k, reference.kv[0].k, **TOL)


def test_a_prompt_split_over_units_is_cached_whole(model):
    tokens = _prompt(10 * BLOCK + 3, salt=6)
    executor = PrefillExecutor(model, "block", prefix_cache=PrefixCache(BLOCK, 1 << 30))
    first = executor.run(1, [_item("long", tokens, 0, 4 * BLOCK + 2)])
    assert first.first_tokens == ()
    executor.run(2, [_item("long", tokens, 4 * BLOCK + 2)])
    executor.take_kv("long")
    assert executor.stats()["prefix_cache"]["blocks"] == 10
    longer = tokens + _prompt(20, salt=7)
    done = executor.run(3, [_item("longer", longer)])
    assert _cached_tokens(done, "longer") == 10 * BLOCK
    torch.testing.assert_close(executor.take_kv("longer").k, model.prefill(longer).kv[0].k, **TOL)


def test_salted_requests_share_only_with_their_salt_and_unsalted_can_be_kept_out(model):
    tokens = _prompt(5 * BLOCK, salt=8)
    executor = PrefillExecutor(
        model, "block", prefix_cache=PrefixCache(BLOCK, 1 << 30), share_unsalted=False
    )
    executor.run(1, [_item("plain", tokens)])
    assert executor.stats()["prefix_cache"]["blocks"] == 0  # unsalted: not cached at all
    executor.run(2, [_item("a1", tokens, salt="a")])
    again = executor.run(3, [_item("a2", tokens, salt="a"), _item("b1", tokens, salt="b")])
    assert dict(again.cached_tokens) == {"a2": 4 * BLOCK}
    firsts = {f.request_id: f.token_id for f in again.first_tokens}
    assert firsts["a2"] == firsts["b1"]  # the same answer, reached without sharing


def test_a_unit_paused_on_a_hit_resumes_to_the_cold_result_even_if_the_blocks_go(
    model, hold_at_first_checkpoint
):
    cached = _prompt(20 * BLOCK, salt=9)
    executor = _warm_executor(model, cached)
    tokens = cached + _prompt(300, salt=10)
    held = hold_at_first_checkpoint(2)
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.update(r=executor.run(2, [_item("r", tokens)]))
    )
    runner.start()
    assert held.wait(60), "the unit never reached a checkpoint"
    paused, _ = executor.request_pause(2)
    runner.join()
    assert paused and outcome["r"].status == "paused"
    # The paused unit holds its own copy of the prefix: the cache may evict meanwhile.
    assert executor.prefix_reuse.cache.evict_to(0) > 0
    done = executor.resume(2)
    assert done.status == "completed" and _cached_tokens(done, "r") == 20 * BLOCK
    reference = model.prefill(tokens)
    torch.testing.assert_close(executor.take_kv("r").k, reference.kv[0].k, **TOL)
    assert done.first_tokens[0].token_id == int(reference.last_logits[0].argmax())
    assert executor.stats()["paused_bytes"] == 0


def test_a_request_whose_blocks_were_evicted_while_it_waited_is_recomputed(model):
    cached = _prompt(6 * BLOCK, salt=11)
    executor = _warm_executor(model, cached)
    tokens = cached + _prompt(7, salt=12)
    # While the request waits in the scheduler's queue, the worker's memory budget takes
    # blocks back: first the chain's tail (its least recent blocks), later all of them.
    cache = executor.prefix_reuse.cache
    cache.evict_to(4 * cache.nbytes // 6)
    done = executor.run(2, [_item("r", tokens)])
    assert done.failed == () and _cached_tokens(done, "r") == 4 * BLOCK  # the head survived
    cache.evict_to(0)
    again = executor.run(3, [_item("r2", tokens)])
    assert again.failed == () and again.cached_tokens == ()  # all of it recomputed
    reference = model.prefill(tokens)
    for rid in ("r", "r2"):
        torch.testing.assert_close(executor.take_kv(rid).k, reference.kv[0].k, **TOL)


# ------------------------------------------------------------- live, through the runtime


@pytest.fixture(scope="module")
def cached_engine(ray_local, runtime_cache_dir):
    from conftest_ray import runtime_test_config, started_engine

    config = runtime_test_config(
        runtime_cache_dir,
        "flowprefill",
        name_prefix="fp-prefix-cache",
        prefill={"prefix_cache": {"enabled": True, "block_tokens": BLOCK}},
    ).model_dump()
    # The policy routes by its view of the cache and starts prompts at their cached prefix.
    config["policy"]["prefix"] = {"enabled": True, "block_tokens": BLOCK}
    config = RuntimeConfig.model_validate(config)
    with started_engine(config) as engine:
        yield engine


@pytest.mark.ray
def test_live_runtime_counts_hits_and_keeps_salts_apart(cached_engine):
    engine = cached_engine
    prompt = _prompt(10 * BLOCK + 5, salt=13)

    async def served(salt: str | None) -> tuple[list[int], dict]:
        outs = [o async for o in engine.submit(prompt, GREEDY, cache_salt=salt)]
        stats = await engine.stats()
        return [o.token_id for o in outs], stats

    async def scenario():
        return [await served(salt) for salt in (None, None, "a", "b", "a")]

    runs = asyncio.run(scenario())
    hits = [s["prefill_workers"]["prefill-0"]["prefix_cache"]["hit_tokens"] for _, s in runs]
    # Cold, then a repeat (10 full blocks; the partial one and the last token computed); the
    # first "a" and the first "b" find nothing of the unsalted entry nor of each other; the
    # second "a" finds the first one's.
    assert [b - a for a, b in zip([0, *hits], hits, strict=False)] == [0, 160, 0, 0, 160]
    scheduler = runs[-1][1]["scheduler"]["counts"]
    assert scheduler["prefix_cache_hit_tokens"] == 320  # what the workers reported back
    # The policy started both hits at the prefix it believed cached: its view agreed.
    assert runs[-1][1]["scheduler"]["policy"]["prefix_hit_tokens"] == 320
    cache = runs[-1][1]["prefill_workers"]["prefill-0"]["prefix_cache"]
    assert cache["blocks"] == 30 and cache["bytes"] > 0  # three key spaces of 10 blocks
    tokens = {tuple(t) for t, _ in runs}
    assert len(tokens) == 1 and len(next(iter(tokens))) == GREEDY.max_tokens
    from flowprefill_ray.errors import InvalidRequestError

    for bad in ("", "s" * 257, 5):
        with pytest.raises(InvalidRequestError, match="cache_salt"):
            engine.submit(prompt, GREEDY, cache_salt=bad)
