"""Decode attention: one new query per sequence over a paged KV cache.

``k_cache, v_cache[N, S, Hk, D]`` hold ``N`` blocks of ``S`` token slots. Sequence ``b`` owns
blocks ``block_tables[b, :ceil(seq_lens[b] / S)]`` in that order and attends all of its
``seq_lens[b]`` tokens (the new token's K/V are already written).

The Triton version is split-K ("flash decoding"): each program handles one (sequence, KV head,
slice of the sequence) and all query heads of that KV head's group, so every K/V tile is
loaded once per group; a second small kernel merges the slices' partial softmaxes. Splitting
keeps the GPU busy when there are few sequences but long contexts.
"""

from __future__ import annotations

import functools

import torch
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
def _decode_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    acc_ptr,
    m_ptr,
    l_ptr,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_vn,
    stride_vs,
    stride_vh,
    stride_bt,
    qk_scale_log2,
    D,
    SLOTS,
    SPLIT_LEN,
    NUM_SPLITS,
    HQ,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = split * SPLIT_LEN
    end = tl.minimum(seq_len, start + SPLIT_LEN)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < D
    heads = kv_head * GROUP + offs_g
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    # Finite start: a split past the end of its sequence keeps m = -1e30 and l = 0, and the
    # merge gives it weight exp2(-1e30 - m_max) = 0 instead of producing NaN.
    m_i = tl.full((BLOCK_G,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + tl.arange(0, BLOCK_N)
        n_mask = tok < end
        # Page lookup per token: tiles may span several cache blocks of any size S.
        page = tl.load(block_tables_ptr + seq * stride_bt + tok // SLOTS, mask=n_mask, other=0)
        slot = tok % SLOTS
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k_off = page.to(tl.int64) * stride_kn + slot * stride_ks + kv_head * stride_kh
        k = tl.load(k_cache_ptr + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = page.to(tl.int64) * stride_vn + slot * stride_vs + kv_head * stride_vh
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    # Partial results, fp32, laid out [B, Hq, NUM_SPLITS(, D)].
    row = (seq * HQ + heads) * NUM_SPLITS + split
    tl.store(
        acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :],
        acc,
        mask=g_mask[:, None] & d_mask[None, :],
    )
    tl.store(m_ptr + row, m_i, mask=g_mask)
    tl.store(l_ptr + row, l_i, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    acc_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    D,
    NUM_SPLITS,
    HQ,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (sequence, query head): rescale each slice to the global max and sum.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_mask = offs_p < NUM_SPLITS
    row = (seq * HQ + head) * NUM_SPLITS + offs_p
    m = tl.load(m_ptr + row, mask=p_mask, other=-1.0e30)
    row_sum = tl.load(l_ptr + row, mask=p_mask, other=0.0)
    acc = tl.load(
        acc_ptr + row[:, None] * BLOCK_D + offs_d[None, :],
        mask=p_mask[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    w = tl.exp2(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(row_sum * w, axis=0)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < D,
    )


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    if q.dim() != 3:
        raise KernelInputError(f"decode_attention: q must be [B, Hq, D], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise KernelInputError(
            "decode_attention: k_cache and v_cache must both be [N, S, Hk, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    B, Hq, D = q.shape
    Hk = k_cache.shape[2]
    if k_cache.shape[3] != D or Hq % Hk != 0:
        raise KernelInputError(
            f"decode_attention: q [B, {Hq}, {D}] does not fit a cache with {Hk} kv heads of "
            f"dim {k_cache.shape[3]} (query heads must be a multiple of kv heads)"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise KernelInputError(
            f"decode_attention: block_tables must be [B={B}, M] and seq_lens [B={B}], got "
            f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}"
        )


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode_block_n(element_size: int, block_d: int) -> int:
    """Tokens per K/V tile of the partial kernel."""
    if interpreter_enabled():
        return 16  # several tiles and splits even in the tiny test sequences
    # Two buffered K and V tiles must fit in shared memory: 64 tokens at 2 bytes and
    # D <= 256 (128 KiB), halved for fp32.
    block_n = 64 if element_size <= 2 else 32
    return block_n if block_d <= 256 else block_n // 2


def _plan_splits(
    device: torch.device, programs: int, max_tokens: int, block_n: int
) -> tuple[int, int]:
    """(num_splits, split_len in tokens, a multiple of block_n).

    ``max_tokens`` is the most a sequence can hold (table width x block size), known without
    reading ``seq_lens`` back from the device.
    """
    max_splits = triton.cdiv(max(max_tokens, 1), block_n)
    if device.type == "cuda" and not interpreter_enabled():
        # About two waves of programs over the SMs.
        target = 2 * _sm_count(device.index if device.index is not None else 0)
        splits = min(max_splits, max(1, triton.cdiv(target, max(programs, 1))))
    else:
        # Interpreter: slices of two tiles, so tests cover both the merge and the tile loop.
        splits = triton.cdiv(max(max_tokens, 1), 2 * block_n)
    split_len = triton.cdiv(triton.cdiv(max(max_tokens, 1), splits), block_n) * block_n
    return triton.cdiv(max(max_tokens, 1), split_len), split_len


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Paged decode attention; returns ``out[B, Hq, D]`` in ``q``'s dtype.

    ``block_tables[B, M]`` (int32) lists each sequence's cache blocks; ``seq_lens[B]`` (int32,
    tokens, each >= 1) counts its tokens; ``scale`` multiplies q.k.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    check_dtype("decode_attention", q)
    check_triton_tensors("decode_attention", q, k_cache, v_cache, block_tables, seq_lens)
    q = last_dim_contiguous(q)
    k_cache = last_dim_contiguous(k_cache)
    v_cache = last_dim_contiguous(v_cache)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise KernelInputError(
            f"decode_attention: cache dtype {k_cache.dtype} differs from query dtype {q.dtype}"
        )
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    B, Hq, D = q.shape
    _, slots, Hk, _ = k_cache.shape
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    if B == 0:
        return out
    group = Hq // Hk
    block_d = block_size(D)
    block_n = _decode_block_n(q.element_size(), block_d)
    num_splits, split_len = _plan_splits(q.device, B * Hk, block_tables.shape[1] * slots, block_n)
    acc = torch.empty((B, Hq, num_splits, block_d), device=q.device, dtype=torch.float32)
    m = torch.empty((B, Hq, num_splits), device=q.device, dtype=torch.float32)
    row_sums = torch.empty((B, Hq, num_splits), device=q.device, dtype=torch.float32)
    _decode_partial_kernel[(B, Hk, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        acc,
        m,
        row_sums,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        float(scale) * _LOG2E,
        D,
        slots,
        split_len,
        num_splits,
        Hq,
        GROUP=group,
        # tl.dot needs at least 16 rows; the extra query rows are masked.
        BLOCK_G=block_size(group),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        # fp32: three TF32 products, fp32-level accuracy on tensor cores.
        DOT_PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=2,
    )
    _decode_merge_kernel[(B, Hq)](
        acc,
        m,
        row_sums,
        out,
        out.stride(0),
        out.stride(1),
        D,
        num_splits,
        Hq,
        BLOCK_P=block_size(num_splits, minimum=1),
        BLOCK_D=block_d,
    )
    return out


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Torch (CPU path) version of :func:`decode_attention_triton`, same signature and results.

    Gathers every sequence's tokens into a padded ``[B, Lmax, Hk, D]`` batch with one index
    op, then does a masked fp32 softmax, so the cost is one pass however many sequences.
    """
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    B, Hq, D = q.shape
    _, slots, Hk, _ = k_cache.shape
    group = Hq // Hk
    if B == 0:
        return torch.empty_like(q)
    lens = seq_lens.to(torch.long)
    max_len = int(lens.max())
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < lens[:, None]  # [B, Lmax]
    # Positions past a sequence's end read its first block (always valid) and are masked.
    blocks = block_tables.to(torch.long).gather(
        1, (pos // slots).clamp(max=block_tables.shape[1] - 1).expand(B, -1)
    )
    blocks = torch.where(valid, blocks, block_tables[:, :1].to(torch.long))
    slot = (pos % slots).expand(B, -1)
    k = k_cache[blocks, slot].float()  # [B, Lmax, Hk, D]
    v = v_cache[blocks, slot].float()
    qg = q.float().reshape(B, Hk, group, D)
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bkgl,blkd->bkgd", probs, v)
    return out.reshape(B, Hq, D).to(q.dtype)
