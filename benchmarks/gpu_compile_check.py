"""``gpu_check --compile-only``: compile every kernel for a GPU architecture, without a GPU.

Runs the real Triton compiler and the triton wheel's own ``ptxas`` for ``sm_<arch>`` at the
tile sizes the launchers would pick there, and reports shared memory, registers and spills.
It catches what the CPU interpreter cannot (``tl.dot`` shape rules, layout and type errors,
spills, shared memory over the SM's limit) on a machine with no CUDA device.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass

import torch
from gpu_kernel_cases import Shapes

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
