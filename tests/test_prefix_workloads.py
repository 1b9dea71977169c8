"""Traces with shared prefixes: the shipped Mooncake trace, block rescaling, the multi-turn
chat workload, and the load generator's prompts, whose shared hash-id blocks must be shared
tokens for a live replay to exercise a prefix cache."""

from __future__ import annotations

import gzip
import json
import math
from collections import defaultdict

import pytest
from pydantic import ValidationError

from flowprefill_ray.workloads import (
    MultiTurnConfig,
    TraceRecord,
    Workload,
    load_builtin,
    load_mooncake,
    load_normalized_csv,
    merge_tenants,
    multiturn_workload,
    turn_prompt_tokens,
)
from loadgen.client import request_prompt_ids, request_prompt_text
from loadgen.config import ReplayConfig
from loadgen.plan import load_trace_workload, plan_requests

TARGETS = {"text": 1.0, "image": 1.0, "search": 1.0, "file": 1.0}


@pytest.fixture(scope="module")
def mooncake() -> Workload:
    return load_builtin("mooncake_synthetic")


def repeated_block_fraction(workload: Workload) -> float:
    """Share of all prompt blocks whose (chained) hash id some earlier request already had:
    the hit ratio of an unbounded prefix cache."""
    seen: set[int] = set()
    total = repeated = 0
    for record in workload:
        total += len(record.hash_ids)
        repeated += sum(h in seen for h in record.hash_ids)
        seen.update(record.hash_ids)
    return repeated / total


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


# ----------------------------------------------------------------------------- the shipped trace


def test_shipped_mooncake_trace_keeps_hash_ids_and_512_token_blocks(mooncake):
    assert mooncake.name == "mooncake_synthetic" and mooncake.block_tokens == 512
    assert len(mooncake) == 3993
    assert 1000 < mooncake.duration_s < 1050  # 17 minutes, timestamps read as milliseconds
    assert mooncake[0].arrival_s == 0.0
    # Every prompt spans exactly its blocks: k - 1 full ones and a last one of 1..512 tokens.
    assert all(len(r.hash_ids) == math.ceil(r.prompt_tokens / 512) for r in mooncake)
    assert all(isinstance(h, int) for r in mooncake for h in r.hash_ids)
    assert max(r.prompt_tokens for r in mooncake) == 191378


def test_about_64_percent_of_mooncake_blocks_repeat_an_earlier_prefix(mooncake):
    # The trace's README states ~64 %; computed here from the hash ids themselves.
    assert 0.62 < repeated_block_fraction(mooncake) < 0.66
    # Chained ids: a repeated block's whole prefix was seen before too, so a block-level
    # repeat is a prefix-cache hit, not a coincidence in the middle of a prompt.
    seen_prefixes: set[tuple[int, ...]] = set()
    for record in mooncake:
        for k in range(1, len(record.hash_ids) + 1):
            seen_prefixes.add(record.hash_ids[:k])
    assert len(seen_prefixes) == len({h for r in mooncake for h in r.hash_ids})


def test_gzipped_and_plain_trace_files_read_the_same(tmp_path):
    rows = [
        {"timestamp": 1000, "input_length": 600, "output_length": 4, "hash_ids": [0, 1]},
        {"timestamp": 1500, "input_length": 100, "output_length": 2, "hash_ids": [0]},
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "t.jsonl").write_text(text)
    with gzip.open(tmp_path / "t.jsonl.gz", "wt") as f:
        f.write(text)
    plain, zipped = load_mooncake(tmp_path / "t.jsonl"), load_mooncake(tmp_path / "t.jsonl.gz")
    assert zipped.records == plain.records and zipped.name == plain.name == "t"
    assert [r.arrival_s for r in zipped] == [0.0, 0.5] and zipped.block_tokens == 512
    with gzip.open(tmp_path / "n.csv.gz", "wt") as f:
        f.write("arrival_s,input_tokens,output_tokens\n0.0,10,1\n2.5,20,3\n")
    assert [r.prompt_tokens for r in load_normalized_csv(tmp_path / "n.csv.gz")] == [10, 20]


# ----------------------------------------------------------------------------- block rescaling


