"""The closest layouts that fit: on the GPUs asked for, else on the fewest more."""

from __future__ import annotations

import math
from typing import Optional

from megatron.config.schema import NeoXConfig
from megatron.planning.layout import Layout
from megatron.planning.plan import Plan, make_plan
from megatron.planning.shape import shape_of

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(cfg: NeoXConfig, base: Layout, gpus: int, per_node: int, keep_global_batch: bool = True,
                      batch: Optional[int] = None):
    """Layouts on `gpus` devices: TP a divisor of the GPUs per node; PP a divisor of the layer count or a power of
    two up to it (DeepSpeed splits layers unevenly, and 126 layers have no divisor between 2 and 126 that divides
    a power-of-two GPU count); DP the rest; checkpointing off/on (partitioned when TP > 1); micro-batch a divisor of
    the per-replica batch. The global batch (a training hyperparameter: `batch`, default base's) stays whenever
    DP divides it; where DP does not and keep_global_batch is False, it becomes the smallest multiple of DP above
    it."""
    batch = base.global_batch if batch is None else batch
    shape = shape_of(cfg)
    stages = sorted(set(_divisors(shape.layers)) | {2**k for k in range(shape.layers.bit_length())
                                                     if 2**k <= shape.layers})
    for tp in _divisors(per_node):
        for pp in stages:
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            if batch % dp and keep_global_batch:
                continue
            per_replica = -(-batch // dp)
            for micro in _divisors(per_replica):
                if micro > max(base.micro, 1) * 4:
                    continue
                for checkpoint, partition in ((False, False), (True, False), (True, True)):
                    if partition and tp == 1:
                        continue
                    yield Layout(tp=tp, pp=pp, dp=dp, micro=micro, gas=per_replica // micro, checkpoint=checkpoint,
                                 checkpoint_layers=1 if checkpoint else base.checkpoint_layers, partition=partition,
                                 selective=checkpoint and base.selective and not partition)


def distance(a: Layout, b: Layout) -> float:
    """How far a layout is from the configured one: one unit per doubling/halving of TP, PP or micro-batch, and
    per switch of checkpointing; partitioning and selective recompute are cheap switches."""
    return (abs(math.log2(a.tp / b.tp)) + abs(math.log2(a.pp / b.pp)) + 0.5 * abs(math.log2(a.micro / b.micro))
            + (a.checkpoint != b.checkpoint) + 0.25 * (a.partition != b.partition)
            + 0.25 * (a.selective != b.selective))


MAX_SEARCH_GPUS = 16384


def suggest(cfg: NeoXConfig, plan: Plan, limit: int = 3, max_scale: Optional[int] = None,
            batch: Optional[int] = None) -> tuple[list[Plan], Optional[int]]:
    """The closest fitting layouts on the GPUs asked for (fewest changes, then fastest); if none fits, the smallest
    power-of-two multiple of the GPU count (up to max_scale x, by default up to MAX_SEARCH_GPUS GPUs) where one
    does, with that count returned too. The global batch to keep is `batch` (default the plan's; the CLI passes
    the config's, which the evaluated layout may not have kept): on more GPUs it is kept where DP divides it, and
    layouts that keep it come first."""
    base, gpus = plan.layout, plan.gpus
    batch = base.global_batch if batch is None else batch
    if max_scale is None:
        max_scale = max(1, MAX_SEARCH_GPUS // gpus)
    scale = 1
    while scale <= max_scale:
        found = []
        for lay in candidate_layouts(cfg, base, gpus * scale, plan.gpu.per_node, scale == 1, batch):
            if lay == base:
                continue
            p = make_plan(cfg, gpus=gpus * scale, gpu=plan.gpu.key, tflops=plan.tflops, layout=lay)
            if p.fits:
                found.append(p)
        if found:
            found.sort(key=lambda p: (p.layout.global_batch != batch, distance(p.layout, base),
                                      p.step_seconds, p.device_gib))
            return found[:limit], (None if scale == 1 else gpus * scale)
        scale *= 2
    return [], None
