"""Rotary position embeddings with Llama-3.1's `llama3` frequency scaling (HF "rotate_half" layout)."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch


def llama3_inv_freq(head_dim: int, theta: float, rope_scaling: Optional[dict]) -> torch.Tensor:
    """Inverse frequencies; with rope_scaling, long wavelengths are divided by `factor`, short ones kept,
    and the band in between interpolated smoothly (Llama-3.1)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not rope_scaling:
        return inv_freq
    factor = rope_scaling["factor"]
    low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    original = rope_scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < original / high) & ~(wavelen > original / low)
    return torch.where(in_band, interpolated, scaled)


@functools.lru_cache(maxsize=8)
def _tables(head_dim: int, theta: float, scaling: Optional[tuple], seq_len: int, device: torch.device,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = llama3_inv_freq(head_dim, theta, dict(scaling) if scaling else None).to(device)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RotaryEmbedding:
    """cos/sin tables [seq, head_dim], computed in fp32 and shared by every layer (memoised, not per layer)."""

    def __init__(self, head_dim: int, theta: float, rope_scaling: Optional[dict]):
        self.head_dim, self.theta = head_dim, theta
        self.scaling = tuple(sorted(rope_scaling.items())) if rope_scaling else None

    def __call__(self, seq_len: int, device: torch.device, dtype: torch.dtype):
        return _tables(self.head_dim, self.theta, self.scaling, seq_len, device, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d]; cos/sin [s, d]."""
    return x * cos + rotate_half(x) * sin
