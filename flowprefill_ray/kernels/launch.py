"""Checks and small helpers shared by the Triton launchers.

Kept apart from the kernels so that each kernel file holds one kernel, its launcher and its
torch reference, and nothing else.
"""

from __future__ import annotations

import os

import torch
import triton

# Dtypes every Triton kernel here accepts; each accumulates in fp32 whatever the input.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelInputError(ValueError):
    """A tensor handed to a kernel has the wrong shape, dtype or device."""


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run on this machine or device."""


def interpreter_enabled() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_tensors(name: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error if ``tensors`` cannot be fed to a Triton kernel here.

    Triton compiles for CUDA devices; CPU tensors only work under the interpreter, which must
    have been switched on before the kernel modules were imported.
    """
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreter_enabled():
            continue
        raise KernelBackendError(
            f"{name}: Triton kernels need CUDA tensors, got a tensor on {t.device}. On CPU use "
            "the torch backend, or set TRITON_INTERPRET=1 before importing "
            "flowprefill_ray.kernels (tests only: the interpreter is slow)."
        )


def check_dtype(name: str, t: torch.Tensor) -> None:
    """Reject dtypes the kernels were not written for (they accumulate in fp32)."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise KernelInputError(
            f"{name}: dtype {t.dtype} is not supported; use float16, bfloat16 or float32"
        )


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Return ``t`` if its last dim has stride 1 (kernels take the other strides), else a copy.

    Views such as the q/k/v slices of a fused projection keep stride 1 in the last dim, so they
    reach the kernel without a copy.
    """
    return t if t.stride(-1) == 1 else t.contiguous()


def block_size(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= ``n`` (and >= ``minimum``): tiles are powers of two, the
    tail is masked, so head dims such as 48 or 80 work."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))
