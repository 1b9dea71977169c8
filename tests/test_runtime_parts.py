"""Runtime parts that run without Ray: configuration, the metric registry, detokenization,
and the prefill executor (pause at a checkpoint, resume, chunking) on the real tiny model."""

from __future__ import annotations

import re
import threading

import pytest
import torch
from pydantic import ValidationError
from waiting import wait_until

from flowprefill_ray.model import load_model, load_tokenizer
from flowprefill_ray.model.checkpoints import tiny_checkpoint
from flowprefill_ray.runtime.config import RuntimeConfig
from flowprefill_ray.runtime.detokenizer import Detokenizer
from flowprefill_ray.runtime.messages import PrefillItemSpec
from flowprefill_ray.runtime.metrics import METRICS, RuntimeMetrics
from flowprefill_ray.runtime.model_source import TINY_MODEL_SHAPE
from flowprefill_ray.runtime.output_rules import FirstOutput, OutputRules
from flowprefill_ray.runtime.prefill_executor import PrefillExecutor, UnknownUnitError
from flowprefill_ray.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("runtime-parts"), **TINY_MODEL_SHAPE)


@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.set_num_threads(1)
    return load_model(tiny_dir)


def _item(request_id, tokens, start=0, end=None, prompt_tokens=None, sampling=GREEDY):
    end = len(tokens) if end is None else end
    return PrefillItemSpec(
        request_id, start, end, tuple(tokens[start:end]), prompt_tokens or len(tokens), sampling
    )


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(i * 37 + salt) % 480 + 3 for i in range(n)]


# ------------------------------------------------------------------------ configuration


def test_config_rejects_bad_combinations_with_clear_messages():
    with pytest.raises(ValidationError, match="one worker per GPU"):
        RuntimeConfig.model_validate({"placement": {"prefill_num_gpus": 0.5}})
    with pytest.raises(ValidationError, match="needs GPU prefill and decode workers"):
        RuntimeConfig.model_validate({"kv_transfer": {"mode": "nccl"}})
    with pytest.raises(ValidationError, match="not a checkpoint directory"):
        RuntimeConfig.model_validate({"model": {"path": "/nonexistent/model"}})
    with pytest.raises(ValidationError, match="extra"):
        RuntimeConfig.model_validate({"placement": {"num_prefil_workers": 2}})
    with pytest.raises(ValidationError):
        RuntimeConfig.model_validate({"policy": {"name": "lottery"}})
    with pytest.raises(ValidationError, match="at least 4 distinct positive lengths"):
        RuntimeConfig.model_validate({"prefill": {"profile_tokens": [16, 64, 64, 512]}})


def test_predictor_profile_reaches_the_longest_prompt_served():
    prefill = RuntimeConfig().prefill
    # The default profile times the long prompts too (the predictor only extrapolates past it).
    assert max(prefill.profile_tokens) >= 4096
    assert prefill.profile_lengths(16383) == list(prefill.profile_tokens)
    # Lengths the engine would refuse are not timed; the limit itself is.
    assert prefill.profile_lengths(1000) == [16, 64, 128, 256, 512, 1000]
    # A tiny context still gets the 4 lengths a cubic fit needs.
    assert len(prefill.profile_lengths(40)) >= 4 and max(prefill.profile_lengths(40)) == 40


def test_config_parses_nested_dicts_from_yaml_shape():
    config = RuntimeConfig.model_validate(
        {"placement": {"num_prefill_workers": 2, "strategy": "SPREAD"}, "policy": {"name": "fcfs"}}
    )
    assert config.placement.num_prefill_workers == 2
    assert config.policy.name == "fcfs"
    assert config.scheduler_name == "flowprefill-scheduler"


# ---------------------------------------------------------------------- metric registry


def test_metric_registry_follows_the_naming_rules():
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    for spec in METRICS:
        assert re.fullmatch(r"flowprefill_[a-z0-9_]+", spec.name), spec.name
        assert spec.description
        if spec.kind == "counter":
            assert spec.name.endswith("_total"), spec.name
        if spec.kind == "histogram":
            assert list(spec.boundaries) == sorted(spec.boundaries) and spec.boundaries
    ttft = next(s for s in METRICS if s.name == "flowprefill_time_to_first_token_seconds")
    assert sum(1 for b in ttft.boundaries if b < 0.1) >= 6  # fine below 100 ms
    assert ttft.labels == ("slo_class",)


def test_runtime_metrics_refuses_unknown_names_kinds_and_labels():
    metrics = RuntimeMetrics()
    with pytest.raises(KeyError, match="not in"):
        metrics.inc("flowprefill_made_up_total")
    with pytest.raises(TypeError, match="is a histogram"):
        metrics.inc("flowprefill_time_to_first_token_seconds")
    with pytest.raises(ValueError, match="takes labels"):
        metrics.observe("flowprefill_time_to_first_token_seconds", 0.1, worker_id="x")


