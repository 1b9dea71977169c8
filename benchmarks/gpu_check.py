"""One-shot check of the Triton kernels and of checkpoint cost on a CUDA machine.

    python benchmarks/gpu_check.py --out results/gpu_check.json

1. Correctness: compiles every Triton kernel for real and compares it with its torch reference
   (computed in fp32) at Llama-8B-like shapes (32/8 heads, head dim 128, hidden 4096,
   intermediate 14336, 2K and 8K tokens) in fp16 and bf16, plus a head dim of 80.
2. Speed: times each kernel against a native-dtype torch baseline (SDPA for attention) with CUDA
   events; milliseconds per call, and TFLOP/s for attention.
3. Pause latency: loads a random-weight model (``flowprefill_ray.model.checkpoints``) on CUDA
   and, for each checkpoint granularity and each ``checkpoint_sync`` mode ("sync": stream sync
   at every checkpoint; "bounded": CUDA events, bounded run-ahead), measures the prefill time
   and the delay from a pause request until the paused prefill has left the GPU idle.

Prints tables and writes JSON to ``--out``. Without CUDA it exits with status 2, unless
``--dry-run`` is given: then the same code runs on CPU with the Triton interpreter at tiny
shapes (timings are meaningless there; the dry run checks the script, not the speed).
Exit status 1 means a kernel disagreed with its reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# provenance.py lies beside this script: its folder is on sys.path when the script runs, but
# not when a test loads this file by path, so put it there.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import command_line  # noqa: E402

DEFAULT_OUT = Path("results") / "gpu_check.json"

# Max |triton - reference| allowed as atol + rtol * |reference|, per dtype. fp32 dots run as tf32x3.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shapes:
    """Model-like sizes the kernels are checked at."""

    q_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    tokens: tuple[int, ...]  # packed tokens per case
    page_slots: int  # tokens per paged-KV block
    decode_batch: int


GPU_SHAPES = Shapes(32, 8, 128, 4096, 14336, (2048, 8192), 16, 32)
# A non-power-of-two head dim at a realistic size, correctness only.
GPU_ODD_HEAD = Shapes(32, 8, 80, 2560, 6912, (2048,), 16, 8)
# SmolLM2-135M, the project's default real model: 9/3 heads of 64, hidden 576.
GPU_SMOLLM2 = Shapes(9, 3, 64, 576, 1536, (2048,), 16, 8)
DRY_SHAPES = Shapes(6, 2, 48, 80, 40, (24,), 4, 3)


# ------------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Mean milliseconds per call of ``fn`` after one warm-up call (CUDA events on GPU).

    The correctness pass has already compiled every kernel, so one warm-up call suffices.
    """
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    began = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - began) * 1e3 / iters


def max_error(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[float, bool]:
    """(max abs error, within tolerance) of a kernel output against its reference."""
    atol, rtol = TOLERANCE[dtype]
    diff = (out.float() - ref.float()).abs()
    ok = bool(torch.isfinite(out.float()).all()) and bool(
        (diff <= atol + rtol * ref.float().abs()).all()
    )
    return float(diff.max()), ok


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a fixed-width text table (floats to 4 significant digits)."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- cases


@dataclass
class KernelCase:
    """One kernel at one shape: the Triton call, its fp32 reference, and a torch baseline."""

    kernel: str
    case: str
    triton: Callable[[], torch.Tensor]
    reference: Callable[[], torch.Tensor]  # fp32 maths; compared with the Triton output
    baseline: Callable[[], object] | None  # native-dtype torch, timed against Triton
    baseline_name: str
    flops: float = 0.0  # for TFLOP/s (attention only)


def _cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _attention_flops(q_lens: list[int], k_lens: list[int], heads: int, head_dim: int) -> float:
    # Each attended (query, key) pair costs 2*D for q.k and 2*D for p.v.
    pairs = sum(lq * (lk - lq) + lq * (lq + 1) // 2 for lq, lk in zip(q_lens, k_lens, strict=True))
    return 4.0 * pairs * heads * head_dim


def _sdpa_varlen(q, k, v, q_lens, k_lens, scale):
    """Native-dtype SDPA per sequence (flash when causal without prefix)."""
    group = q.shape[1] // k.shape[1]
    outs, q0, k0 = [], 0, 0
    for lq, lk in zip(q_lens, k_lens, strict=True):
        qs = q[q0 : q0 + lq].transpose(0, 1)[None]
        ks = k[k0 : k0 + lk].transpose(0, 1)[None]
        vs = v[k0 : k0 + lk].transpose(0, 1)[None]
        if lq == lk:
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=scale, enable_gqa=group > 1
            )
        else:
            rows = torch.arange(lq, device=q.device)[:, None]
            mask = torch.arange(lk, device=q.device)[None, :] <= rows + (lk - lq)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=group > 1
            )
        outs.append(o)
        q0, k0 = q0 + lq, k0 + lk
    return outs


