"""``prefill.checkpoint_sync`` from the config to the prefill that runs: "auto" resolves per
device (bounded on CUDA, sync on CPU), the worker hands the mode to its executor, every
``PrefillState`` the executor starts carries it, and a bounded-mode pause on CPU still stops at
a checkpoint and resumes to the same KV and first token as an uninterrupted prefill."""

from __future__ import annotations

import threading

import pytest
import torch
from pydantic import ValidationError

from flowprefill_ray.model import load_model
from flowprefill_ray.model.checkpoints import tiny_checkpoint
from flowprefill_ray.runtime import prefill_units
from flowprefill_ray.runtime.config import ModelSource, PrefillConfig, RuntimeConfig
from flowprefill_ray.runtime.messages import PrefillItemSpec
from flowprefill_ray.runtime.model_source import TINY_MODEL_SHAPE
from flowprefill_ray.runtime.prefill_executor import PrefillExecutor
from flowprefill_ray.runtime.prefill_worker import PrefillWorker
from flowprefill_ray.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("checkpoint-sync"), **TINY_MODEL_SHAPE)


@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.set_num_threads(1)
    return load_model(tiny_dir)


def _item(request_id: str, tokens: list[int]) -> PrefillItemSpec:
    return PrefillItemSpec(request_id, 0, len(tokens), tuple(tokens), len(tokens), GREEDY)


def _prompt(n: int) -> list[int]:
    return [(i * 37 + 11) % 480 + 3 for i in range(n)]


def test_auto_is_bounded_on_cuda_and_sync_on_cpu_and_explicit_modes_stay():
    auto = PrefillConfig()
    assert auto.checkpoint_sync == "auto" and auto.max_run_ahead == 2
    assert auto.sync_mode("cuda") == "bounded"
    assert auto.sync_mode("cpu") == "sync"
    for mode in ("sync", "bounded"):
        chosen = PrefillConfig(checkpoint_sync=mode)
        assert chosen.sync_mode("cuda") == chosen.sync_mode("cpu") == mode


def test_bad_checkpoint_sync_settings_are_refused_naming_the_field():
    with pytest.raises(ValidationError, match=r"prefill\.max_run_ahead"):
        RuntimeConfig.model_validate({"prefill": {"max_run_ahead": 0}})
    with pytest.raises(ValidationError, match=r"prefill\.checkpoint_sync"):
        RuntimeConfig.model_validate({"prefill": {"checkpoint_sync": "never"}})


@pytest.mark.parametrize(
    ("configured", "expected"), [("auto", "sync"), ("bounded", "bounded"), ("sync", "sync")]
)
def test_worker_hands_the_resolved_mode_to_every_prefill_it_starts(
    tiny_dir, monkeypatch, configured, expected
):
    prefill = PrefillConfig(checkpoint_sync=configured, max_run_ahead=3)
    worker = PrefillWorker("p0", ModelSource(path=str(tiny_dir), device="cpu"), prefill, 8192)
    assert worker.checkpoint_sync == expected
    assert worker.executor.checkpoint_sync == expected and worker.executor.max_run_ahead == 3

    started = []
    start_prefill = worker.model.start_prefill

    def recording(*args, **kwargs):
        state = start_prefill(*args, **kwargs)
        started.append(state.checkpoint_sync)
        return state

    monkeypatch.setattr(worker.model, "start_prefill", recording)
    assert worker.run(1, [_item("a", _prompt(40))]).status == "completed"
    worker.profile([16, 32], repeats=1)
    assert len(started) >= 4  # the unit, the profile's warm-up and its two lengths
    assert {(s.mode, s.max_run_ahead) for s in started} == {(expected, 3)}


def test_bounded_mode_pause_on_cpu_stops_at_a_checkpoint_and_resumes_identically(
    model, monkeypatch
):
    tokens = _prompt(1200)
    reference = model.prefill(tokens)
    executor = PrefillExecutor(model, "block", checkpoint_sync="bounded", max_run_ahead=1)
    # Hold the unit at its first checkpoint until the pause request is in (no timing race).
    reached = threading.Event()
    should_pause = prefill_units.WorkUnit.should_pause

    def gated(unit) -> bool:
        if not reached.is_set():
            reached.set()
            assert unit.pause.wait(60), "no pause request reached the held unit"
        return should_pause(unit)

    monkeypatch.setattr(prefill_units.WorkUnit, "should_pause", gated)
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.update(first=executor.run(1, [_item("r", tokens)]))
    )
    runner.start()
    assert reached.wait(60), "the prefill never reached a checkpoint"
    paused, blocking_s = executor.request_pause(1)
    runner.join()

    assert paused and outcome["first"].status == "paused"
    state = executor._units[1].state
    assert state.checkpoint_sync.mode == "bounded" and state.checkpoint_sync.max_run_ahead == 1
    # It stopped at the first checkpoint: one block done, the rest still to run.
    assert state.checkpoints_passed == 1 < state.num_checkpoints
    assert 0 < blocking_s <= outcome["first"].block_s + 0.002
    done = executor.resume(1)
    assert done.status == "completed"
    kv = executor.take_kv("r")
    assert torch.equal(kv.k, reference.kv[0].k) and torch.equal(kv.v, reference.kv[0].v)
    assert done.first_tokens[0].token_id == int(reference.last_logits[0].argmax())
