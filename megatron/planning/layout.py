"""The parallel layout (TP x PP x DP, micro-batch, checkpointing) and which layers each pipeline stage builds."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from megatron.config.schema import NeoXConfig
from megatron.planning.shape import Shape


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro: int  # train_micro_batch_size_per_gpu
    gas: int  # gradient_accumulation_steps
    checkpoint: bool  # checkpoint_activations
    checkpoint_layers: int = 1  # checkpoint_num_layers
    partition: bool = False  # partition_activations
    selective: bool = False  # recompute_granularity: selective (checkpointed layers keep matmul/attention outputs)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch(self) -> int:
        return self.micro * self.gas * self.dp

    def describe(self) -> str:
        ckpt = "off"
        if self.checkpoint:
            ckpt = f"every {self.checkpoint_layers} layer{'s' if self.checkpoint_layers > 1 else ''}"
            ckpt += ", partitioned over TP" if self.partition and self.tp > 1 else ""
            ckpt += ", selective (matmul and attention outputs kept)" if self.selective else ""
        return (f"TP {self.tp} x PP {self.pp} x DP {self.dp}, micro-batch {self.micro} x {self.gas} accumulation, "
                f"activation checkpointing {ckpt}")


def layout_of(cfg: NeoXConfig, gpus: int) -> Layout:
    return Layout(tp=cfg.tp, pp=cfg.pp, dp=max(1, gpus // (cfg.tp * cfg.pp)), micro=cfg.train_micro_batch_size_per_gpu,
                  gas=cfg.gradient_accumulation_steps, checkpoint=cfg.checkpoint_activations,
                  checkpoint_layers=cfg.checkpoint_num_layers, partition=cfg.partition_activations,
                  selective=_selective(cfg, cfg.checkpoint_activations))


def _selective(cfg: NeoXConfig, checkpoint: bool) -> bool:
    return checkpoint and cfg.recompute_granularity == "selective"


# ------------------------------------------------------------------------------------------------ pipeline stages
def _partition_uniform(n: int, parts: int) -> list[int]:
    if n <= parts:
        return [min(p, n) for p in range(parts + 1)]
    chunk, residual = divmod(n, parts)
    bounds = [p * chunk for p in range(parts + 1)]
    for i in range(residual):
        for j in range(i + 1, parts + 1):
            bounds[j] += 1
    return bounds


def _partition_balanced(weights: list[float], parts: int) -> list[int]:
    """The same dynamic program as deepspeed.runtime.utils.partition_balanced (tie-breaking included), so the
    planner puts layers on the stages DeepSpeed does without importing DeepSpeed."""
    n = len(weights)
    if n <= parts:
        return _partition_uniform(n, parts)
    inf = math.inf
    dp_max = [[inf] * (parts + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (parts + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (parts + 1) for _ in range(n + 1)]
    position = [[0] * (parts + 1) for _ in range(n + 1)]
    prefix = [0.0] * (n + 1)
    for i, w in enumerate(weights):
        prefix[i + 1] = prefix[i] + w
    dp_max[0][0] = 0
    dp_cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, parts) + 1):
            for k in range(i):
                chunk = prefix[i] - prefix[k]
                max_sum = max(dp_max[k][j - 1], chunk)
                min_sum = min(dp_min[k][j - 1], chunk)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j], dp_max[i][j], dp_min[i][j], position[i][j] = cost, max_sum, min_sum, k
    bounds = [n]
    for j in reversed(range(1, parts + 1)):
        bounds.append(position[bounds[-1]][j])
    return bounds[::-1]


def stage_items(shape: Shape, tp: int, pp: int, method: str) -> list[list[str]]:
    """Which of the PipelineModule's layer specs (megatron/model/llama.py: embedding, the transformer layers,
    final norm, output) each stage builds, split the way DeepSpeed's PipelineModule._partition_layers does."""
    if method.lower() != "parameters":
        tp = 1  # only the parameter sizes depend on TP: one cached split serves every TP the search tries
    return [list(stage) for stage in _stage_items(shape, tp, pp, method)]


@functools.lru_cache(maxsize=256)  # the layout search asks for the same split many times
def _stage_items(shape: Shape, tp: int, pp: int, method: str) -> tuple[tuple[str, ...], ...]:
    items = ["embedding"] + ["layer"] * shape.layers + ["final_norm", "output"]
    method = method.lower()
    if method == "uniform":
        bounds = _partition_uniform(len(items), pp)
    elif method == "parameters":
        vp = shape.padded_vocab(tp)
        sizes = {"embedding": vp * shape.hidden // tp, "output": vp * shape.hidden // tp, "final_norm": shape.hidden,
                 "layer": (shape.attn_params() + shape.mlp_params()) // tp + 2 * shape.hidden}
        bounds = _partition_balanced([sizes[i] for i in items], pp)
    elif method.startswith("type:"):
        # Every layer spec class name matches "transformer" only for TransformerLayerPipe.
        import re

        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        names = {"embedding": "EmbeddingPipe", "layer": "TransformerLayerPipe", "final_norm": "FinalNormPipe",
                 "output": "OutputLayerPipe"}
        bounds = _partition_balanced([1.0 if pattern.search(names[i]) else 0.0 for i in items], pp)
    else:
        raise ValueError(f"unknown pipe_partition_method {method!r}")
    return tuple(tuple(items[bounds[p]:bounds[p + 1]]) for p in range(pp))
