"""Kernels: each Triton kernel (in the CPU interpreter) against its torch reference, and each
reference against a naive float64 implementation written with explicit loops, so a wrong
reference cannot hide a wrong kernel. Shapes are tiny (the interpreter runs every program in
Python) but ragged, with GQA, non-power-of-two head dims and prefix KV.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowprefill_ray.kernels import (
    BACKEND_ENV,
    KernelBackend,
    KernelBackendError,
    KernelInputError,
    kernel_ops,
)
from flowprefill_ray.kernels.decode_attention import (
    decode_attention_reference,
    decode_attention_triton,
)
from flowprefill_ray.kernels.rms_norm import rms_norm_reference, rms_norm_triton
from flowprefill_ray.kernels.rotary import rotary_reference, rotary_triton
from flowprefill_ray.kernels.silu_and_mul import silu_and_mul_reference, silu_and_mul_triton
from flowprefill_ray.kernels.varlen_attention import (
    varlen_attention_reference,
    varlen_attention_triton,
)

ROOT = Path(__file__).resolve().parents[1]

# fp32 kernel vs fp32 reference: only summation order differs.
TIGHT = {"atol": 2e-5, "rtol": 2e-5}
# fp32 reference vs float64 naive maths.
VS_NAIVE = {"atol": 1e-5, "rtol": 1e-5}

# (query heads, kv heads, head dim): GQA ratios 1, 3 (6/2 and SmolLM2's 9/3) and 2, with head
# dims that are not powers of two.
HEAD_CONFIGS = [(4, 4, 64), (6, 2, 48), (9, 3, 80), (4, 2, 24)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# ---------------------------------------------------------------- naive implementations


def naive_rms_norm(x, weight, eps, residual):
    r = x.double() if residual is None else x.double() + residual.double()
    out = torch.empty_like(r)
    for t in range(r.shape[0]):
        ms = sum(float(val) ** 2 for val in r[t]) / r.shape[1]
        out[t] = r[t] / math.sqrt(ms + eps) * weight.double()
    return out, r


def naive_rotary(x, cos, sin):
    T, H, D = x.shape
    half = D // 2
    out = torch.empty(T, H, D, dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            for i in range(half):
                a, b = float(x[t, h, i]), float(x[t, h, i + half])
                c, s = float(cos[t, i]), float(sin[t, i])
                out[t, h, i] = a * c - b * s
                out[t, h, i + half] = b * c + a * s
    return out


def naive_silu_and_mul(gate_up):
    inter = gate_up.shape[1] // 2
    g, u = gate_up[:, :inter].double(), gate_up[:, inter:].double()
    return g / (1.0 + torch.exp(-g)) * u


def naive_attention_row(q_vec, keys, values, scale):
    """softmax(q.k * scale) @ v for one query vector, float64, explicit max-subtraction."""
    scores = [float(q_vec @ keys[j]) * scale for j in range(keys.shape[0])]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    out = torch.zeros(values.shape[1], dtype=torch.float64)
    for w, v in zip(weights, values, strict=True):
        out += (w / total) * v
    return out


def naive_varlen_attention(q, k, v, cu_q, cu_k, scale):
    q, k, v = q.double(), k.double(), v.double()
    Hq, Hk = q.shape[1], k.shape[1]
    out = torch.zeros_like(q)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        prefix = (k1 - k0) - (q1 - q0)
        for h in range(Hq):
            kv_h = h // (Hq // Hk)
            for i in range(q1 - q0):
                last = prefix + i  # the last key this query may see
                out[q0 + i, h] = naive_attention_row(
                    q[q0 + i, h], k[k0 : k0 + last + 1, kv_h], v[k0 : k0 + last + 1, kv_h], scale
                )
    return out


def naive_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    B, Hq, _ = q.shape
    slots, Hk = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(B):
        keys, values = [], []
        for pos in range(int(seq_lens[b])):
            block = int(block_tables[b, pos // slots])
            keys.append(k_cache[block, pos % slots].double())
            values.append(v_cache[block, pos % slots].double())
        keys_t, values_t = torch.stack(keys), torch.stack(values)  # [L, Hk, D]
        for h in range(Hq):
            kv_h = h // (Hq // Hk)
            out[b, h] = naive_attention_row(
                q[b, h].double(), keys_t[:, kv_h], values_t[:, kv_h], scale
            )
    return out


# ---------------------------------------------------------------- inputs


def _varlen_inputs(hq, hk, d, q_lens, k_lens, dtype=torch.float32, seed=0):
    """Packed q/k/v; q, k and v are slices of one fused projection (non-contiguous views)."""
    g = _gen(seed)
    tq, tk = sum(q_lens), sum(k_lens)
    q = torch.randn(tq, hq * d + 5, generator=g)[:, : hq * d].view(tq, hq, d)
    kv = torch.randn(tk, 2 * hk * d, generator=g)
    k = kv[:, : hk * d].view(tk, hk, d)
    v = kv[:, hk * d :].view(tk, hk, d)
    return q.to(dtype), k.to(dtype), v.to(dtype), _cu(q_lens), _cu(k_lens)


def _paged_inputs(hq, hk, d, seq_lens, slots, dtype=torch.float32, seed=0):
    """A cache with twice the blocks needed; each sequence's blocks are scattered at random.
    q is a non-contiguous view, as the model produces it."""
    g = _gen(seed)
    need = [math.ceil(n / slots) for n in seq_lens]
    width = max(need) + 1  # one spare column: tables are wider than any sequence needs
    num_blocks = 2 * sum(need) + 2
    k_cache = torch.randn(num_blocks, slots, hk, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, slots, hk, d, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32)  # -1: never read
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = order[used : used + n]
        used += n
    q = torch.randn(len(seq_lens), (hq + 1) * d, generator=g)[:, : hq * d].view(-1, hq, d)
    return (
        q.to(dtype) if dtype != torch.float32 else q,
        k_cache,
        v_cache,
        tables,
        torch.tensor(seq_lens, dtype=torch.int32),
    )


# ---------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("hidden", [48, 80, 256])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel_matches_reference_and_naive(hidden, with_residual):
    g = _gen(hidden)
    x = torch.randn(7, hidden + 3, generator=g)[:, :hidden]  # strided rows
    weight = torch.randn(hidden, generator=g)
    residual = torch.randn(7, hidden, generator=g) if with_residual else None
    out, res_out = rms_norm_triton(x, weight, 1e-6, residual)
    ref_out, ref_res = rms_norm_reference(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    torch.testing.assert_close(res_out, ref_res, **TIGHT)
    naive_out, naive_res = naive_rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(ref_out.double(), naive_out, **VS_NAIVE)
    torch.testing.assert_close(ref_res.double(), naive_res, **VS_NAIVE)


def test_rms_norm_returns_new_tensors_and_handles_fp16():
    g = _gen(1)
    x = torch.randn(5, 40, generator=g).half()
    weight = torch.randn(40, generator=g).half()
    out, res_out = rms_norm_triton(x, weight, 1e-5)
    ref_out, ref_res = rms_norm_reference(x, weight, 1e-5)
    assert out.dtype == torch.float16 and res_out.data_ptr() != x.data_ptr()
    assert ref_res.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(res_out, x)


# ---------------------------------------------------------------- rotary


@pytest.mark.parametrize("heads,head_dim", [(3, 48), (9, 80), (20, 64)])
def test_rotary_kernel_matches_reference_and_naive(heads, head_dim):
    g = _gen(heads)
    T = 6
    fused = torch.randn(T, (heads + 2) * head_dim, generator=g)
    x = fused[:, : heads * head_dim].view(T, heads, head_dim)  # view of a fused projection
    angles = torch.rand(T, head_dim // 2, generator=g) * 6.0
    cos, sin = angles.cos(), angles.sin()
    out = rotary_triton(x, cos, sin)
    ref = rotary_reference(x, cos, sin)
    torch.testing.assert_close(out, ref, **TIGHT)
    torch.testing.assert_close(ref.double(), naive_rotary(x, cos, sin), **VS_NAIVE)


# ---------------------------------------------------------------- silu_and_mul


@pytest.mark.parametrize("inter", [40, 1500])
def test_silu_and_mul_kernel_matches_reference_and_naive(inter):
    g = _gen(inter)
    gate_up = torch.randn(5, 2 * inter + 8, generator=g)[:, : 2 * inter]
    out = silu_and_mul_triton(gate_up)
    ref = silu_and_mul_reference(gate_up)
    assert out.shape == (5, inter)
    torch.testing.assert_close(out, ref, **TIGHT)
    torch.testing.assert_close(ref.double(), naive_silu_and_mul(gate_up), **VS_NAIVE)


# ---------------------------------------------------------------- varlen attention

# Ragged sequences of 1, 7 and 33 tokens; with prefixes of 0, 13 and 7 earlier tokens.
Q_LENS = [1, 7, 33]
PREFIXED_K_LENS = [1, 20, 40]


@pytest.mark.parametrize("hq,hk,d", HEAD_CONFIGS)
@pytest.mark.parametrize("k_lens", [Q_LENS, PREFIXED_K_LENS], ids=["causal", "prefix"])
def test_varlen_attention_kernel_matches_reference(hq, hk, d, k_lens):
    q, k, v, cu_q, cu_k = _varlen_inputs(hq, hk, d, Q_LENS, k_lens, seed=hq + d)
    out = varlen_attention_triton(q, k, v, cu_q, cu_k, d**-0.5)
    ref = varlen_attention_reference(q, k, v, cu_q, cu_k, d**-0.5)
    torch.testing.assert_close(out, ref, **TIGHT)


@pytest.mark.parametrize("hq,hk,d", HEAD_CONFIGS[1:3])
@pytest.mark.parametrize("k_lens", [Q_LENS, PREFIXED_K_LENS], ids=["causal", "prefix"])
def test_varlen_attention_reference_matches_naive(hq, hk, d, k_lens):
    q, k, v, cu_q, cu_k = _varlen_inputs(hq, hk, d, Q_LENS, k_lens, seed=1)
    ref = varlen_attention_reference(q, k, v, cu_q, cu_k, 0.3)
    naive = naive_varlen_attention(q, k, v, cu_q, cu_k, 0.3)
    torch.testing.assert_close(ref.double(), naive, **VS_NAIVE)


def test_varlen_attention_fp16_and_max_seqlen_hint():
    q, k, v, cu_q, cu_k = _varlen_inputs(6, 2, 48, Q_LENS, PREFIXED_K_LENS, torch.float16)
    ref = varlen_attention_reference(q, k, v, cu_q, cu_k, 48**-0.5)
    out = varlen_attention_triton(q, k, v, cu_q, cu_k, 48**-0.5, max_seqlen_q=max(Q_LENS))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_chunked_prefix_attention_equals_unchunked():
    """The last chunk of a prompt attending its prefix gives the rows of a full causal pass."""
    q, k, v, cu_q, cu_k = _varlen_inputs(6, 2, 48, [40], [40], seed=5)
    full = varlen_attention_triton(q, k, v, cu_q, cu_k, 0.2)
    tail = varlen_attention_triton(q[25:], k, v, _cu([15]), cu_k, 0.2)
    torch.testing.assert_close(tail, full[25:], **TIGHT)


# ---------------------------------------------------------------- decode attention

# Ragged lengths; 37 tokens with 4-slot blocks spans 10 scattered blocks.
DECODE_LENS = [1, 13, 37, 16]


@pytest.mark.parametrize("hq,hk,d", HEAD_CONFIGS)
@pytest.mark.parametrize("slots", [4, 5, 16])
def test_decode_attention_kernel_matches_reference(hq, hk, d, slots):
    q, kc, vc, tables, lens = _paged_inputs(hq, hk, d, DECODE_LENS, slots, seed=slots + hq)
    out = decode_attention_triton(q, kc, vc, tables, lens, d**-0.5)
    ref = decode_attention_reference(q, kc, vc, tables, lens, d**-0.5)
    torch.testing.assert_close(out, ref, **TIGHT)


@pytest.mark.parametrize("hq,hk,d", HEAD_CONFIGS[1:3])
def test_decode_attention_reference_matches_naive(hq, hk, d):
    q, kc, vc, tables, lens = _paged_inputs(hq, hk, d, DECODE_LENS, 4, seed=3)
    ref = decode_attention_reference(q, kc, vc, tables, lens, 0.25)
    naive = naive_decode_attention(q, kc, vc, tables, lens, 0.25)
    torch.testing.assert_close(ref.double(), naive, **VS_NAIVE)


def test_decode_attention_long_sequence_uses_several_splits_fp16():
    q, kc, vc, tables, lens = _paged_inputs(8, 2, 64, [150, 3], 16, torch.float16, seed=9)
    out = decode_attention_triton(q, kc, vc, tables, lens, 0.125)
    ref = decode_attention_reference(q, kc, vc, tables, lens, 0.125)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_decode_equals_last_row_of_prefill_attention():
    """Decoding token t over a paged cache equals row t of causal attention over the prompt."""
    hq, hk, d, n = 6, 2, 48, 23
    q, k, v, cu_q, cu_k = _varlen_inputs(hq, hk, d, [n], [n], seed=11)
    full = varlen_attention_triton(q, k, v, cu_q, cu_k, 0.2)
    slots = 4
    blocks = torch.tensor([5, 0, 3, 7, 1, 6], dtype=torch.int32)  # out of order on purpose
    kc = torch.zeros(8, slots, hk, d)
    vc = torch.zeros(8, slots, hk, d)
    for pos in range(n):
        kc[blocks[pos // slots], pos % slots] = k[pos]
        vc[blocks[pos // slots], pos % slots] = v[pos]
    out = decode_attention_triton(
        q[n - 1 :].contiguous(), kc, vc, blocks[None, :], torch.tensor([n], dtype=torch.int32), 0.2
    )
    torch.testing.assert_close(out[0], full[n - 1], **TIGHT)


# ---------------------------------------------------------------- input errors


def test_bad_shapes_raise_named_errors():
    with pytest.raises(KernelInputError, match="multiple of kv heads"):
        varlen_attention_reference(
            torch.zeros(3, 5, 8),
            torch.zeros(3, 2, 8),
            torch.zeros(3, 2, 8),
            _cu([3]),
            _cu([3]),
            1.0,
        )
    with pytest.raises(KernelInputError, match="only 2 keys"):
        varlen_attention_reference(
            torch.zeros(3, 2, 8),
            torch.zeros(2, 2, 8),
            torch.zeros(2, 2, 8),
            _cu([3]),
            _cu([2]),
            1.0,
        )
    with pytest.raises(KernelInputError, match="weight must be"):
        rms_norm_triton(torch.zeros(2, 8), torch.zeros(7), 1e-6)
    with pytest.raises(KernelInputError, match="float16, bfloat16 or float32"):
        silu_and_mul_triton(torch.zeros(2, 8, dtype=torch.float64))


# ---------------------------------------------------------------- backend selection


def test_auto_backend_is_torch_on_cpu_and_triton_on_cuda_by_name(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    ops = kernel_ops("auto", "cpu")
    assert ops.backend is KernelBackend.TORCH
    assert ops.varlen_attention is varlen_attention_reference
    # Resolution by device type needs no GPU: nothing is launched.
    assert kernel_ops(KernelBackend.AUTO, "cuda").backend is KernelBackend.TRITON
    assert kernel_ops("torch", "cuda").rms_norm is rms_norm_reference


def test_env_overrides_auto_but_not_an_explicit_choice(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert kernel_ops("auto", "cpu").decode_attention is decode_attention_triton  # interpreter
    assert kernel_ops("torch", "cpu").backend is KernelBackend.TORCH
    monkeypatch.setenv(BACKEND_ENV, "cuda-please")
    with pytest.raises(KernelBackendError, match="FLOWPREFILL_KERNELS"):
        kernel_ops("auto", "cpu")


def test_unknown_backend_names_the_choices():
    with pytest.raises(KernelBackendError, match="auto, triton, torch"):
        kernel_ops("cudnn", "cpu")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET=1"):
        kernel_ops("triton", "cpu")
    # Calling a launcher directly with CPU tensors fails just as clearly.
    with pytest.raises(KernelBackendError, match="need CUDA tensors"):
        silu_and_mul_triton(torch.zeros(2, 8))


def test_interpreter_switched_on_after_import_is_detected():
    """A fresh process imports the kernels first, then sets TRITON_INTERPRET=1: too late."""
    script = (
        "import os\n"
        "from flowprefill_ray.kernels import kernel_ops, KernelBackendError\n"
        "try:\n"
        "    kernel_ops('triton', 'cpu')\n"
        "except KernelBackendError as e:\n"
        "    print('FIRST', e)\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    kernel_ops('triton', 'cpu')\n"
        "except KernelBackendError as e:\n"
        "    print('SECOND', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first.startswith("FIRST") and "Triton compiles for CUDA GPUs" in first
    assert (
        second.startswith("SECOND") and "set after flowprefill_ray.kernels was imported" in second
    )


# ---------------------------------------------------------------- gpu_check dry run


def test_gpu_check_dry_run_writes_tables_and_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu_check  # its dataclasses look their module up by name
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu_check.json"
    # The live runtime starts its own Ray cluster: tests/test_gpu_check.py runs it apart.
    args = ["--dry-run", "--dtypes", "fp32", "--iters", "1", "--skip-runtime", "--out", str(out)]
    assert gpu_check.main(args) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    kernels = {row["kernel"] for row in report["correctness"]}
    assert kernels == {"rms_norm", "rotary", "varlen_attention", "decode_attention", "silu_and_mul"}
    assert all(row["ok"] for row in report["correctness"])
    assert all(row["triton_ms"] > 0 and row["torch_ms"] > 0 for row in report["timing"])
    # Pause latency, both checkpoint_sync modes at every granularity, resumed exactly.
    pause = {(row["granularity"], row["checkpoint_sync"]) for row in report["pause"]}
    assert pause == {(g, m) for g in ("block", "layer", "operator") for m in ("sync", "bounded")}
    assert all(row["resumed_logits_max_diff"] == 0 for row in report["pause"])
    printed = capsys.readouterr().out
    assert "varlen_attention" in printed and "max_abs_err" in printed


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The real Triton compiler (not the interpreter) builds every kernel for sm_90, at the
    tile sizes the launchers pick, within shared memory: what the interpreter cannot check."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # compile for real, every run
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--compile-only",
            "90",
            "--dtypes",
            "bf16",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["compiled"]
    assert len(rows) == 18  # six kernels at three shape sets
    assert all(r["ok"] and r["spill_bytes"] == 0 for r in rows), rows
