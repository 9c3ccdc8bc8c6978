"""How full (Hugging Face layout) weights map to tensor-parallel shards, and back.

One place for it: initialisation builds the full weight and takes this rank's shard (so a seed gives the same
model at every TP/PP), and the converters use the same functions. Fused layouts per TP rank:
  qkv:     [q heads of the rank ; its kv heads' k ; its kv heads' v]      (rows = output features)
  gate_up: [gate rows of the rank ; up rows of the rank]
GQA with TP > num_kv_heads replicates each kv head on TP/num_kv_heads consecutive ranks.
"""

from __future__ import annotations

import torch


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    return num_kv_heads // tp if num_kv_heads >= tp else 1


def kv_head_range(rank: int, num_kv_heads: int, tp: int) -> range:
    if num_kv_heads >= tp:
        per = num_kv_heads // tp
        return range(rank * per, (rank + 1) * per)
    head = rank * num_kv_heads // tp
    return range(head, head + 1)


def kv_replicas(num_kv_heads: int, tp: int) -> int:
    """How many TP ranks hold a copy of each kv head (1 unless TP exceeds the kv heads)."""
    return max(1, tp // num_kv_heads)


def shard_dim(w: torch.Tensor, rank: int, tp: int, dim: int) -> torch.Tensor:
    return w.chunk(tp, dim=dim)[rank]


def shard_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, tp: int, head_dim: int) -> torch.Tensor:
    """q [nq*d, h], k/v [nkv*d, h] (HF layout) → this rank's fused [q_r; k_r; v_r]."""
    nkv = k.shape[0] // head_dim
    heads = kv_head_range(rank, nkv, tp)
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    return torch.cat([shard_dim(q, rank, tp, 0), k[rows], v[rows]], dim=0)


def unshard_qkv(shards: list[torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of shard_qkv over all TP ranks → (q, k, v) in HF layout (replicated kv heads taken once)."""
    tp = len(shards)
    nq_local = num_heads // tp
    nkv_local = kv_heads_per_rank(num_kv_heads, tp)
    qs, ks, vs = [], [None] * num_kv_heads, [None] * num_kv_heads
    for rank, w in enumerate(shards):
        q, k, v = torch.split(w, [nq_local * head_dim, nkv_local * head_dim, nkv_local * head_dim], dim=0)
        qs.append(q)
        for i, head in enumerate(kv_head_range(rank, num_kv_heads, tp)):
            if ks[head] is None:
                ks[head] = k[i * head_dim:(i + 1) * head_dim]
                vs[head] = v[i * head_dim:(i + 1) * head_dim]
    return torch.cat(qs, 0), torch.cat(ks, 0), torch.cat(vs, 0)


def shard_gate_up(gate: torch.Tensor, up: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    return torch.cat([shard_dim(gate, rank, tp, 0), shard_dim(up, rank, tp, 0)], dim=0)


def unshard_gate_up(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    gates, ups = zip(*(w.chunk(2, dim=0) for w in shards))
    return torch.cat(gates, 0), torch.cat(ups, 0)


def pad_vocab(w: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Append zero rows so the vocab divides over TP (the padding logits are masked out of the loss anyway)."""
    if w.shape[0] == padded_rows:
        return w
    return torch.cat([w, w.new_zeros(padded_rows - w.shape[0], *w.shape[1:])], dim=0)
