"""KV memory in bytes: the budgets (scheduling/kv_memory.py), how the policies keep them, the
config keys, and the budget a worker measures on the real tiny model (runtime/kv_budget.py).

The policy tests use the linear predictor of policy_helpers (1024 tokens = 1 s) and budgets
of 10 bytes of KV and 2 of activations per token unless said otherwise.
"""

from __future__ import annotations

import pytest
import torch
from policy_helpers import arrive, policy, run
from pydantic import ValidationError

from flowprefill_ray.model import load_model
from flowprefill_ray.model.checkpoints import TINY_MODEL_SHAPE, tiny_checkpoint
from flowprefill_ray.runtime.config import KVMemoryConfig, PrefillConfig, RuntimeConfig
from flowprefill_ray.runtime.kv_budget import kv_bytes_per_token, measure_kv_budget
from flowprefill_ray.scheduling import KVBudget, PolicyConfig, RequestStatus
from flowprefill_ray.scheduling.events import (
    Discard,
    Preempt,
    UnitCompleted,
    UnitPaused,
    WorkItem,
)
from flowprefill_ray.scheduling.kv_memory import UnitRoom


def budget(total: int, paused: int) -> KVBudget:
    return KVBudget(total, paused, kv_bytes_per_token=10, activation_bytes_per_token=2)


# --------------------------------------------------------------------------- the budget


def test_an_item_costs_its_new_kv_and_the_activations_of_one_chunk():
    b = KVBudget(
        10**9, 10**8, kv_bytes_per_token=10, activation_bytes_per_token=2, sequence_bytes=7
    )
    assert b.item_bytes(WorkItem("r", 0, 1000), chunk_tokens=8192) == 1000 * 12 + 7
    # A long prompt run as chunks keeps the activations of one chunk at a time.
    assert b.item_bytes(WorkItem("r", 0, 20000), chunk_tokens=8192) == 200000 + 16384 + 7
    # The prefix of a chunk continuation is already on the worker (partial KV).
    assert b.item_bytes(WorkItem("r", 500, 1000), chunk_tokens=8192) == 500 * 12 + 7


@pytest.mark.parametrize(
    "fields,message",
    [
        ((0, 0, 1), "budget_bytes >= 1"),
        ((100, 200, 1), "paused_budget_bytes must lie in"),
        ((100, 50, 0), "kv_bytes_per_token >= 1"),
    ],
)
def test_a_budget_that_cannot_hold_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        KVBudget(*fields)


def test_a_room_takes_what_fits_and_a_forced_item_marks_it_over():
    room = UnitRoom(budget(1000, 500), held=400, chunk_tokens=8192)
    assert room.take(WorkItem("a", 0, 40))  # 480 of the 600 free
    assert not room.take(WorkItem("b", 0, 20))  # 240 > 120
    assert room.free == 120 and not room.over_budget
    assert room.take(WorkItem("b", 0, 20), force=True)
    assert room.over_budget and room.free == -120
    unbounded = UnitRoom(None, held=0, chunk_tokens=8192)
    assert unbounded.take(WorkItem("c", 0, 10**9)) and unbounded.free is None


# --------------------------------------------------------------------------- policies


def test_a_head_that_does_not_fit_beside_paused_work_evicts_it():
    # 17 000 bytes in all, 12 000 for paused units. big (1000 tokens = 12 000 bytes) runs and
    # is preempted by mid (400 tokens = 4800): both fit. head (800 = 9600) arrives, ranks
    # below mid, and takes the worker when mid is done: beside big it would need 21 600, so
    # big, which ranks below it, is evicted. (after_pause: the pause is answered first.)
    p = policy(kv_budget=budget(17_000, 12_000), handover="after_pause")
    assert arrive(p, "big", 0.0, 1000, 60.0) == [run(1, "w0", ("big", 0, 1000))]
    assert arrive(p, "mid", 0.1, 400, 1.0) == [Preempt("w0", 1)]
    assert p.on_event(UnitPaused("w0", 1, 0.1), 0.1) == [run(2, "w0", ("mid", 0, 400))]
    assert arrive(p, "head", 0.2, 800, 3.0) == []
    decisions = p.on_event(UnitCompleted("w0", 2, 0.4), 0.5)
    assert decisions == [Discard("w0", 1), run(3, "w0", ("head", 0, 800))]
    view = p.request_view("big")
    assert (view.status, view.prefilled_tokens) == (RequestStatus.WAITING, 0)
    assert p.stats()["kv_memory"]["w0"]["held_bytes"] == 9600
    # big is recomputed from token 0 once head is done.
    assert p.on_event(UnitCompleted("w0", 3, 0.8), 1.3) == [run(4, "w0", ("big", 0, 1000))]
    stats = p.stats()
    assert (stats["evictions"], stats["evicted_requests"], stats["over_budget_units"]) == (1, 1, 0)


