"""FlowPrefill on Ray: TTFT-SLO-aware LLM serving with operator-level prefill preemption.

See docs/ARCHITECTURE.md for how the packages fit together.
"""

__version__ = "0.1.0"
