"""Kernels of the model, each a Triton kernel beside its torch reference.

``kernel_ops(backend, device)`` picks one implementation of the five ops for a device:

* ``auto``: Triton on CUDA, torch on CPU (``FLOWPREFILL_KERNELS`` overrides ``auto``);
* ``triton``: the Triton kernels; on CPU only under ``TRITON_INTERPRET=1`` (tests);
* ``torch``: the references, which are also the model's CPU path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from flowprefill_ray.kernels.decode_attention import (
    decode_attention_reference,
    decode_attention_triton,
)
from flowprefill_ray.kernels.launch import (
    KernelBackendError,
    KernelInputError,
    interpreter_enabled,
)
from flowprefill_ray.kernels.rms_norm import rms_norm_reference, rms_norm_triton
from flowprefill_ray.kernels.rotary import rotary_reference, rotary_triton
from flowprefill_ray.kernels.silu_and_mul import silu_and_mul_reference, silu_and_mul_triton
from flowprefill_ray.kernels.varlen_attention import (
    varlen_attention_reference,
    varlen_attention_triton,
)

BACKEND_ENV = "FLOWPREFILL_KERNELS"


class KernelBackend(str, Enum):
    """Which implementation of the kernels to use."""

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"


@dataclass(frozen=True)
class KernelOps:
    """The five ops of one backend; signatures in docs/ARCHITECTURE.md section 1."""

    backend: KernelBackend  # the backend actually chosen (never AUTO)
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary: Callable[..., torch.Tensor]
    varlen_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor]
    silu_and_mul: Callable[..., torch.Tensor]


_TRITON_OPS = KernelOps(
    backend=KernelBackend.TRITON,
    rms_norm=rms_norm_triton,
    rotary=rotary_triton,
    varlen_attention=varlen_attention_triton,
    decode_attention=decode_attention_triton,
    silu_and_mul=silu_and_mul_triton,
)
_TORCH_OPS = KernelOps(
    backend=KernelBackend.TORCH,
    rms_norm=rms_norm_reference,
    rotary=rotary_reference,
    varlen_attention=varlen_attention_reference,
    decode_attention=decode_attention_reference,
    silu_and_mul=silu_and_mul_reference,
)


def _parse_backend(value: KernelBackend | str, source: str) -> KernelBackend:
    try:
        return KernelBackend(
            str(value.value if isinstance(value, KernelBackend) else value).lower()
        )
    except ValueError:
        allowed = ", ".join(b.value for b in KernelBackend)
        raise KernelBackendError(
            f"unknown kernel backend {value!r} from {source}; expected one of: {allowed}"
        ) from None


def _kernels_were_interpreted() -> bool:
    # triton.jit decides at decoration (import) time whether a kernel is interpreted.
    from triton.runtime.interpreter import InterpretedFunction

    from flowprefill_ray.kernels.rms_norm import _rms_norm_kernel

    return isinstance(_rms_norm_kernel, InterpretedFunction)


def resolve_backend(
    backend: KernelBackend | str = KernelBackend.AUTO,
    device: torch.device | str = "cpu",
) -> KernelBackend:
    """The concrete backend (TRITON or TORCH) for ``backend`` on ``device``.

    Raises :class:`KernelBackendError` when Triton is asked for where it cannot run.
    """
    device = torch.device(device)
    chosen = _parse_backend(backend, "the backend argument")
    if chosen is KernelBackend.AUTO and os.environ.get(BACKEND_ENV):
        chosen = _parse_backend(os.environ[BACKEND_ENV], f"${BACKEND_ENV}")
    if chosen is KernelBackend.AUTO:
        return KernelBackend.TRITON if device.type == "cuda" else KernelBackend.TORCH
    if chosen is KernelBackend.TRITON and device.type != "cuda":
        if not interpreter_enabled():
            raise KernelBackendError(
                f"Triton kernels cannot run on device {device}: Triton compiles for CUDA GPUs. "
                "Use backend 'torch' (or 'auto') on CPU; tests may set TRITON_INTERPRET=1 "
                "before importing flowprefill_ray.kernels to run the kernels in the (slow) "
                "Triton interpreter."
            )
        if not _kernels_were_interpreted():
            raise KernelBackendError(
                "TRITON_INTERPRET=1 was set after flowprefill_ray.kernels was imported, so the "
                "kernels were built for a GPU; set it before the first import."
            )
    return chosen


def kernel_ops(
    backend: KernelBackend | str = KernelBackend.AUTO,
    device: torch.device | str = "cpu",
) -> KernelOps:
    """The kernel functions of the chosen backend for ``device`` (see module docstring)."""
    if resolve_backend(backend, device) is KernelBackend.TRITON:
        return _TRITON_OPS
    return _TORCH_OPS


__all__ = [
    "BACKEND_ENV",
    "KernelBackend",
    "KernelBackendError",
    "KernelInputError",
    "KernelOps",
    "kernel_ops",
    "resolve_backend",
]