def test_a_victim_is_not_paused_when_the_newcomer_could_not_run_beside_it():
    # 15 000 bytes: big (12 000) paused would leave 3 000, less than mid needs (4 800).
    p = policy(kv_budget=budget(15_000, 15_000))
    assert arrive(p, "big", 0.0, 1000, 60.0) == [run(1, "w0", ("big", 0, 1000))]
    assert arrive(p, "mid", 0.1, 400, 1.0) == []
    assert p.stats()["preemptions"] == 0
    # The same with room for both preempts; with the one-hop handover mid is queued behind
    # the pausing big at once, and counted as held from then on.
    p = policy(kv_budget=budget(16_800, 15_000))
    assert arrive(p, "big", 0.0, 1000, 60.0) == [run(1, "w0", ("big", 0, 1000))]
    assert arrive(p, "mid", 0.1, 400, 1.0) == [Preempt("w0", 1), run(2, "w0", ("mid", 0, 400))]
    memory = p.stats()["kv_memory"]["w0"]
    assert (memory["held_bytes"], memory["paused_bytes"]) == (16_800, 12_000)


def test_a_one_hop_replacement_batches_only_within_what_the_victim_leaves():
    # 20 000 bytes: big (12 000) pausing, mid (4800) queued behind it; small (300 tokens =
    # 3600) would batch with mid but does not fit in the 3200 left.
    p = policy(kv_budget=budget(20_000, 15_000))
    assert arrive(p, "big", 0.0, 1000, 60.0) == [run(1, "w0", ("big", 0, 1000))]
    assert arrive(p, "small", 0.05, 300, 100.0) == []  # due after big: it waits
    assert arrive(p, "mid", 0.1, 400, 1.0) == [Preempt("w0", 1), run(2, "w0", ("mid", 0, 400))]
    p2 = policy(kv_budget=budget(21_000, 15_000))
    assert arrive(p2, "big", 0.0, 1000, 60.0) == [run(1, "w0", ("big", 0, 1000))]
    assert arrive(p2, "small", 0.05, 300, 100.0) == []
    assert arrive(p2, "mid", 0.1, 400, 1.0) == [
        Preempt("w0", 1),
        run(2, "w0", ("mid", 0, 400), ("small", 0, 300)),
    ]


@pytest.mark.parametrize("name", ["fcfs", "edf", "chunked"])
def test_non_preemptive_policies_batch_within_the_budget_and_run_an_oversized_head_alone(name):
    p = policy(name, kv_budget=budget(6_000, 3_000), chunk_size=2048)
    assert arrive(p, "huge", 0.0, 600, 60.0) == [run(1, "w0", ("huge", 0, 600))]  # 7200 bytes
    assert p.stats()["over_budget_units"] == 1
    arrive(p, "a", 0.1, 300, 60.0)
    arrive(p, "b", 0.1, 300, 60.0)
    # a (3600 bytes) fits, a + b (7200) does not.
    assert p.on_event(UnitCompleted("w0", 1, 0.5), 0.6) == [run(2, "w0", ("a", 0, 300))]
    assert p.stats()["over_budget_units"] == 1


