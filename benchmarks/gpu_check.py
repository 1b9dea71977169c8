"""One-shot check of the GPU path on a CUDA machine: kernels, checkpoint cost, live runtime.

    python benchmarks/gpu_check.py            # writes docs/results/gpu_check.json

1. Correctness: compiles every Triton kernel for real and compares it with its torch reference
   (computed in fp32) at Llama-8B-like shapes (32/8 heads, head dim 128, hidden 4096,
   intermediate 14336, 2K and 8K tokens) in fp16 and bf16, plus a head dim of 80.
2. Speed: times each kernel against a native-dtype torch baseline (SDPA for attention) with CUDA
   events; milliseconds per call, and TFLOP/s for attention.
3. Pause latency: loads a random-weight model (``flowprefill_ray.model.checkpoints``) on CUDA
   and, for each checkpoint granularity and each ``checkpoint_sync`` mode ("sync": stream sync
   at every checkpoint; "bounded": CUDA events, bounded run-ahead), measures the prefill time
   and the delay from a pause request until the paused prefill has left the GPU idle.
4. Live runtime: a ~1B random-weight Llama in bf16 served by the Ray runtime on this machine
   (scheduler, prefill and decode workers, the GPU config defaults), a long request preempted
   by an urgent one, then a burst; and the nccl KV transfer when two GPUs are visible
   (``gpu_runtime_check``).

Prints tables and writes JSON to ``--out``. Without CUDA it exits with status 2, unless
``--dry-run`` is given: then the same code runs on CPU with the Triton interpreter at tiny
shapes (timings are meaningless there; the dry run checks the script, not the speed).
Exit status 1 means a kernel disagreed with its reference or the live runtime check failed.
The whole run is meant to take under 10 minutes on one H100.

This file is the command line and the report; each check lives beside it, one job a file:
``gpu_kernel_cases`` (the kernels at model-like shapes, with references and baselines),
``gpu_kernel_check`` (correctness and speed), ``gpu_pause_latency``, ``gpu_runtime_check`` and
``gpu_compile_check`` (``--compile-only``: real compilation for an architecture, no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

# provenance.py and the gpu_* modules this script drives lie beside it: its folder is on
# sys.path when the script runs, but not when a test loads this file by path, so put it there.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_compile_check import compile_for_target  # noqa: E402
from gpu_kernel_cases import DRY_SHAPES, GPU_ODD_HEAD, GPU_SHAPES, GPU_SMOLLM2  # noqa: E402
from gpu_kernel_check import check_kernels  # noqa: E402
from gpu_pause_latency import DRY_PAUSE_MODEL, GPU_PAUSE_MODEL, measure_pause_latency  # noqa: E402
from gpu_runtime_check import DRY_RUNTIME_MODEL, GPU_RUNTIME_MODEL, measure_runtime  # noqa: E402
from provenance import command_line  # noqa: E402

# Where the docs read the GPU results from (docs/GPU.md, "Results"); relative to the repository.
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "results" / "gpu_check.json"

DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a fixed-width text table (floats to 4 significant digits)."""

    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU + Triton interpreter at tiny shapes (checks the script only)",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=sorted(DTYPE_NAMES),
        default=None,
        help="default: fp16 bf16 on GPU, fp32 fp16 in a dry run",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed calls per kernel")
    parser.add_argument("--skip-kernels", action="store_true", help="skip kernel checks")
    parser.add_argument("--skip-pause", action="store_true", help="skip pause latency")
    parser.add_argument(
        "--skip-runtime", action="store_true", help="skip the live runtime (and nccl) check"
    )
    parser.add_argument(
        "--compile-only",
        type=int,
        metavar="ARCH",
        default=None,
        help="no GPU needed: compile every kernel for sm_ARCH (e.g. 90 for "
        "H100/H200) and report shared memory, registers and spills",
    )
    return parser.parse_args(argv)


