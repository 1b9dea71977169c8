"""RMSNorm with an optional fused residual add.

``r = x + residual`` (or ``x``), ``out = r * rsqrt(mean(r^2) + eps) * weight``; the norm is
computed in fp32 and both ``out`` and ``r`` are returned in the input dtype, so a decoder layer
does the residual add and the next norm in one pass over memory.
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
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    E,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    # One program per token row; the whole row fits in one tile (hidden sizes up to ~16K).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < E
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype first: the stored residual and the normed value
        # must come from the same r, as in the torch reference.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
    tl.store(res_out_ptr + row * E + cols, x, mask=mask)
    r = x.to(tl.float32)
    mean_sq = tl.sum(r * r, axis=0) / E
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = r * tl.rsqrt(mean_sq + eps) * w
    tl.store(out_ptr + row * E + cols, out.to(x.dtype), mask=mask)


def _rms_norm_warps(block_e: int) -> int:
    # About 8 fp32 values per thread: wide rows get more warps for the row reduction.
    return min(16, max(1, block_e // 256))


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise KernelInputError(f"rms_norm: x must be [T, E], got shape {tuple(x.shape)}")
    if weight.shape != (x.shape[1],):
        raise KernelInputError(
            f"rms_norm: weight must be [{x.shape[1]}], got shape {tuple(weight.shape)}"
        )
    if residual is not None and residual.shape != x.shape:
        raise KernelInputError(
            f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}"
        )


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (residual add +) RMSNorm on ``x[T, E]``; returns ``(out[T, E], residual_out[T, E])``."""
    _check(x, weight, residual)
    check_dtype("rms_norm", x)
    check_triton_tensors("rms_norm", x, weight)
    x = last_dim_contiguous(x)
    weight = weight.contiguous()
    if residual is not None:
        residual = last_dim_contiguous(residual.to(x.dtype))
    T, E = x.shape
    out = torch.empty((T, E), device=x.device, dtype=x.dtype)
    res_out = torch.empty((T, E), device=x.device, dtype=x.dtype)
    if T == 0:
        return out, res_out
    block_e = block_size(E)
    _rms_norm_kernel[(T,)](
        x,
        residual if residual is not None else x,  # unused pointer when HAS_RESIDUAL is False
        weight,
        out,
        res_out,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        E,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_E=block_e,
        num_warps=_rms_norm_warps(block_e),
    )
    return out, res_out


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch (CPU path) version of :func:`rms_norm_triton`, same signature and results."""
    _check(x, weight, residual)
    # clone: the contract promises new tensors, never an alias of an input.
    r = x.clone() if residual is None else x + residual.to(x.dtype)
    r32 = r.float()
    out = r32 * torch.rsqrt(r32.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype), r
