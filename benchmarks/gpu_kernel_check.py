"""Kernel correctness and speed for gpu_check: every case compared, then timed.

Correctness compares each Triton output with its fp32 torch reference within a per-dtype
tolerance; speed times the Triton call against the native-dtype torch baseline with CUDA events
(wall clock on CPU, where a dry run's numbers only prove the code path runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from gpu_kernel_cases import Shapes, build_cases

# Max |triton - reference| allowed as atol + rtol * |reference|, per dtype. fp32 dots run as tf32x3.
TOLERANCE = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


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