# ---------------------------------------------------------------------- detokenization


def test_detokenizer_deltas_join_to_the_full_text_and_hold_back_stop_prefixes(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    ids = tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)
    detok = Detokenizer(tokenizer, stop=["France is"])
    deltas = [detok.add(t) for t in ids]
    full = tokenizer.decode(ids, skip_special_tokens=True)
    # Up to 8 characters (len("France is") - 1) are held back until the output ends.
    shown = "".join(deltas)
    assert full.startswith(shown) and len(full) - len(shown) <= len("France is") - 1
    assert shown + detok.finish(full) == full


def test_first_output_is_decided_once_with_the_decode_workers_rules(model, tiny_dir):
    """What the prefill worker decides for a first token (output_rules.py) matches what a
    decode worker's checker, replaying that token, would say; the engine shows it as is."""
    tokenizer = load_tokenizer(tiny_dir)
    rules = OutputRules.for_model(model, tokenizer)
    eos = next(iter(rules.eos_ids))
    word = tokenizer.encode("Paris", add_special_tokens=False)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)
    # EOS ends it and is not shown; max_tokens=1 ends it and is shown with its text.
    assert rules.first_output(greedy, 5, eos) == FirstOutput("stop", False, "")
    one = greedy.model_copy(update={"max_tokens": 1})
    text = tokenizer.decode([word], skip_special_tokens=True)
    assert rules.first_output(one, 5, word) == FirstOutput("length", True, text)
    # A stop string completed by the first token: the token and the string are dropped.
    stop = greedy.model_copy(update={"stop": [text]})
    assert rules.first_output(stop, 5, word) == FirstOutput("stop", False, "")
    # The last position of the context ends it too.
    assert rules.first_output(greedy, rules.context_tokens - 1, word).finish_reason == "length"
    # Not final: the decode worker carries on from the same checker and detokenizer state.
    going = rules.first_output(greedy, 5, word)
    assert going == FirstOutput(None, True, text)
    checker, detok = rules.continue_after(greedy, 5, word)
    assert checker.token_ids == [word] and not checker.finished
    assert detok.emitted == going.text


# --------------------------------------------------------------------- prefill executor


def test_paused_prefill_resumes_to_the_same_kv_and_first_token(model, hold_at_first_checkpoint):
    tokens = _prompt(1500)
    reference = model.prefill(tokens)
    executor = PrefillExecutor(model, "block", chunk_tokens=8192)
    held = hold_at_first_checkpoint(1)
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.update(first=executor.run(1, [_item("r", tokens)]))
    )
    runner.start()
    assert held.wait(60), "the prefill never reached a checkpoint"
    paused, blocking_s = executor.request_pause(1)
    runner.join()

    assert paused and outcome["first"].status == "paused"
    # It stopped at the next checkpoint: the wait is within the block that was in flight.
    assert 0 < blocking_s <= outcome["first"].block_s + 0.002
    paused_stats = executor.stats()
    assert paused_stats["paused_units"] == 1
    # The paused state's memory is counted: at least the fp32 hidden states of the prompt.
    assert paused_stats["paused_bytes"] >= len(tokens) * model.config.hidden_size * 4
    done = executor.resume(1)
    assert done.status == "completed"
    assert done.executed_s >= outcome["first"].executed_s
    kv = executor.take_kv("r")
    assert torch.equal(kv.k, reference.kv[0].k) and torch.equal(kv.v, reference.kv[0].v)
    assert done.first_tokens[0].token_id == int(reference.last_logits[0].argmax())
    assert executor.stats()["held_kv_bytes"] == 0
    assert executor.stats()["paused_bytes"] == 0


def test_long_prompt_runs_as_back_to_back_chunks_with_the_same_result(model):
    tokens = _prompt(700, salt=5)
    reference = model.prefill(tokens)
    executor = PrefillExecutor(model, "block", chunk_tokens=256)
    done = executor.run(1, [_item("r", tokens)])
    kv = executor.take_kv("r")
    assert kv.num_tokens == 700
    torch.testing.assert_close(kv.k, reference.kv[0].k, rtol=1e-4, atol=1e-5)
    assert done.first_tokens[0].token_id == int(reference.last_logits[0].argmax())


