"""The kernel cases gpu_check runs: each Triton kernel at model-like shapes, with its reference.

A case bundles three calls on the same seeded inputs: the Triton kernel, its torch reference
computed in fp32 (what correctness is judged against), and a native-dtype torch baseline (what
speed is judged against; SDPA for attention). ``Shapes`` are also what ``gpu_compile_check``
compiles the kernels for, so both checks cover the same specialisations.

``flowprefill_ray.kernels`` is imported inside the functions, never at module level: a dry run
sets ``TRITON_INTERPRET`` after this module is imported and that must precede the first import
of the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
