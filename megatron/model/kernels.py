"""The pointwise maths of a Llama layer, and the switches that make it fast on a GPU.

Each function is the reference definition (HF Llama's numerics); on CUDA, `fused()` returns a torch.compile'd
copy, which merges the handful of elementwise ops (casts, square, mean, rsqrt, scale; the RoPE rotate-and-add;
silu times up) into one kernel each instead of reading and writing the activations several times. On CPU the
plain functions run, so tests compare the same maths everywhere.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

from megatron.model.rope import apply_rotary


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the activation dtype (bf16 variance is too coarse), like HF's Llama.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _ce_forward(logits: torch.Tensor, labels: torch.Tensor):
    x = logits.float()  # fused into the reductions when compiled: the fp32 logits are never stored
    lse = torch.logsumexp(x, dim=-1)
    target = torch.gather(x, -1, labels.unsqueeze(-1)).squeeze(-1)
    return lse, target


def _ce_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor):
    x = logits.float()
    onehot = torch.arange(x.shape[-1], device=x.device) == labels.unsqueeze(-1)
    return ((torch.exp(x - lse.unsqueeze(-1)) - onehot.float()) * grad.unsqueeze(-1)).to(logits.dtype)


class _CrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from unsharded logits in two passes over them (one forward, one backward).

    megatron-core's vocab-parallel version (needed for TP > 1) materialises fp32 logits and makes ~10 passes
    over them; with Llama-3's 128K vocabulary that was ~13% of an 8B-width step on an H100 (docs/performance.md)."""

    @staticmethod
    def forward(ctx, logits, labels, fuse):
        lse, target = fused(_ce_forward, fuse)(logits, labels)
        ctx.fuse = fuse
        ctx.save_for_backward(logits, labels, lse)
        return lse - target

    @staticmethod
    def backward(ctx, grad):
        logits, labels, lse = ctx.saved_tensors
        return fused(_ce_backward, ctx.fuse)(logits, labels, lse, grad.contiguous()), None, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, fuse: bool) -> torch.Tensor:
    """Per-position loss, [b, s] fp32, for logits [b, s, V] held whole on this rank (TP 1)."""
    return _CrossEntropy.apply(logits, labels, fuse)


_compiled: dict[Callable, Callable] = {}


def fused(fn: Callable, enabled: bool) -> Callable:
    if not (enabled and torch.cuda.is_available()):
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _compiled[fn]


def sdpa_context(backend: str):
    """Which scaled-dot-product-attention kernels may run, in order of preference."""
    if not torch.cuda.is_available() or backend == "math":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hopper = torch.cuda.get_device_capability()[0] >= 9
    order = {
        # cuDNN's fused attention is the fastest measured on H100 (docs/performance.md); flash elsewhere.
        "auto": ["CUDNN_ATTENTION", "FLASH_ATTENTION"] if hopper else ["FLASH_ATTENTION", "CUDNN_ATTENTION"],
        "cudnn": ["CUDNN_ATTENTION"],
        "flash": ["FLASH_ATTENTION"],
        "efficient": ["EFFICIENT_ATTENTION"],
    }[backend] + ["EFFICIENT_ATTENTION", "MATH"]
    backends = list(dict.fromkeys(getattr(SDPBackend, name) for name in order))
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:  # older torch without priorities
        return sdpa_kernel(backends)
