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
