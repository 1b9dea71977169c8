"""Rotary position embedding, Hugging Face "rotate half" (non-interleaved) layout.

``x1, x2 = x[..., :D/2], x[..., D/2:]``; ``out = cat(x1*cos - x2*sin, x2*cos + x1*sin)`` with
``cos``/``sin`` of shape ``[T, D/2]`` (one row per token position, already gathered).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flowprefill_ray.kernels.launch import (
    KernelInputError,
    block_size,
    check_dtype,
    check_triton_tensors,
    last_dim_contiguous,
)


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_xt,
    stride_xh,
    stride_ct,
    stride_st,
    H,
    HALF,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per (token, tile of heads): cos/sin of the token are loaded once and reused
    # for every head in the tile.
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    mask = (heads[:, None] < H) & col_mask[None, :]
    cos = tl.load(cos_ptr + t * stride_ct + cols, mask=col_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_st + cols, mask=col_mask, other=0.0).to(tl.float32)
    x_row = x_ptr + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0)
    out_dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    # The output is contiguous [T, H, D].
    out_row = out_ptr + t * H * 2 * HALF + heads[:, None] * 2 * HALF + cols[None, :]
    tl.store(out_row, o1.to(out_dtype), mask=mask)
    tl.store(out_row + HALF, o2.to(out_dtype), mask=mask)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 3:
        raise KernelInputError(f"rotary: x must be [T, H, D], got shape {tuple(x.shape)}")
    T, _, D = x.shape
    if D % 2 != 0:
        raise KernelInputError(f"rotary: head dim must be even, got {D}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (T, D // 2):
            raise KernelInputError(
                f"rotary: {name} must be [T={T}, D/2={D // 2}], got shape {tuple(t.shape)}"
            )


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotate-half RoPE to ``x[T, H, D]`` with ``cos, sin[T, D/2]``; returns ``[T, H, D]``.

    ``x`` may be a strided view (e.g. a slice of a fused qkv projection); math is in fp32 and
    the result has ``x``'s dtype.
    """
    _check(x, cos, sin)
    check_dtype("rotary", x)
    check_triton_tensors("rotary", x, cos, sin)
    x = last_dim_contiguous(x)
    cos = last_dim_contiguous(cos)
    sin = last_dim_contiguous(sin)
    T, H, D = x.shape
    out = torch.empty((T, H, D), device=x.device, dtype=x.dtype)
    if T == 0 or H == 0:
        return out
    half = D // 2
    block_h = min(block_size(H, minimum=1), 16)
    _rotary_kernel[(T, triton.cdiv(H, block_h))](
        x,
        cos,
        sin,
        out,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        sin.stride(0),
        H,
        half,
        BLOCK_H=block_h,
        BLOCK_HALF=block_size(half, minimum=1),
    )
    return out


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Torch (CPU path) version of :func:`rotary_triton`, same signature and results."""
    _check(x, cos, sin)
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    c = cos.float().unsqueeze(1)  # broadcast over heads
    s = sin.float().unsqueeze(1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
