"""Selective activation checkpointing (`recompute_granularity: selective`): keep the expensive results, redo the cheap.

Full checkpointing keeps only each checkpointed layer's input and runs its whole forward again in the backward
pass: every matmul twice, about a third more GPU work per step. Selective checkpointing checkpoints the same
layers but, through torch's per-op policy (torch.utils.checkpoint.create_selective_checkpoint_contexts), keeps
the outputs of the matmuls and of attention from the first forward; the recomputation then replays only the
pointwise ops between them (RMSNorm, RoPE, SwiGLU's silu x up, the residual adds), which are memory-bound and cheap.
It keeps more than full checkpointing (a layer's matmul outputs, about 12.5 hidden-widths per token at 8B width
against 1) and much less than none (the pointwise intermediates: norms' fp32 copies, rotated q/k, silu outputs).

The tensor-parallel all-reduce that follows a row-parallel matmul is kept too: megatron-core reduces in place,
into the matmul output the cache already holds, so replaying it would sum the ranks twice (and communicate again).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def _ops(*names: str) -> frozenset:
    """The overloads that exist in this torch build (SDPA backends differ by version and platform)."""
    found = set()
    for name in names:
        namespace, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None)
        if packet is not None and hasattr(packet, overload):
            found.add(getattr(packet, overload))
    return frozenset(found)


KEEP = _ops(
    # matmuls (megatron-core's linear layers reach aten.mm; bmm is the math attention backend's)
    "aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default",
    # FP8 GEMMs (fp8: megatron/model/fp8.py; torchao's emulation reaches aten.mm instead); their casts are replayed
    "aten._scaled_mm.default",
    # fused attention forwards: their outputs include the logsumexp the backward needs
    "aten._scaled_dot_product_flash_attention.default", "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default",
    # in-place collectives (torch.distributed.all_reduce): see the module docstring
    "c10d.allreduce_.default",
)
# Without these the policy would silently recompute matmuls, or sum the TP ranks twice: refuse to run instead.
MISSING = [name for name in ("aten.mm.default", "c10d.allreduce_.default") if not any(str(op) == name for op in KEEP)]


def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in KEEP:
        return CheckpointPolicy.MUST_SAVE
    if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
        # A random op to be replayed (dropout): a kept attention kernel with dropout (flash, cuDNN) is not
        # replayed, so the generator would stand elsewhere and the replayed mask differ from the forward's:
        # silently wrong gradients. The config refuses dropout with selective recompute (validate.py); this
        # stops a model built around the config.
        raise RandomOpError(f"selective recompute met a random op ({op}): set hidden_dropout and "
                            f"attention_dropout to 0, or use recompute_granularity: full")
    return CheckpointPolicy.PREFER_RECOMPUTE


class RandomOpError(RuntimeError):
    pass


def checkpoint_selective(fn, *args):
    """torch's non-reentrant checkpoint of `fn(*args)` under the keep-matmuls policy (DeepSpeed's PipelineModule
    calls this as its activation_checkpoint_func for each chunk of checkpoint_num_layers layers)."""
    if MISSING:
        raise RuntimeError(f"selective recompute needs {', '.join(MISSING)}, which this torch build lacks: use "
                           f"recompute_granularity: full")
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, policy))


def checkpoint_full(fn, *args):
    return checkpoint(fn, *args, use_reentrant=False)