def test_chunked_goes_on_with_a_partial_request_when_its_kv_fills_the_budget():
    # Chunks of 256 tokens (3072 bytes); 4000 bytes in all. After r1's first chunk its KV
    # (2560 bytes) stays: r2's first chunk no longer fits, so r1 goes on, alone.
    p = policy("chunked", kv_budget=budget(4_000, 0), chunk_size=256)
    assert arrive(p, "r1", 0.0, 512, 60.0) == [run(1, "w0", ("r1", 0, 256))]
    arrive(p, "r2", 0.0, 512, 60.0)
    assert p.on_event(UnitCompleted("w0", 1, 0.25), 0.25) == [run(2, "w0", ("r1", 256, 512))]
    assert p.stats()["kv_memory"]["w0"]["held_bytes"] == 2560 + 3072
    assert p.stats()["over_budget_units"] == 1  # beyond it, but the only way forward


def test_a_worker_without_a_budget_is_unbounded():
    p = policy()
    assert arrive(p, "a", 0.0, 10**6, 10**4) == [run(1, "w0", ("a", 0, 10**6))]
    assert p.stats()["kv_memory"] == {} and p.stats()["over_budget_units"] == 0


# --------------------------------------------------------------------------- config


def test_the_removed_token_budget_names_its_replacement():
    with pytest.raises(ValidationError, match="prefill.kv_memory.paused_kv_fraction"):
        PolicyConfig(paused_token_budget=3000)
    with pytest.raises(ValidationError, match="paused_token_budget was removed"):
        RuntimeConfig.model_validate({"policy": {"paused_token_budget": 3000}})


@pytest.mark.parametrize(
    "key,value",
    [
        ("gpu_fraction", 0.0),
        ("gpu_fraction", 1.5),
        ("paused_kv_fraction", -0.1),
        ("paused_kv_fraction", 2),
        ("cpu_budget_bytes", 0),
        ("budget_bytes", 1),
    ],
)
def test_bad_kv_memory_keys_are_named(key, value):
    with pytest.raises(ValidationError, match=key):
        RuntimeConfig.model_validate({"prefill": {"kv_memory": {key: value}}})


def test_kv_memory_defaults():
    config = PrefillConfig().kv_memory
    assert config == KVMemoryConfig(
        gpu_fraction=0.9, cpu_budget_bytes=2**31, paused_kv_fraction=0.5
    )


# --------------------------------------------------------------------------- measured budget


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.set_num_threads(1)
    return load_model(tiny_checkpoint(tmp_path_factory.mktemp("kv-memory"), **TINY_MODEL_SHAPE))


@pytest.mark.parametrize("granularity", ["block", "operator"])
def test_the_measured_budget_bounds_what_a_real_paused_prefill_holds(tiny_model, granularity):
    config = KVMemoryConfig(cpu_budget_bytes=50 * 2**20, paused_kv_fraction=0.25)
    b = measure_kv_budget(tiny_model, torch.device("cpu"), config, granularity, chunk_tokens=8192)
    assert (b.budget_bytes, b.paused_budget_bytes) == (50 * 2**20, int(0.25 * 50 * 2**20))
    # KV per token: what a finished prefill's KV really takes.
    tokens = [(i * 37) % 300 + 5 for i in range(300)]
    state = tiny_model.start_prefill([tokens, tokens[:100]], granularity=granularity)
    need = sum(b.item_bytes(WorkItem("r", 0, n), 8192) for n in (300, 100))
    most = 0
    while not state.run(lambda: True):  # paused at every checkpoint
        most = max(most, state.nbytes)
    most = max(most, state.nbytes)  # and finished, with its logits
    assert 0 < most <= need
    kv = state.result().kv[0]
    assert kv.nbytes == 300 * b.kv_bytes_per_token == 300 * kv_bytes_per_token(tiny_model)
    assert b.activation_bytes_per_token > 0


def test_the_prefix_cache_budget_is_set_aside_from_the_kv_budget(tiny_model):
    config = KVMemoryConfig(cpu_budget_bytes=50 * 2**20, paused_kv_fraction=0.5)
    b = measure_kv_budget(
        tiny_model, torch.device("cpu"), config, "block", 8192, reserved_bytes=20 * 2**20
    )
    assert (b.budget_bytes, b.paused_budget_bytes) == (30 * 2**20, 15 * 2**20)
