"""Request traces: loaders for public trace formats, synthetic arrivals, SLO-class assignment.

Plain Python (no Ray, no torch). Everything returns a ``Workload`` of ``TraceRecord``.
"""

from .loaders import (
    BUILTIN_TRACES,
    MOONCAKE_BLOCK_TOKENS,
    BailianConfig,
    load_azure_raw,
    load_bailian,
    load_builtin,
    load_burstgpt,
    load_mooncake,
    load_normalized_csv,
    load_trace,
    parse_azure_timestamp,
)
from .multiturn import MultiTurnConfig, multiturn_workload, turn_prompt_tokens
from .slo_assignment import PAPER_CLASSES, SLOAssignmentConfig, assign_slo_classes
from .synthetic import (
    FixedLength,
    LogNormalLength,
    SyntheticConfig,
    TraceLength,
    UniformLength,
    synthetic_workload,
)
from .tenants import merge_tenants
from .trace import TraceFormatError, TraceRecord, Workload

__all__ = [
    "BUILTIN_TRACES",
    "MOONCAKE_BLOCK_TOKENS",
    "PAPER_CLASSES",
    "BailianConfig",
    "FixedLength",
    "LogNormalLength",
    "MultiTurnConfig",
    "SLOAssignmentConfig",
    "SyntheticConfig",
    "TraceFormatError",
    "TraceLength",
    "TraceRecord",
    "UniformLength",
    "Workload",
    "assign_slo_classes",
    "load_azure_raw",
    "load_bailian",
    "load_builtin",
    "load_burstgpt",
    "load_mooncake",
    "load_normalized_csv",
    "load_trace",
    "merge_tenants",
    "multiturn_workload",
    "parse_azure_timestamp",
    "synthetic_workload",
    "turn_prompt_tokens",
]