def test_smaller_blocks_shrink_prompts_and_keep_which_blocks_are_shared(mooncake):
    small = mooncake.with_block_tokens(32)
    assert small.block_tokens == 32 and len(small) == len(mooncake)
    for big, scaled in zip(mooncake, small, strict=True):
        assert scaled.hash_ids == big.hash_ids and scaled.arrival_s == big.arrival_s
        assert len(scaled.hash_ids) == math.ceil(scaled.prompt_tokens / 32)
        assert abs(scaled.prompt_tokens - big.prompt_tokens / 16) <= 1
    median = sorted(r.prompt_tokens for r in small)[len(small) // 2]
    assert 700 < median < 750  # 11 587 / 16
    # Slicing and rate scaling (what a replay does next) keep the block size.
    shaped = small.window(60.0, 120.0).head(20).scale_rate(2.0)
    assert shaped.block_tokens == 32 and all(r.hash_ids for r in shaped)
    with pytest.raises(ValueError, match="no hash-id blocks"):
        load_builtin("azure_2023_conv").with_block_tokens(32)


def test_a_record_whose_length_contradicts_its_blocks_is_refused():
    w = Workload("w", (TraceRecord(0.0, 2000, 1, hash_ids=(1, 2)),), block_tokens=512)
    with pytest.raises(ValueError, match="2000 tokens cannot have 2 blocks of 512"):
        w.with_block_tokens(16)


def test_tenants_do_not_share_blocks_by_numbering_them_alike():
    a = multiturn_workload(MultiTurnConfig(conversations=2, turns=2, block_tokens=16))
    b = multiturn_workload(MultiTurnConfig(conversations=2, turns=2, block_tokens=16, seed=1))
    merged = merge_tenants([(a, "urgent"), (b, "relaxed")])
    ids = {
        c: {h for r in merged if r.slo_class == c for h in r.hash_ids}
        for c in ("urgent", "relaxed")
    }
    assert ids["urgent"] and ids["relaxed"] and not ids["urgent"] & ids["relaxed"]
    assert merged.block_tokens == 16
    with pytest.raises(ValueError, match="different hash-id block sizes"):
        merge_tenants([(a, "urgent"), (load_builtin("mooncake_synthetic").head(3), "relaxed")])


# ----------------------------------------------------------------------------- loadgen prompts


def test_loadgen_prompts_share_exactly_the_blocks_their_hash_ids_share():
    replay = ReplayConfig(trace="mooncake[block=16]", max_requests=4000, seed=3)
    plan = plan_requests(load_trace_workload(replay.trace), replay, TARGETS)
    assert len(plan) == 3993 and all(p.block_tokens == 16 for p in plan)
    # Requests that could share anything open with the same block: compare within such groups.
    by_first_block = defaultdict(list)
    for p in plan:
        by_first_block[p.hash_ids[0]].append(p)
    pairs = [(a, b) for g in by_first_block.values() for i, a in enumerate(g) for b in g[i + 1 :]]
    pairs += list(zip(plan[:50], plan[50:100], strict=True))  # and some sharing nothing
    checked = 0
    for a, b in pairs:
        k = common_prefix(a.hash_ids, b.hash_ids)
        pa, pb = request_prompt_ids(replay, a), request_prompt_ids(replay, b)
        assert (len(pa), len(pb)) == (a.prompt_tokens, b.prompt_tokens)
        shared = min(k * 16, len(pa), len(pb))
        assert pa[:shared] == pb[:shared]
        if k < min(len(a.hash_ids), len(b.hash_ids)) - 1:  # both have a full block k: it differs
            assert pa[k * 16 : (k + 1) * 16] != pb[k * 16 : (k + 1) * 16]
            checked += k > 0  # a real shared prefix, then divergence
    assert checked > 800
    prompt = request_prompt_ids(replay, plan[5])
    assert all(16 <= t < 256 for t in prompt)  # the configured token id range
    # The same run seed rebuilds the same prompt; another seed, other tokens.
    assert request_prompt_ids(replay, plan[5]) == prompt
    assert request_prompt_ids(replay.model_copy(update={"seed": 4}), plan[5])[:16] != prompt[:16]


def test_a_prompt_longer_than_its_blocks_ends_with_its_own_tokens():
    replay = ReplayConfig(trace="mooncake[block=8]", max_requests=4000, prompt_scale=2.0)
    plan = plan_requests(load_trace_workload(replay.trace), replay, TARGETS)
    by_ids = defaultdict(list)
    for p in plan:
        by_ids[p.hash_ids].append(p)
    a, b = next(g for g in by_ids.values() if len(g) > 1)[:2]
    pa, pb = request_prompt_ids(replay, a), request_prompt_ids(replay, b)
    blocks = len(a.hash_ids) * 8
    assert len(pa) == a.prompt_tokens > blocks
    assert pa[:blocks] == pb[:blocks] and pa[blocks:] != pb[blocks:]


def test_chat_prompts_share_the_words_of_shared_blocks():
    replay = ReplayConfig(trace="multiturn[conversations=1,turns=2,block=8]", seed=2)
    first, second = plan_requests(load_trace_workload(replay.trace), replay, TARGETS)
    words = [request_prompt_text(replay, p).split() for p in (first, second)]
    assert [len(w) for w in words] == [first.prompt_tokens, second.prompt_tokens]
    assert words[1][: len(words[0])] == words[0]


# ----------------------------------------------------------------------------- multi-turn


def conversations_of(workload: Workload, shared_blocks: int) -> list[list[TraceRecord]]:
    """Records grouped by conversation (its first own block), turns in arrival order."""
    by_conversation: dict[int, list[TraceRecord]] = defaultdict(list)
    for record in workload:
        by_conversation[record.hash_ids[shared_blocks]].append(record)
    return list(by_conversation.values())


def test_each_turn_resends_the_previous_prompt_and_answer_as_hash_ids():
    config = MultiTurnConfig(
        conversations=5, turns=4, system_prompt_tokens=100, question_tokens=20,
        answer_tokens=30, think_time_s=3.0, conversation_interval_s=1.0, block_tokens=16,
    )  # fmt: skip
    workload = multiturn_workload(config)
    assert len(workload) == 20 and workload.block_tokens == 16
    conversations = conversations_of(workload, shared_blocks=100 // 16)
    assert len(conversations) == 5
    for turns in conversations:
        assert [r.prompt_tokens for r in turns] == [120, 170, 220, 270]
        assert [turn_prompt_tokens(config, n) for n in range(4)] == [120, 170, 220, 270]
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.prompt_tokens == prev.prompt_tokens + prev.output_tokens + 20
            assert nxt.hash_ids[: len(prev.hash_ids)] == prev.hash_ids
            assert nxt.arrival_s - prev.arrival_s == pytest.approx(3.0)
        assert all(len(r.hash_ids) == math.ceil(r.prompt_tokens / 16) for r in turns)
    # Conversations share the system prompt's 6 full blocks and nothing more.
    firsts = [turns[0].hash_ids for turns in conversations]
    assert {common_prefix(a, b) for a in firsts for b in firsts if a is not b} == {6}
    assert multiturn_workload(config) == workload  # seeded


def test_turn_prompts_begin_with_the_previous_prompt_and_its_stand_in_answer():
    replay = ReplayConfig(
        trace="multiturn[conversations=3,turns=3,system_prompt_tokens=40,block=16]", seed=5
    )
    plan = plan_requests(load_trace_workload(replay.trace), replay, TARGETS)
    prompts = {p.request_id: request_prompt_ids(replay, p) for p in plan}
    followed = 0
    for prev in plan:
        for nxt in plan:
            if (
                nxt.prompt_tokens > prev.prompt_tokens
                and nxt.hash_ids[: len(prev.hash_ids)] == prev.hash_ids
            ):
                p, n = prompts[prev.request_id], prompts[nxt.request_id]
                assert n[: len(p)] == p  # exactly the previous prompt, then the answer...
                followed += 1
    assert followed == 3 * 3  # per conversation: turn 1 after 0, 2 after 0 and 2 after 1
    # ...and different conversations share only the system prompt's two full blocks.
    first_turns = [p for p in plan if p.prompt_tokens == plan[0].prompt_tokens]
    a, b = (prompts[p.request_id] for p in first_turns[:2])
    assert a[:32] == b[:32] and a[32:48] != b[32:48]


def test_multiturn_config_mistakes_name_the_field():
    with pytest.raises(ValidationError, match="turns"):
        MultiTurnConfig(turns=0)
    with pytest.raises(ValidationError, match="multiturn.*question_tokens"):
        ReplayConfig(trace="multiturn[question_tokens=0]")
    with pytest.raises(ValidationError, match="takes no options"):
        ReplayConfig(trace="azure-conv[block=16]")
    with pytest.raises(ValidationError, match="block must be an integer >= 1"):
        ReplayConfig(trace="mooncake[block=x]=urgent,azure-code=relaxed")


def test_a_plan_turned_back_into_a_workload_keeps_its_blocks():
    """benchmarks/sim_compare.py simulates what was sent: the sharing must survive the trip."""
    from repo_scripts import load_script

    replay = ReplayConfig(trace="multiturn[conversations=2,turns=3,block=16]")
    plan = plan_requests(load_trace_workload(replay.trace), replay, TARGETS)
    workload = load_script("benchmarks/sim_compare.py").plan_workload(plan)
    assert workload.block_tokens == 16
    assert [r.hash_ids for r in workload] == [p.hash_ids for p in plan]
    assert all(r.hash_ids for r in workload)


def test_requests_carry_the_full_blocks_of_their_hash_ids():
    from flowprefill_ray.workloads import load_builtin

    workload = load_builtin("mooncake_synthetic").head(50).with_block_tokens(32)
    for record, request in zip(workload, workload.to_requests(), strict=True):
        full = record.prompt_tokens // 32
        assert request.prefix_hashes == record.hash_ids[:full]
        assert len(request.prefix_hashes) in (len(record.hash_ids), len(record.hash_ids) - 1)
