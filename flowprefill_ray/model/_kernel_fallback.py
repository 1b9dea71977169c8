"""TEMPORARY torch ops used only until flowprefill_ray.kernels lands. Delete then."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


def _rms_norm(x, weight, eps, residual=None):
    r = x if residual is None else x + residual
    r32 = r.float()
    out = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.float()).to(x.dtype), r


def _rotary(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _varlen_attention(q, k, v, cu_q, cu_k, scale):
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        lq, lk = qe - qs, ke - ks
        qb = q[qs:qe].transpose(0, 1)
        kb = k[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)
        vb = v[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
        out[qs:qe] = o.transpose(0, 1)
    return out


def _silu_and_mul(gate_up):
    i = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :i]) * gate_up[:, i:]


def kernel_ops(backend="auto", device="cpu"):
    return SimpleNamespace(
        rms_norm=_rms_norm,
        rotary=_rotary,
        varlen_attention=_varlen_attention,
        silu_and_mul=_silu_and_mul,
    )
