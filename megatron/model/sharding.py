"""How full (Hugging Face layout) weights map to tensor-parallel shards, and back.

One place for it: initialisation builds the full weight and takes this rank's shard (so a seed gives the same
model at every TP/PP), and the converters use the same functions. Fused layouts per TP rank:
  qkv:     [q heads of the rank ; its kv heads' k ; its kv heads' v]      (rows = output features)
  gate_up: [gate rows of the rank ; up rows of the rank]
GQA with TP > num_kv_heads: each kv head is shared by r = TP/num_kv_heads consecutive ranks (the q heads on
those ranks all attend with it). Its k rows (and v rows) are split in r slices of head_dim/r rows, one per rank,
and the attention all-gathers the slices inside the group in the forward pass (so the backward pass sums the
gradients of all ranks sharing the head). Every k/v weight element thus lives on exactly one rank: no replicas
to keep in sync, and the gradient norm counts each kv head once.
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
    """How many TP ranks share each kv head (1 unless TP exceeds the kv heads)."""
    return max(1, tp // num_kv_heads)


def kv_rows_per_rank(num_kv_heads: int, tp: int, head_dim: int) -> int:
    """Rows of k (and of v) this rank holds: whole heads, or a 1/r slice of its shared head."""
    r = kv_replicas(num_kv_heads, tp)
    if head_dim % r:
        raise ValueError(f"head_dim {head_dim} does not split over the {r} ranks sharing a kv head")
    return kv_heads_per_rank(num_kv_heads, tp) * head_dim // r


def shard_dim(w: torch.Tensor, rank: int, tp: int, dim: int) -> torch.Tensor:
    return w.chunk(tp, dim=dim)[rank]


def shard_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, tp: int, head_dim: int) -> torch.Tensor:
    """q [nq*d, h], k/v [nkv*d, h] (HF layout) → this rank's fused [q_r; k_r; v_r]."""
    nkv = k.shape[0] // head_dim
    # k and v rows split evenly in rank order: whole heads when TP divides nkv, head slices when TP exceeds it.
    return torch.cat([shard_dim(q, rank, tp, 0), shard_dim(k, rank, tp, 0), shard_dim(v, rank, tp, 0)], dim=0)


def unshard_qkv(shards: list[torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of shard_qkv over all TP ranks → (q, k, v) in HF layout."""
    tp = len(shards)
    kv_rows = kv_rows_per_rank(num_kv_heads, tp, head_dim)
    parts = [torch.split(w, [num_heads // tp * head_dim, kv_rows, kv_rows], dim=0) for w in shards]
    return tuple(torch.cat([p[i] for p in parts], 0) for i in range(3))


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
