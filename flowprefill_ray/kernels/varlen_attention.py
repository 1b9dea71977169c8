"""Causal variable-length (packed) flash attention with GQA and a KV prefix.

Sequence ``b`` owns queries ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (``Lq`` of them) and keys
``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` (``Lk >= Lq``). The first ``Lk - Lq`` keys are a prefix
(earlier chunks of the same prompt), so query ``i`` attends keys ``j <= (Lk - Lq) + i``. With
``Lk == Lq`` this is ordinary causal attention; with ``Lk > Lq`` it is chunked prefill.
Query head ``h`` reads KV head ``h // (Hq // Hk)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flowprefill_ray.kernels.launch import (
    KernelInputError,
    block_size,
    check_dtype,
    check_triton_tensors,
    interpreter_enabled,
    last_dim_contiguous,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_key_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_row0,
    v_row0,
    stride_kt,
    stride_vt,
    offs_m,
    offs_d,
    d_mask,
    prefix,
    k_len,
    n_start,
    n_end,
    qk_scale_log2,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with key tiles [n_start, n_end).

    Unmasked tiles must lie wholly inside every query's causal window and inside k_len.
    """
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_mask = (offs_n < k_len)[:, None] & d_mask[None, :]
        else:
            kv_mask = d_mask[None, :]
        k = tl.load(
            k_row0 + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        if MASKED:
            visible = (offs_n[None, :] <= (prefix + offs_m)[:, None]) & (offs_n < k_len)[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_row0 + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _varlen_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cu_q_ptr,
    cu_k_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    qk_scale_log2,
    D,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (sequence, block of BLOCK_M queries, query head); online softmax over
    # blocks of BLOCK_N keys, exp2 with the scale folded in.
    seq = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    k_start = tl.load(cu_k_ptr + seq)
    k_len = tl.load(cu_k_ptr + seq + 1) - k_start
    prefix = k_len - q_len
    m0 = m_block * BLOCK_M
    # The grid is sized for the longest possible sequence; shorter ones have idle programs.
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        m_mask = offs_m < q_len
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # Finite start value: every row (padding rows included) sees key 0 in the first
        # block, so no row ever computes exp2(-inf - -inf).
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        # Keys [0, prefix + m0 + 1) are visible to every query of this block, so whole tiles
        # below that point skip the causal mask; tiles on the diagonal apply it. Keys past the
        # block's last query are never attended: stop there.
        k_row0 = k_ptr + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
        v_row0 = v_ptr + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
        n_full = ((prefix + m0 + 1) // BLOCK_N) * BLOCK_N
        k_end = tl.minimum(k_len, prefix + m0 + BLOCK_M)
        acc, l_i, m_i = _attend_key_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_row0,
            v_row0,
            stride_kt,
            stride_vt,
            offs_m,
            offs_d,
            d_mask,
            prefix,
            k_len,
            0,
            n_full,
            qk_scale_log2,
            MASKED=False,
            BLOCK_N=BLOCK_N,
            DOT_PRECISION=DOT_PRECISION,
        )
        acc, l_i, m_i = _attend_key_tiles(
            acc,
            l_i,
            m_i,
            q,
            k_row0,
            v_row0,
            stride_kt,
            stride_vt,
            offs_m,
            offs_d,
            d_mask,
            prefix,
            k_len,
            n_full,
            k_end,
            qk_scale_log2,
            MASKED=True,
            BLOCK_N=BLOCK_N,
            DOT_PRECISION=DOT_PRECISION,
        )
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise KernelInputError("varlen_attention: q, k, v must be [T, H, D]")
    if k.shape != v.shape:
        raise KernelInputError(
            f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ"
        )
    if q.shape[2] != k.shape[2]:
        raise KernelInputError(
            f"varlen_attention: head dim of q ({q.shape[2]}) != head dim of k ({k.shape[2]})"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise KernelInputError(
            f"varlen_attention: query heads ({q.shape[1]}) must be a multiple of kv heads "
            f"({k.shape[1]})"
        )
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise KernelInputError(
            "varlen_attention: cu_seqlens_q and cu_seqlens_k must both be [B+1], got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}"
        )


# Tile configurations, fastest first: (BLOCK_M, BLOCK_N, num_warps, num_stages).
_GPU_CONFIGS = ((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1))
# fp32 runs its dots as three TF32 products (tf32x3: fp32-level accuracy on tensor cores);
# compiled for sm_90, larger tiles than these spilled registers heavily.
_FP32_CONFIGS = ((32, 32, 4, 2), (32, 32, 4, 1), (16, 32, 4, 1))
# Shared memory left to the compiler's own buffers (barriers, layout conversions), bytes.
_SMEM_MARGIN = 16 * 1024


@functools.lru_cache(maxsize=8)
def _smem_budget(device_index: int) -> int:
    """Bytes of shared memory one program may use on this GPU (227 KiB on H100/H200,
    163 KiB on A100, 99 KiB on consumer Ada/Ampere), less a margin."""
    props = torch.cuda.get_device_properties(device_index)
    optin = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    return optin - _SMEM_MARGIN


def _launch_blocks(
    device: torch.device, block_d: int, element_size: int, smem_budget: int | None = None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this device, head-dim tile and dtype.

    Picks the first configuration whose q tile plus ``num_stages`` buffered K and V tiles fit
    in shared memory (fp32, head dims over 128 and smaller GPUs get smaller tiles).
    ``smem_budget`` (bytes) overrides the device query, for compiling without a GPU.
    """
    if device.type != "cuda" or interpreter_enabled():
        # Interpreter: every program runs in Python, so fewer, larger tiles would be faster,
        # but 16 keeps several query and key blocks in the small test sequences.
        return 16, 16, 4, 1
    if smem_budget is None:
        smem_budget = _smem_budget(device.index if device.index is not None else 0)
    configs = _FP32_CONFIGS if element_size >= 4 else _GPU_CONFIGS
    for block_m, block_n, warps, stages in configs:
        smem = (block_m + 2 * stages * block_n) * block_d * element_size
        if smem <= smem_budget:
            return block_m, block_n, warps, stages
    return configs[-1]


def varlen_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
) -> torch.Tensor:
    """Prefix-causal varlen attention; returns ``out[Tq, Hq, D]`` in ``q``'s dtype.

    ``cu_seqlens_*`` are int32 cumulative token counts ``[B+1]``; ``scale`` multiplies q.k
    (usually ``D ** -0.5``). ``max_seqlen_q`` (tokens) sizes the launch grid; pass it when the
    caller knows it, otherwise it is bounded by the total query tokens (no device sync).
    """
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    check_dtype("varlen_attention", q)
    check_triton_tensors("varlen_attention", q, k, v, cu_seqlens_q, cu_seqlens_k)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    cu_q = cu_seqlens_q.to(torch.int32).contiguous()
    cu_k = cu_seqlens_k.to(torch.int32).contiguous()
    Tq, Hq, D = q.shape
    Hk = k.shape[1]
    out = torch.empty((Tq, Hq, D), device=q.device, dtype=q.dtype)
    batch = cu_q.shape[0] - 1
    if Tq == 0 or batch == 0:
        return out
    max_q = Tq if max_seqlen_q is None else min(int(max_seqlen_q), Tq)
    block_d = block_size(D)
    block_m, block_n, warps, stages = _launch_blocks(q.device, block_d, q.element_size())
    grid = (batch, triton.cdiv(max_q, block_m), Hq)
    _varlen_attention_kernel[grid](
        q,
        k,
        v,
        out,
        cu_q,
        cu_k,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        float(scale) * _LOG2E,
        D,
        GROUP=Hq // Hk,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        # fp32 inputs get fp32-accurate dots (three TF32 products: the fp32 model must match
        # the CPU path); fp16/bf16 use the tensor cores' native path.
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )
    return out


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
) -> torch.Tensor:
    """Torch (CPU path) version of :func:`varlen_attention_triton`: SDPA per sequence.

    Without a prefix SDPA's own causal mode is used; with one an explicit bottom-right causal
    mask. ``max_seqlen_q`` is accepted for signature parity and unused.
    """
    del max_seqlen_q
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    Hq, Hk = q.shape[1], k.shape[1]
    group = Hq // Hk
    out = torch.empty_like(q)
    # One host copy of the boundaries instead of a sync per sequence.
    bq = cu_seqlens_q.tolist()
    bk = cu_seqlens_k.tolist()
    for b in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[b], bq[b + 1], bk[b], bk[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk < lq:
            raise KernelInputError(
                f"varlen_attention: sequence {b} has {lq} queries but only {lk} keys"
            )
        # SDPA wants [H, L, D]; fp32 softmax regardless of the input dtype.
        qs = q[q0:q1].transpose(0, 1).float()
        ks = k[k0:k1].transpose(0, 1).float()
        vs = v[k0:k1].transpose(0, 1).float()
        if group > 1:
            ks = ks.repeat_interleave(group, dim=0)
            vs = vs.repeat_interleave(group, dim=0)
        # A leading batch dim: on CPU, SDPA takes its fused (flash) path only for 4-D inputs;
        # 3-D inputs fall back to materialising the [L, L] scores (~8x slower at 2048 tokens).
        qs, ks, vs = qs[None], ks[None], vs[None]
        if lk == lq:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            prefix = lk - lq
            rows = torch.arange(lq, device=q.device)[:, None]
            cols = torch.arange(lk, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=cols <= rows + prefix, scale=scale
            )
        out[q0:q1] = o[0].transpose(0, 1).to(q.dtype)
    return out
