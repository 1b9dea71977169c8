"""A prefill paused at any checkpoint, with other work run meanwhile, resumes to the same result."""

from __future__ import annotations

import threading

import pytest
import torch
from model_checkpoints import tiny_model_dir

from flowprefill_ray.model import Cursor, Granularity, PrefillResult, load_model
from flowprefill_ray.model.prefill import LAYER_OPERATORS

LONG = list(range(3, 120))
OTHER = [[5, 9, 11, 2, 7], list(range(40, 77))]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tiny_model_dir(tmp_path_factory, "qwen2_bias"))


@pytest.fixture(scope="module")
def uninterrupted(model):
    def run(sequences, prefixes=None) -> PrefillResult:
        state = model.start_prefill(sequences, prefixes=prefixes)
        assert state.run(lambda: False)
        return state.result()

    return run


def _assert_identical(a: PrefillResult, b: PrefillResult) -> None:
    assert torch.equal(a.last_logits, b.last_logits)
    assert len(a.kv) == len(b.kv)
    for x, y in zip(a.kv, b.kv, strict=True):
        assert torch.equal(x.k, y.k) and torch.equal(x.v, y.v)


def _pause_at(n: int):
    """A should_pause that answers yes at the n-th checkpoint it is asked about (1-based)."""
    asked = 0

    def should_pause() -> bool:
        nonlocal asked
        asked += 1
        return asked == n

    return should_pause


@pytest.mark.parametrize("granularity", list(Granularity))
def test_pause_at_every_checkpoint_with_other_work_between_is_bit_identical(
    model, uninterrupted, granularity
):
    expected, expected_other = uninterrupted([LONG]), uninterrupted(OTHER)
    num_checkpoints = model.start_prefill([LONG], granularity=granularity).num_checkpoints
    layers = model.config.num_hidden_layers
    assert (
        num_checkpoints
        == {
            Granularity.BLOCK: 2 * layers,
            Granularity.LAYER: layers,
            Granularity.OPERATOR: 1 + len(LAYER_OPERATORS) * layers + 1,
        }[granularity]
    )
    for n in range(1, num_checkpoints + 1):
        state = model.start_prefill([LONG], granularity=granularity)
        assert state.run(_pause_at(n)) is False
        assert state.checkpoints_passed == n and not state.done
        # Another request runs to completion on the same model while this one waits.
        other = model.start_prefill(OTHER, granularity=granularity)
        assert other.run(lambda: False)
        _assert_identical(other.result(), expected_other)
        assert state.run(lambda: False) is True
        assert state.checkpoints_passed == num_checkpoints
        _assert_identical(state.result(), expected)


def test_two_paused_prefills_interleave_checkpoint_by_checkpoint(model, uninterrupted):
    first = model.start_prefill([LONG], granularity=Granularity.OPERATOR)
    second = model.start_prefill(OTHER, granularity=Granularity.BLOCK)
    while not (first.done and second.done):
        for state in (first, second):
            if not state.done:
                state.run_until_checkpoint()
    _assert_identical(first.result(), uninterrupted([LONG]))
    _assert_identical(second.result(), uninterrupted(OTHER))


def test_paused_chunk_with_a_prefix_resumes_bit_identically(model, uninterrupted):
    prefix = uninterrupted([LONG[:50]]).kv[0]
    expected = uninterrupted([LONG[50:]], prefixes=[prefix])
    state = model.start_prefill([LONG[50:]], prefixes=[prefix])
    state.run(_pause_at(3))
    uninterrupted(OTHER)
    state.run(lambda: False)
    _assert_identical(state.result(), expected)
    assert state.result().kv[0].num_tokens == len(LONG)


def test_step_runs_one_operator_and_the_cursor_walks_the_forward(model):
    state = model.start_prefill([LONG], granularity=Granularity.OPERATOR)
    layers = model.config.num_hidden_layers
    assert state.cursor == Cursor(-1, 0) and state.next_operator == "embed"
    state.step()
    assert state.cursor == Cursor(0, 0) and state.next_operator == "input_norm"
    seen = []
    while not state.done:
        seen.append(state.next_operator)
        state.step()
    assert seen == list(LAYER_OPERATORS) * layers + ["final_norm", "lm_head"]
    assert state.cursor == Cursor(layers + 1, 0)
    assert state.num_operators == 1 + len(seen)
    with pytest.raises(RuntimeError, match="finished"):
        state.step()


