"""SwiGLU activation of a fused gate/up projection: ``silu(gate_up[:, :I]) * gate_up[:, I:]``."""

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
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_gt,
    INTER,
    BLOCK: tl.constexpr,
):
    # Grid: (token, tile of the intermediate dim).
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(gate_up_ptr + t * stride_gt + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + t * stride_gt + INTER + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    out = g * tl.sigmoid(g) * up.to(tl.float32)
    tl.store(out_ptr + t * INTER + cols, out.to(gate.dtype), mask=mask)


def _check(gate_up: torch.Tensor) -> None:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 != 0:
        raise KernelInputError(
            f"silu_and_mul: gate_up must be [T, 2*I], got shape {tuple(gate_up.shape)}"
        )


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up[T, 2I]``; returns ``[T, I]`` (fp32 math, input dtype)."""
    _check(gate_up)
    check_dtype("silu_and_mul", gate_up)
    check_triton_tensors("silu_and_mul", gate_up)
    gate_up = last_dim_contiguous(gate_up)
    T, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty((T, inter), device=gate_up.device, dtype=gate_up.dtype)
    if T == 0 or inter == 0:
        return out
    block = min(block_size(inter), 1024)
    _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), inter, BLOCK=block
    )
    return out


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch (CPU path) version of :func:`silu_and_mul_triton`, same signature and results."""
    _check(gate_up)
    inter = gate_up.shape[1] // 2
    g = gate_up[:, :inter].float()
    u = gate_up[:, inter:].float()
    return (torch.nn.functional.silu(g) * u).to(gate_up.dtype)