def test_batched_unit_and_policy_chunks_keep_per_request_kv(model):
    a, b = _prompt(120, 1), _prompt(300, 2)
    executor = PrefillExecutor(model, "block", chunk_tokens=8192)
    # b arrives as two policy chunks: [0, 100) in one unit, then [100, 300) with a.
    first = executor.run(1, [_item("b", b, 0, 100)])
    assert first.first_tokens == () and executor.stats()["partial_kv_requests"] == 1
    second = executor.run(2, [_item("a", a), _item("b", b, 100, 300)])
    assert {f.request_id for f in second.first_tokens} == {"a", "b"}
    for rid, tokens in (("a", a), ("b", b)):
        reference = model.prefill(tokens)
        torch.testing.assert_close(executor.take_kv(rid).k, reference.kv[0].k, rtol=1e-4, atol=1e-5)


def test_preempt_of_a_finished_unit_answers_at_once_and_discard_frees_state(model):
    executor = PrefillExecutor(model, "block")
    executor.run(1, [_item("r", _prompt(32))])
    assert executor.request_pause(1) == (False, 0.0)
    # A preempt that overtakes its run call pauses the unit before any compute.
    answer = {}
    pauser = threading.Thread(target=lambda: answer.update(r=executor.request_pause(2)))
    pauser.start()

    def preempt_recorded() -> bool:
        with executor._lock:  # the preempt leaves a paused record for the unit to come
            unit = executor._units.get(2)
            return unit is not None and unit.pause.is_set()

    wait_until(preempt_recorded, 60, "the early preempt to be recorded")
    early = executor.run(2, [_item("s", _prompt(64))])
    pauser.join()
    assert early.status == "paused" and early.executed_s == 0.0
    assert answer["r"][0] is True  # the waiting preempt learns that the unit paused
    assert executor.discard(2) and executor.stats()["paused_units"] == 0
    with pytest.raises(UnknownUnitError):
        executor.resume(2)
    assert executor.drop_request("r") > 0 and executor.stats()["held_kv_bytes"] == 0


def test_first_token_that_ends_the_request_keeps_no_kv(model):
    executor = PrefillExecutor(model, "block")
    one = SamplingParams(temperature=0.0, max_tokens=1)
    done = executor.run(1, [_item("r", _prompt(40), sampling=one)])
    assert done.first_tokens[0].finish_reason == "length"
    assert executor.stats()["ready_kv_requests"] == 0


def test_reset_stops_the_running_unit_and_drops_everything_a_dead_scheduler_left(
    model, hold_at_first_checkpoint
):
    """What a restarted scheduler's adoption does to a worker: nothing stays held, and unit
    ids start afresh (the new scheduler numbers its units from 1 again)."""
    executor = PrefillExecutor(model, "block")
    executor.run(1, [_item("ready", _prompt(40))])  # finished, its KV waits for a hand-off
    held = hold_at_first_checkpoint(2)
    outcome = {}
    runner = threading.Thread(
        target=lambda: outcome.update(r=executor.run(2, [_item("long", _prompt(1500, 1))]))
    )
    runner.start()
    assert held.wait(60), "the long unit never reached a checkpoint"
    dropped = executor.reset()
    runner.join()
    assert outcome["r"].status == "paused"  # stopped at a checkpoint, not run to the end
    assert dropped["units"] == 1 and dropped["kv_requests"] == 1 and dropped["bytes"] > 0
    stats = executor.stats()
    assert stats["paused_units"] == 0 and stats["held_kv_bytes"] == 0
    assert stats["running_unit"] is None
    # Unit 1 is new again: it runs instead of being answered as "already finished".
    done = executor.run(1, [_item("again", _prompt(30, 2))])
    assert done.status == "completed" and done.first_tokens[0].request_id == "again"


def test_worker_refuses_unit_calls_from_a_replaced_scheduler(tiny_dir):
    from flowprefill_ray.runtime.config import ModelSource, PrefillConfig
    from flowprefill_ray.runtime.prefill_worker import PrefillWorker, StaleSchedulerError

    worker = PrefillWorker("p0", ModelSource(path=str(tiny_dir)), PrefillConfig(), 8192)
    adopted = worker.adopt(epoch=7)
    assert adopted == {"units": 0, "kv_requests": 0, "bytes": 0, "kv_budget": worker.kv_budget}
    assert adopted["kv_budget"].budget_bytes == PrefillConfig().kv_memory.cpu_budget_bytes
    assert worker.run(1, [_item("a", _prompt(20))], epoch=7).status == "completed"
    with pytest.raises(StaleSchedulerError, match="epoch 6, now serving epoch 7"):
        worker.run(2, [_item("b", _prompt(20))], epoch=6)
    with pytest.raises(StaleSchedulerError):
        worker.preempt(2, epoch=6)
    assert worker.stats()["ready_kv_requests"] == 1  # only the current scheduler's request