def build_cases(shapes: Shapes, dtype: torch.dtype, device: torch.device) -> list[KernelCase]:
    """Every kernel at ``shapes`` with random inputs (seeded) in ``dtype`` on ``device``."""
    from flowprefill_ray.kernels import rms_norm as rms
    from flowprefill_ray.kernels import rotary as rot
    from flowprefill_ray.kernels import silu_and_mul as act
    from flowprefill_ray.kernels import varlen_attention as att

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    def f32(*ts: torch.Tensor) -> list[torch.Tensor]:
        return [t.float() if t.is_floating_point() else t for t in ts]

    hq, hk, d, e, inter = (
        shapes.q_heads,
        shapes.kv_heads,
        shapes.head_dim,
        shapes.hidden,
        shapes.intermediate,
    )
    scale = d**-0.5
    cases: list[KernelCase] = []
    for t in shapes.tokens:
        x, res, w = randn(t, e), randn(t, e), randn(e)
        cases.append(
            KernelCase(
                "rms_norm",
                f"T={t} E={e}",
                lambda x=x, res=res, w=w: rms.rms_norm_triton(x, w, 1e-5, res)[0],
                lambda x=x, res=res, w=w: rms.rms_norm_reference(*f32(x, w), 1e-5, res.float())[0],
                lambda x=x, res=res, w=w: F.rms_norm(x + res, (e,), w, 1e-5),
                "F.rms_norm(x + residual)",
            )
        )
        # q as a view of a fused qkv projection, as the model produces it.
        qkv = randn(t, (hq + 2 * hk) * d)
        qv = qkv[:, : hq * d].view(t, hq, d)
        angles = torch.rand(t, d // 2, generator=gen, device=device) * 6.0
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

        def rope_native(x=qv, c=cos, s=sin):
            x1, x2 = x[..., : d // 2], x[..., d // 2 :]
            c, s = c[:, None], s[:, None]
            return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

        cases.append(
            KernelCase(
                "rotary",
                f"T={t} H={hq} D={d}",
                lambda x=qv, c=cos, s=sin: rot.rotary_triton(x, c, s),
                lambda x=qv, c=cos, s=sin: rot.rotary_reference(*f32(x, c, s)),
                rope_native,
                "torch rotate-half",
            )
        )
        gate_up = randn(t, 2 * inter)
        cases.append(
            KernelCase(
                "silu_and_mul",
                f"T={t} I={inter}",
                lambda g=gate_up: act.silu_and_mul_triton(g),
                lambda g=gate_up: act.silu_and_mul_reference(g.float()),
                lambda g=gate_up: F.silu(g[:, :inter]) * g[:, inter:],
                "F.silu(gate) * up",
            )
        )
        # Attention: one long causal sequence, a batch of four, and a last chunk over a prefix.
        chunk = max(1, t // 4)
        for name, q_lens, k_lens in (
            ("causal 1 seq", [t], [t]),
            ("causal 4 seqs", [chunk] * 4, [chunk] * 4),
            ("chunk over prefix", [chunk], [t]),
        ):
            q = randn(sum(q_lens), hq, d)
            k, v = randn(sum(k_lens), hk, d), randn(sum(k_lens), hk, d)
            cu_q, cu_k = _cu(q_lens, device), _cu(k_lens, device)
            cases.append(
                KernelCase(
                    "varlen_attention",
                    f"{name} Lq={q_lens[0]} Lk={k_lens[0]} H={hq}/{hk} D={d}",
                    lambda q=q, k=k, v=v, a=cu_q, b=cu_k, m=max(q_lens): (
                        att.varlen_attention_triton(q, k, v, a, b, scale, max_seqlen_q=m)
                    ),
                    lambda q=q, k=k, v=v, a=cu_q, b=cu_k: att.varlen_attention_reference(
                        *f32(q, k, v), a, b, scale
                    ),
                    lambda q=q, k=k, v=v, ql=q_lens, kl=k_lens: _sdpa_varlen(
                        q, k, v, ql, kl, scale
                    ),
                    "SDPA per sequence",
                    _attention_flops(q_lens, k_lens, hq, d),
                )
            )
        cases += _decode_cases(shapes, t, dtype, device, gen, scale)
    return cases


def _decode_cases(shapes, max_len, dtype, device, gen, scale) -> list[KernelCase]:
    """A ragged batch and one long sequence over scattered cache blocks."""
    from flowprefill_ray.kernels import decode_attention as dec

    hq, hk, d, slots = shapes.q_heads, shapes.kv_heads, shapes.head_dim, shapes.page_slots
    cases = []
    for name, lens in (
        ("ragged batch", [1 + (i * 7919) % max_len for i in range(shapes.decode_batch)]),
        ("one long seq", [max_len]),
    ):
        need = [-(-n // slots) for n in lens]
        num_blocks = sum(need) + 8
        k_cache = torch.randn(num_blocks, slots, hk, d, generator=gen, device=device).to(dtype)
        v_cache = torch.randn(num_blocks, slots, hk, d, generator=gen, device=device).to(dtype)
        order = torch.randperm(num_blocks, generator=gen, device=device)
        tables = torch.zeros(len(lens), max(need), dtype=torch.int32, device=device)
        used = 0
        for b, n in enumerate(need):
            tables[b, :n] = order[used : used + n]
            used += n
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        q = torch.randn(len(lens), hq, d, generator=gen, device=device).to(dtype)
        # Baseline: SDPA over K/V already gathered into a padded contiguous batch (the gather
        # is not timed, which favours torch).
        lmax = max(lens)
        pos = torch.arange(lmax, device=device)
        blocks = tables.long().gather(
            1, (pos // slots).clamp(max=tables.shape[1] - 1).expand(len(lens), -1)
        )
        k_dense = k_cache[blocks, pos % slots].permute(0, 2, 1, 3).contiguous()
        v_dense = v_cache[blocks, pos % slots].permute(0, 2, 1, 3).contiguous()
        mask = (pos[None, :] < seq_lens[:, None].long())[:, None, None, :]
        cases.append(
            KernelCase(
                "decode_attention",
                f"{name} B={len(lens)} Lmax={lmax} S={slots} H={hq}/{hk} D={d}",
                lambda q=q, kc=k_cache, vc=v_cache, bt=tables, sl=seq_lens: (
                    dec.decode_attention_triton(q, kc, vc, bt, sl, scale)
                ),
                lambda q=q, kc=k_cache, vc=v_cache, bt=tables, sl=seq_lens: (
                    dec.decode_attention_reference(q.float(), kc.float(), vc.float(), bt, sl, scale)
                ),
                lambda q=q, kd=k_dense, vd=v_dense, m=mask: F.scaled_dot_product_attention(
                    q[:, :, None], kd, vd, attn_mask=m, scale=scale, enable_gqa=hq > hk
                ),
                "SDPA on pre-gathered KV",
                _attention_flops([1] * len(lens), lens, hq, d),
            )
        )
    return cases


# ------------------------------------------------------------------------------- kernels


def check_kernels(
    shape_sets: list[Shapes],
    dtypes: list[torch.dtype],
    device: torch.device,
    iters: int,
    time_kernels: bool,
) -> tuple[list[dict], list[dict]]:
    """(correctness rows, timing rows) for every kernel case."""
    correctness, timing = [], []
    for shapes in shape_sets:
        for dtype in dtypes:
            dname = str(dtype).removeprefix("torch.")
            for case in build_cases(shapes, dtype, device):
                out = case.triton()
                ref = case.reference()
                err, ok = max_error(out, ref, dtype)
                correctness.append(
                    {
                        "kernel": case.kernel,
                        "case": case.case,
                        "dtype": dname,
                        "max_abs_err": err,
                        "ok": ok,
                    }
                )
                del out, ref
                if not time_kernels or case.baseline is None:
                    continue
                tri_ms = time_ms(case.triton, device, iters)
                base_ms = time_ms(case.baseline, device, iters)
                row = {
                    "kernel": case.kernel,
                    "case": case.case,
                    "dtype": dname,
                    "triton_ms": tri_ms,
                    "torch_ms": base_ms,
                    "speedup": base_ms / tri_ms,
                    "torch_baseline": case.baseline_name,
                }
                if case.flops:
                    row["triton_tflops"] = case.flops / tri_ms / 1e9
                    row["torch_tflops"] = case.flops / base_ms / 1e9
                timing.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return correctness, timing


# ------------------------------------------------------------------------------- pause latency


@dataclass(frozen=True)
class PauseModel:
    """Size of the random model and prompt used for pause latency."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    prompt_tokens: int
    timed_runs: int  # uninterrupted prefills timed (after one warm-up)
    trials: int  # prefills paused once each
    dtype: torch.dtype


GPU_PAUSE_MODEL = PauseModel(8, 2048, 16, 4, 8192, 8192, 3, 12, torch.bfloat16)
DRY_PAUSE_MODEL = PauseModel(2, 64, 4, 2, 128, 32, 1, 1, torch.float32)


def measure_pause_latency(
    spec: PauseModel, device: torch.device, kernels: str
) -> tuple[list[dict], str | None]:
    """Rows per (granularity, checkpoint_sync), or ([], reason) when the model is missing.

    A pause is requested at a set fraction of an uninterrupted prefill's time; latency is
    from that moment until ``run`` returns, and ``run`` returns only after draining the
    stream, so it is the time until the GPU is free for other work.
    """
    try:
        import inspect

        from flowprefill_ray.model import Granularity, load_model
        from flowprefill_ray.model.checkpoints import tiny_checkpoint
    except ImportError as exc:
        return [], f"flowprefill_ray.model is not importable: {exc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_checkpoint(
            Path(tmp) / "pause_model",
            num_layers=spec.layers,
            hidden=spec.hidden,
            heads=spec.heads,
            kv_heads=spec.kv_heads,
            intermediate=spec.intermediate,
            vocab=512,
            max_position=max(4096, 2 * spec.prompt_tokens),
        )
        model = load_model(path, device=device, dtype=spec.dtype, kernels=kernels)
    if "checkpoint_sync" not in inspect.signature(model.start_prefill).parameters:
        return [], "this model version has no checkpoint_sync option"
    tokens = [(i * 37) % 500 + 3 for i in range(spec.prompt_tokens)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for granularity in Granularity:
        for mode in ("sync", "bounded"):

            def start(granularity=granularity, mode=mode):
                return model.start_prefill([tokens], granularity=granularity, checkpoint_sync=mode)

            full = []
            for i in range(1 + spec.timed_runs):  # the first run warms up (compiles kernels)
                sync()
                began = time.perf_counter()
                state = start()
                state.run(lambda: False)
                sync()
                if i:
                    full.append(time.perf_counter() - began)
                    expected = state.result().last_logits
            full_s = statistics.median(full)
            latencies, max_diff = [], 0.0
            for trial in range(spec.trials):
                fraction = 0.1 + 0.8 * (trial + 0.5) / spec.trials
                state = start()
                sync()
                request_at = time.perf_counter() + fraction * full_s
                finished = state.run(lambda r=request_at: time.perf_counter() >= r)
                if not finished:
                    latencies.append(time.perf_counter() - request_at)
                    state.run(lambda: False)  # resume to the end: it must match
                max_diff = max(max_diff, float((state.result().last_logits - expected).abs().max()))
            rows.append(
                {
                    "granularity": granularity.value,
                    "checkpoint_sync": mode,
                    "checkpoints": state.num_checkpoints,
                    "prefill_ms": full_s * 1e3,
                    "pauses": len(latencies),
                    "pause_mean_ms": statistics.fmean(latencies) * 1e3 if latencies else None,
                    "pause_p50_ms": statistics.median(latencies) * 1e3 if latencies else None,
                    "pause_max_ms": max(latencies) * 1e3 if latencies else None,
                    "resumed_logits_max_diff": max_diff,
                }
            )
    return rows, None


# ------------------------------------------------------------------------------- compile only

# ptxas register and spill report lines, e.g. "Used 168 registers" and
# "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads".
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# Opt-in shared memory per block by compute capability, bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class CompileSpec:
    """One kernel specialisation as its launcher would request it for ``shapes``."""

    label: str
    kernel: object  # a triton JITFunction
    pointer_dtypes: dict[str, str]  # param -> triton element type ("in": the input dtype)
    constexprs: dict[str, object]
    num_warps: int
    num_stages: int
    # Typical values of integer arguments: Triton specialises those divisible by 16, which
    # changes vectorisation and pipelining, so the compile must know.
    int_values: dict[str, int]


def compile_specs(shapes: Shapes, dtype: torch.dtype, arch: int) -> list[CompileSpec]:
    """The kernels at ``shapes``, with the tile sizes the launchers pick on a CUDA device."""
    from flowprefill_ray.kernels import decode_attention as dec
    from flowprefill_ray.kernels import rms_norm as rms
    from flowprefill_ray.kernels import rotary as rot
    from flowprefill_ray.kernels import silu_and_mul as act
    from flowprefill_ray.kernels import varlen_attention as att
    from flowprefill_ray.kernels.launch import block_size

    cuda = torch.device("cuda")
    es = torch.empty((), dtype=dtype).element_size()
    d, block_d = shapes.head_dim, block_size(shapes.head_dim)
    group = shapes.q_heads // shapes.kv_heads
    precision = "tf32x3" if dtype == torch.float32 else "tf32"
    block_e = block_size(shapes.hidden)
    bm, bn, warps, stages = att._launch_blocks(
        cuda, block_d, es, smem_budget=SHARED_LIMIT.get(arch, 99 * 1024) - att._SMEM_MARGIN
    )
    all_in = {name: "in" for name in ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "res_out_ptr")}
    return [
        CompileSpec(
            f"rms_norm E={shapes.hidden}",
            rms._rms_norm_kernel,
            all_in,
            {"HAS_RESIDUAL": True, "BLOCK_E": block_e},
            rms._rms_norm_warps(block_e),
            3,
            {"E": shapes.hidden},
        ),
        CompileSpec(
            f"rotary H={shapes.q_heads} D={d}",
            rot._rotary_kernel,
            {"x_ptr": "in", "cos_ptr": "in", "sin_ptr": "in", "out_ptr": "in"},
            {
                "BLOCK_H": min(block_size(shapes.q_heads, minimum=1), 16),
                "BLOCK_HALF": block_size(d // 2, minimum=1),
            },
            4,
            3,
            {"H": shapes.q_heads, "HALF": d // 2},
        ),
        CompileSpec(
            f"silu_and_mul I={shapes.intermediate}",
            act._silu_and_mul_kernel,
            {"gate_up_ptr": "in", "out_ptr": "in"},
            {"BLOCK": min(block_size(shapes.intermediate), 1024)},
            4,
            3,
            {"INTER": shapes.intermediate},
        ),
        CompileSpec(
            f"varlen_attention D={d} G={group} {bm}x{bn}",
            att._varlen_attention_kernel,
            {
                "q_ptr": "in",
                "k_ptr": "in",
                "v_ptr": "in",
                "out_ptr": "in",
                "cu_q_ptr": "i32",
                "cu_k_ptr": "i32",
            },
            {
                "GROUP": group,
                "BLOCK_M": bm,
                "BLOCK_N": bn,
                "BLOCK_D": block_d,
                "DOT_PRECISION": precision,
            },
            warps,
            stages,
            {"D": d},
        ),
        CompileSpec(
            f"decode_attention partial D={d} G={group}",
            dec._decode_partial_kernel,
            {
                "q_ptr": "in",
                "k_cache_ptr": "in",
                "v_cache_ptr": "in",
                "block_tables_ptr": "i32",
                "seq_lens_ptr": "i32",
                "acc_ptr": "fp32",
                "m_ptr": "fp32",
                "l_ptr": "fp32",
            },
            {
                "GROUP": group,
                "BLOCK_G": block_size(group),
                "BLOCK_N": dec._decode_block_n(es, block_d),
                "BLOCK_D": block_d,
                "DOT_PRECISION": precision,
            },
            4,
            2,
            {
                "D": d,
                "SLOTS": shapes.page_slots,
                "SPLIT_LEN": 4 * dec._decode_block_n(es, block_d),
                "NUM_SPLITS": 33,
                "HQ": shapes.q_heads,
            },
        ),
        CompileSpec(
            f"decode_attention merge D={d}",
            dec._decode_merge_kernel,
            {"acc_ptr": "fp32", "m_ptr": "fp32", "l_ptr": "fp32", "out_ptr": "in"},
            {"BLOCK_P": 64, "BLOCK_D": block_d},
            4,
            3,
            {"D": d, "NUM_SPLITS": 33, "HQ": shapes.q_heads},
        ),
    ]


def compile_for_target(
    shape_sets: list[Shapes], dtypes: list[torch.dtype], arch: int
) -> list[dict]:
    """Compile every kernel to a cubin for ``sm_<arch>`` without a GPU; report resources.

    Catches what the interpreter cannot: ``tl.dot`` shape rules, layout and type errors in
    the real compiler, register spills, and shared memory over the SM's limit.
    """
    import inspect
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself uses for this arch
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for shapes in shape_sets:
        for dtype in dtypes:
            for spec in compile_specs(shapes, dtype, arch):
                params = list(inspect.signature(spec.kernel.fn).parameters)
                signature, attrs = {}, {}
                for i, name in enumerate(params):
                    if name in spec.constexprs:
                        signature[name] = "constexpr"
                    elif name in spec.pointer_dtypes:
                        kind = spec.pointer_dtypes[name]
                        signature[name] = "*" + (_TRITON_DTYPES[dtype] if kind == "in" else kind)
                        attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are aligned
                    elif name.startswith("stride_") and name != "stride_bt":
                        # Triton specialises integers divisible by 16; at these shapes every
                        # tensor stride is, which lets loads vectorise and pipeline.
                        signature[name] = "i32"
                        attrs[(i,)] = [["tt.divisibility", 16]]
                    elif name in ("eps", "qk_scale_log2"):
                        signature[name] = "fp32"
                    else:
                        signature[name] = "i32"
                        if spec.int_values.get(name, 1) % 16 == 0:
                            attrs[(i,)] = [["tt.divisibility", 16]]
                constexprs = {(params.index(k),): v for k, v in spec.constexprs.items()}
                began = time.perf_counter()
                row = {
                    "kernel": spec.label,
                    "dtype": _TRITON_DTYPES[dtype],
                    "arch": f"sm_{arch}",
                    "warps": spec.num_warps,
                    "stages": spec.num_stages,
                }
                try:
                    compiled = triton.compile(
                        ASTSource(spec.kernel, signature, constexprs, attrs),
                        target=target,
                        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
                    )
                except Exception as exc:  # report every failing kernel, not just the first
                    rows.append({**row, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    continue
                row["compile_s"] = time.perf_counter() - began
                row["shared_bytes"] = int(compiled.metadata.shared)
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                    ptx.write(compiled.asm["ptx"])
                    ptx.flush()
                    arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
                    log = subprocess.run(
                        [ptxas, "-v", f"--gpu-name={arch_name}", ptx.name, "-o", os.devnull],
                        capture_output=True,
                        text=True,
                        check=False,
                    ).stderr
                regs = _PTXAS_REGS.search(log)
                spills = _PTXAS_SPILLS.search(log)
                row["registers"] = int(regs.group(1)) if regs else None
                row["spill_bytes"] = sum(map(int, spills.groups())) if spills else None
                row["ok"] = row["shared_bytes"] <= SHARED_LIMIT.get(arch, 99 * 1024)
                rows.append(row)
    return rows


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU + Triton interpreter at tiny shapes (checks the script only)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPE_NAMES),
        default=None,
        help="default: fp16 bf16 on GPU, fp32 fp16 in a dry run",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed calls per kernel")
    parser.add_argument("--skip-pause", action="store_true", help="skip pause latency")
    parser.add_argument(
        "--compile-only",
        type=int,
        metavar="ARCH",
        default=None,
        help="no GPU needed: compile every kernel for sm_ARCH (e.g. 90 for "
        "H100/H200) and report shared memory, registers and spills",
    )
    return parser.parse_args(argv)


def compile_only_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--compile-only ARCH``: real compilation for a GPU target, on any machine."""
    from flowprefill_ray.kernels.launch import interpreter_enabled

    if interpreter_enabled():
        print(
            "gpu_check: --compile-only needs TRITON_INTERPRET unset (interpreted kernels "
            "cannot be compiled)",
            file=sys.stderr,
        )
        return 2
    dtypes = [DTYPE_NAMES[n] for n in (args.dtypes or ["fp16", "bf16", "fp32"])]
    began = time.perf_counter()
    rows = compile_for_target([GPU_SHAPES, GPU_ODD_HEAD, GPU_SMOLLM2], dtypes, args.compile_only)
    print(f"\n== compiled for sm_{args.compile_only} (no GPU used)")
    print(
        format_table(
            rows,
            [
                "kernel",
                "dtype",
                "warps",
                "stages",
                "shared_bytes",
                "registers",
                "spill_bytes",
                "compile_s",
                "ok",
                "error",
            ],
        )
    )
    import triton

    report = {
        "compile_only": True,
        "arch": args.compile_only,
        "triton": triton.__version__,
        "command": command_line(__file__, argv),
        "wall_s": time.perf_counter() - began,
        "compiled": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_only is not None:
        return compile_only_main(args, argv)
    if args.dry_run:
        # Must precede the first import of flowprefill_ray.kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). "
            "Run it on a GPU machine, or pass --dry-run to test the script on CPU.",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda")
    import triton

    default_dtypes = ["fp32", "fp16"] if args.dry_run else ["fp16", "bf16"]
    dtypes = [DTYPE_NAMES[n] for n in (args.dtypes or default_dtypes)]
    if args.dry_run and torch.bfloat16 in dtypes:
        print(
            "gpu_check: the Triton interpreter computes bf16 wrongly; dropping bf16",
            file=sys.stderr,
        )
        dtypes.remove(torch.bfloat16)
    shape_sets = [DRY_SHAPES] if args.dry_run else [GPU_SHAPES, GPU_ODD_HEAD, GPU_SMOLLM2]

    began = time.perf_counter()
    correctness, timing = check_kernels(
        shape_sets[:1], dtypes, device, 2 if args.dry_run else args.iters, True
    )
    extra, _ = check_kernels(shape_sets[1:], dtypes, device, 0, False)
    correctness += extra
    print("\n== correctness (Triton vs fp32 torch reference)")
    print(format_table(correctness, ["kernel", "case", "dtype", "max_abs_err", "ok"]))
    print("\n== speed" + (" (interpreter: meaningless)" if args.dry_run else " (CUDA events)"))
    print(
        format_table(
            timing,
            [
                "kernel",
                "case",
                "dtype",
                "triton_ms",
                "torch_ms",
                "speedup",
                "triton_tflops",
                "torch_tflops",
                "torch_baseline",
            ],
        )
    )

    pause_rows, pause_skipped = [], "skipped (--skip-pause)"
    if not args.skip_pause:
        spec = DRY_PAUSE_MODEL if args.dry_run else GPU_PAUSE_MODEL
        # The dry run uses the torch CPU path: the interpreter would take minutes per prefill.
        pause_rows, pause_skipped = measure_pause_latency(
            spec, device, "torch" if args.dry_run else "triton"
        )
        print(
            f"\n== pause latency ({spec.layers} layers, hidden {spec.hidden}, "
            f"{spec.prompt_tokens}-token prompt, {str(spec.dtype).removeprefix('torch.')})"
        )
        if pause_rows:
            print(
                format_table(
                    pause_rows,
                    [
                        "granularity",
                        "checkpoint_sync",
                        "checkpoints",
                        "prefill_ms",
                        "pauses",
                        "pause_mean_ms",
                        "pause_p50_ms",
                        "pause_max_ms",
                        "resumed_logits_max_diff",
                    ],
                )
            )
        else:
            print(f"not measured: {pause_skipped}")

    report = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": command_line(__file__, argv),
        "wall_s": time.perf_counter() - began,
        "correctness": correctness,
        "timing": timing,
        "pause": pause_rows,
        "pause_skipped": None if pause_rows else pause_skipped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    failed = [r for r in correctness if not r["ok"]]
    if failed:
        print(
            f"gpu_check: {len(failed)} kernel case(s) disagree with the reference", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
