"""A roofline cost model of a dense decoder on one GPU.

Each operator takes ``max(flops / achieved_flops, bytes / achieved_bandwidth)`` plus a kernel
launch. What makes small work units (small chunks) expensive, as on real GPUs:

- every unit re-reads all weights (16 GB for Llama-3.1-8B in bf16), however few tokens it has;
- GEMM efficiency falls for few tokens: ``eff(T) = max_compute_efficiency * T / (T + half_efficiency_tokens)``
  (tiles run partly empty, too few thread blocks to fill the SMs);
- a chunk's attention reads the KV of every earlier chunk and computes against it
  (chunk k of size c does ``c * (k*c) + c*(c+1)/2`` query-key pairs);
- every unit pays ``unit_overhead_s`` (scheduling, input preparation, synchronisation).

FLOP counts: a GEMM of ``T x K`` by ``K x N`` is ``2 T K N``; attention for ``T`` new queries
over ``C`` earlier keys with causal masking is ``4 * head_dim * q_heads * (T*C + T(T+1)/2)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from .cost_model import ItemShape, UnitCost


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelShape(_Frozen):
    """A Llama-family decoder's dimensions."""

    name: str
    num_layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    q_heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    vocab: int = Field(gt=0)
    dtype_bytes: int = Field(default=2, gt=0)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.q_heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def params(self) -> int:
        """Parameter count (untied input embedding and LM head; norms included)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab * h + h


class GPUSpec(_Frozen):
    """Peak dense throughput in TFLOP/s (bf16, no sparsity) and memory bandwidth in GB/s."""

    name: str
    peak_tflops: float = Field(gt=0)
    memory_gbps: float = Field(gt=0)


LLAMA_3_1_8B = ModelShape(
    name="Llama-3.1-8B",
    num_layers=32,
    hidden=4096,
    q_heads=32,
    kv_heads=8,
    intermediate=14336,
    vocab=128256,
)
H100_SXM = GPUSpec(name="H100-SXM", peak_tflops=989.0, memory_gbps=3350.0)
A800_SXM = GPUSpec(name="A800-SXM-80GB", peak_tflops=312.0, memory_gbps=2039.0)


class RooflineConfig(_Frozen):
    """Roofline cost model parameters (efficiencies are fractions of peak, times in seconds)."""

    model: ModelShape = LLAMA_3_1_8B
    gpu: GPUSpec = H100_SXM
    max_compute_efficiency: float = Field(default=0.7, gt=0, le=1)
    half_efficiency_tokens: float = Field(default=96.0, ge=0)
    memory_efficiency: float = Field(default=0.8, gt=0, le=1)
    kernel_launch_s: float = Field(default=6e-6, ge=0)
    unit_overhead_s: float = Field(default=0.003, ge=0)


class RooflineCostModel:
    """Prices units of a ``ModelShape`` on a ``GPUSpec``; see the module docstring."""

    def __init__(self, config: RooflineConfig | None = None) -> None:
        self.config = config or RooflineConfig()
        self.shape = self.config.model
        self.num_layers = self.shape.num_layers
        self.name = f"roofline-{self.shape.name}-{self.config.gpu.name}"
        self._flops = self.config.gpu.peak_tflops * 1e12
        self._bandwidth = self.config.gpu.memory_gbps * 1e9 * self.config.memory_efficiency

    def _efficiency(self, tokens: int) -> float:
        c = self.config
        return c.max_compute_efficiency * tokens / (tokens + c.half_efficiency_tokens)

    def _op_s(self, flops: float, nbytes: float, tokens: int) -> float:
        compute = flops / (self._flops * self._efficiency(max(tokens, 1))) if flops else 0.0
        return max(compute, nbytes / self._bandwidth) + self.config.kernel_launch_s

    def _gemm_s(self, tokens: int, k: int, n: int) -> float:
        b = self.shape.dtype_bytes
        return self._op_s(2.0 * tokens * k * n, b * (k * n + tokens * (k + n)), tokens)

    def _elementwise_s(self, tokens: int, width: int, passes: int) -> float:
        return self._op_s(0.0, self.shape.dtype_bytes * tokens * width * passes, tokens)

    # -------------------------------------------------------------- FLOP counts (for checks)

    def unit_flops(self, items: Sequence[ItemShape]) -> float:
        """Floating-point operations of one unit (GEMMs, attention, logits of last tokens)."""
        s = self.shape
        t = sum(it.new_tokens for it in items)
        gemm = (
            2
            * t
            * (
                s.hidden * (s.hidden + 2 * s.kv_dim)
                + s.hidden * s.hidden
                + 3 * s.hidden * s.intermediate
            )
        )
        attn = sum(self._attention_flops(it) for it in items)
        return s.num_layers * (gemm + attn) + 2 * len(items) * s.hidden * s.vocab

    def _attention_flops(self, item: ItemShape) -> float:
        s = self.shape
        pairs = item.new_tokens * item.context_tokens + item.new_tokens * (item.new_tokens + 1) / 2
        return 4.0 * s.head_dim * s.q_heads * pairs

    # -------------------------------------------------------------- CostModel

    def unit_cost(self, items: Sequence[ItemShape]) -> UnitCost:
        s = self.shape
        b = s.dtype_bytes
        t = sum(it.new_tokens for it in items)
        attention_ops = (
            self._elementwise_s(t, s.hidden, 3),  # input norm: read x and residual, write
            self._gemm_s(t, s.hidden, s.hidden + 2 * s.kv_dim),  # fused QKV projection
            self._elementwise_s(t, s.hidden + s.kv_dim, 2),  # RoPE on q and k
            sum(  # attention core per sequence: new queries over earlier + new keys
                self._op_s(
                    self._attention_flops(it),
                    b
                    * (
                        2 * (it.context_tokens + it.new_tokens) * s.kv_dim
                        + 2 * it.new_tokens * s.hidden
                    ),
                    it.new_tokens,
                )
                for it in items
            ),
            self._gemm_s(t, s.hidden, s.hidden),  # output projection (+ residual add)
        )
        mlp_ops = (
            self._elementwise_s(t, s.hidden, 3),  # post-attention norm
            self._gemm_s(t, s.hidden, 2 * s.intermediate),  # fused gate/up
            self._elementwise_s(t, 3 * s.intermediate, 1),  # SiLU * up
            self._gemm_s(t, s.intermediate, s.hidden),  # down projection (+ residual add)
        )
        attention = sum(attention_ops)
        mlp = sum(mlp_ops)
        overhead = self.config.unit_overhead_s + self._elementwise_s(
            t, s.hidden, 1
        )  # embedding gather
        tail = self._gemm_s(len(items), s.hidden, s.vocab)  # logits of each sequence's last token
        return UnitCost(
            overhead,
            attention,
            mlp,
            s.num_layers,
            tail,
            tuple(op / attention for op in attention_ops),
            tuple(op / mlp for op in mlp_ops),
        )