def test_layer_granularity_pauses_only_between_layers(model):
    state = model.start_prefill([LONG], granularity=Granularity.LAYER)
    # The last checkpoint lies between the last layer and the head (final norm, lm_head).
    for layer in range(1, model.config.num_hidden_layers + 1):
        assert state.run_until_checkpoint() is False
        assert state.cursor == Cursor(layer, 0)
    assert state.next_operator == "final_norm"
    assert state.run_until_checkpoint() is True


def test_block_granularity_pauses_after_attention_and_after_mlp(model):
    state = model.start_prefill([LONG], granularity=Granularity.BLOCK)
    state.run_until_checkpoint()
    assert state.next_operator == "post_norm" and state.cursor.layer == 0
    state.run_until_checkpoint()
    assert state.next_operator == "input_norm" and state.cursor.layer == 1


def test_paused_state_accounts_time_and_memory(model):
    config = model.config
    state = model.start_prefill([LONG], granularity=Granularity.LAYER)
    assert state.num_tokens == len(LONG) and state.executed_s == 0.0
    kv_bytes_per_layer = 2 * len(LONG) * config.num_key_value_heads * config.head_dim * 4
    held, spent = [], []
    while not state.run_until_checkpoint():
        layers_done = state.cursor.layer
        # KV of the finished layers plus the hidden state and residual in flight.
        activations = 2 * len(LONG) * config.hidden_size * 4
        assert state.nbytes >= layers_done * kv_bytes_per_layer + activations
        held.append(state.nbytes)
        spent.append(state.executed_s)
    assert held == sorted(held) and len(set(held)) == len(held)
    assert spent == sorted(spent) and spent[0] > 0
    with_prefix = model.start_prefill([LONG[:4]], prefixes=[state.result().kv[0]])
    assert with_prefix.nbytes >= state.result().kv[0].nbytes


def test_result_before_done_is_an_error(model):
    state = model.start_prefill([LONG])
    state.run_until_checkpoint()
    with pytest.raises(RuntimeError, match="not finished"):
        state.result()


def test_pause_requested_from_another_thread(model, uninterrupted):
    """The scheduler's thread sets the flag; the runner stops at the next checkpoint."""
    pause = threading.Event()
    state = model.start_prefill([LONG], granularity=Granularity.OPERATOR)
    checkpoints_seen = []

    def should_pause() -> bool:
        checkpoints_seen.append(state.cursor)
        if len(checkpoints_seen) == 4:
            # Hand control to a second thread that raises the flag, and wait for it.
            raiser = threading.Thread(target=pause.set)
            raiser.start()
            raiser.join()
        return pause.is_set()

    result: list[bool] = []
    runner = threading.Thread(target=lambda: result.append(state.run(should_pause)))
    runner.start()
    runner.join(timeout=60)
    assert result == [False] and state.checkpoints_passed == 4
    pause.clear()
    assert state.run(should_pause) is True
    _assert_identical(state.result(), uninterrupted([LONG]))


@pytest.mark.parametrize("mode", ["sync", "bounded"])
def test_checkpoint_sync_modes_give_the_same_result(model, uninterrupted, mode):
    state = model.start_prefill([LONG], checkpoint_sync=mode, max_run_ahead=1)
    while not state.run(_pause_at(1)):
        pass
    _assert_identical(state.result(), uninterrupted([LONG]))


def test_checkpoint_sync_rejects_unknown_modes(model):
    with pytest.raises(ValueError, match="'sync' or 'bounded'"):
        model.start_prefill([LONG], checkpoint_sync="never")
    with pytest.raises(ValueError, match="max_run_ahead"):
        model.start_prefill([LONG], checkpoint_sync="bounded", max_run_ahead=0)