def compile_only_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--compile-only ARCH``: real compilation for a GPU target, on any machine."""
    from flowprefill_ray.kernels.launch import interpreter_enabled

    if interpreter_enabled():
        print(
            "gpu_check: --compile-only needs TRITON_INTERPRET unset (interpreted kernels "
            "cannot be compiled)",
            file=sys.stderr,
        )
        return 2
    dtypes = [DTYPE_NAMES[n] for n in (args.dtypes or ["fp16", "bf16", "fp32"])]
    began = time.perf_counter()
    rows = compile_for_target([GPU_SHAPES, GPU_ODD_HEAD, GPU_SMOLLM2], dtypes, args.compile_only)
    print(f"\n== compiled for sm_{args.compile_only} (no GPU used)")
    print(
        format_table(
            rows,
            [
                "kernel",
                "dtype",
                "warps",
                "stages",
                "shared_bytes",
                "registers",
                "spill_bytes",
                "compile_s",
                "ok",
                "error",
            ],
        )
    )
    import triton

    report = {
        "compile_only": True,
        "arch": args.compile_only,
        "triton": triton.__version__,
        "command": command_line(__file__, argv),
        "wall_s": time.perf_counter() - began,
        "compiled": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_only is not None:
        return compile_only_main(args, argv)
    if args.dry_run:
        # Must precede the first import of flowprefill_ray.kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). "
            "Run it on a GPU machine, or pass --dry-run to test the script on CPU.",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda")
    import triton

    default_dtypes = ["fp32", "fp16"] if args.dry_run else ["fp16", "bf16"]
    dtypes = [DTYPE_NAMES[n] for n in (args.dtypes or default_dtypes)]
    if args.dry_run and torch.bfloat16 in dtypes:
        print(
            "gpu_check: the Triton interpreter computes bf16 wrongly; dropping bf16",
            file=sys.stderr,
        )
        dtypes.remove(torch.bfloat16)
    shape_sets = [DRY_SHAPES] if args.dry_run else [GPU_SHAPES, GPU_ODD_HEAD, GPU_SMOLLM2]

    began = time.perf_counter()
    parts_s: dict[str, float] = {}
    correctness, timing = [], []
    if not args.skip_kernels:
        correctness, timing = kernels_part(args, device, dtypes, shape_sets)
        parts_s["kernels"] = time.perf_counter() - began

    pause_rows, pause_skipped = [], "skipped (--skip-pause)"
    if not args.skip_pause:
        started = time.perf_counter()
        pause_rows, pause_skipped = pause_part(args, device)
        parts_s["pause"] = time.perf_counter() - started

    runtime, runtime_skipped = {}, {"object_store": "skipped (--skip-runtime)"}
    if not args.skip_runtime:
        started = time.perf_counter()
        runtime, runtime_skipped = runtime_part(args, device)
        parts_s["runtime"] = time.perf_counter() - started

    report = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": command_line(__file__, argv),
        "wall_s": time.perf_counter() - began,
        "parts_s": parts_s,
        "correctness": correctness,
        "timing": timing,
        "pause": pause_rows,
        "pause_skipped": None if pause_rows else pause_skipped,
        "runtime": runtime,
        "runtime_skipped": runtime_skipped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} ({report['wall_s']:.0f} s)")
    failed = [r for r in correctness if not r["ok"]]
    if failed:
        print(
            f"gpu_check: {len(failed)} kernel case(s) disagree with the reference", file=sys.stderr
        )
    broken = [mode for mode, r in runtime.items() if not r["ok"]]
    if broken:
        print(f"gpu_check: the live runtime check failed ({', '.join(broken)})", file=sys.stderr)
    return 1 if failed or broken else 0


def kernels_part(args, device, dtypes, shape_sets) -> tuple[list[dict], list[dict]]:
    """Correctness of every kernel at every shape set; speed at the first one."""
    correctness, timing = check_kernels(
        shape_sets[:1], dtypes, device, 2 if args.dry_run else args.iters, True
    )
    extra, _ = check_kernels(shape_sets[1:], dtypes, device, 0, False)
    correctness += extra
    print("\n== correctness (Triton vs fp32 torch reference)")
    print(format_table(correctness, ["kernel", "case", "dtype", "max_abs_err", "ok"]))
    print("\n== speed" + (" (interpreter: meaningless)" if args.dry_run else " (CUDA events)"))
    print(
        format_table(
            timing,
            [
                "kernel",
                "case",
                "dtype",
                "triton_ms",
                "torch_ms",
                "speedup",
                "triton_tflops",
                "torch_tflops",
                "torch_baseline",
            ],
        )
    )
    return correctness, timing


def pause_part(args, device) -> tuple[list[dict], str | None]:
    """Prefill time and pause latency per granularity and checkpoint_sync mode."""
    spec = DRY_PAUSE_MODEL if args.dry_run else GPU_PAUSE_MODEL
    # The dry run uses the torch CPU path: the interpreter would take minutes per prefill.
    rows, skipped = measure_pause_latency(spec, device, "torch" if args.dry_run else "triton")
    print(
        f"\n== pause latency ({spec.layers} layers, hidden {spec.hidden}, "
        f"{spec.prompt_tokens}-token prompt, {str(spec.dtype).removeprefix('torch.')})"
    )
    if not rows:
        print(f"not measured: {skipped}")
        return rows, skipped
    columns = ["granularity", "checkpoint_sync", "checkpoints", "prefill_ms", "pauses"]
    columns += ["pause_mean_ms", "pause_p50_ms", "pause_max_ms", "resumed_logits_max_diff"]
    print(format_table(rows, columns))
    return rows, None


def runtime_part(args, device) -> tuple[dict[str, dict], dict[str, str]]:
    """The live runtime with the object-store hand-off, then with nccl (two GPUs only)."""
    spec = DRY_RUNTIME_MODEL if args.dry_run else GPU_RUNTIME_MODEL
    if device.type == "cuda":
        # The workers are other processes on this GPU: hand back what the earlier parts cached,
        # so the decode worker's auto pool sees the memory really free.
        torch.cuda.empty_cache()
    reports, skipped = {}, {}
    for mode in ("object_store", "nccl"):
        report, reason = measure_runtime(spec, device, mode)
        if report is None:
            skipped[mode] = reason
            print(f"\n== live runtime, kv_transfer {mode}: not run: {reason}")
            continue
        reports[mode] = report
        print(
            f"\n== live runtime, kv_transfer {mode} ({report['parameters'] / 1e6:,.0f}M "
            f"parameters, {spec.dtype}, {spec.long_tokens}-token long prompt)"
        )
        for key, value in report.items():
            if key != "model":
                print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    return reports, skipped


if __name__ == "__main__":
    sys.exit(main())
