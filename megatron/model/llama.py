"""Llama-3.1 as a DeepSpeed PipelineModule: embedding on the first stage, final norm and output on the last.

With one stage (PP 1) it is still a PipelineModule, so one code path serves every layout; `model(tokens)` then
returns this TP rank's slice of the logits.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule

from megatron.model.config import LlamaConfig
from megatron.model.layers import Embedding, OutputLayer, RMSNorm, TransformerLayer, make_loss_fn
from megatron.parallel.layout import ParallelLayout


class EmbeddingPipe(Embedding):
    pass


class TransformerLayerPipe(TransformerLayer):
    pass


class FinalNormPipe(RMSNorm):
    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg.hidden_size, cfg.rms_norm_epsilon, cfg.params_dtype, cfg.fuse_pointwise)


class OutputLayerPipe(OutputLayer):
    pass


def layer_specs(cfg: LlamaConfig) -> list[LayerSpec]:
    return (
        [LayerSpec(EmbeddingPipe, cfg)]
        + [LayerSpec(TransformerLayerPipe, cfg, i) for i in range(cfg.num_layers)]
        + [LayerSpec(FinalNormPipe, cfg), LayerSpec(OutputLayerPipe, cfg)]
    )


def _checkpoint_function(cfg: LlamaConfig, layout: ParallelLayout):
    if cfg.partition_activations:
        import deepspeed

        # DeepSpeed's checkpointing splits each saved layer input over the TP ranks (which hold it replicated)
        # and all-gathers it for the recomputation; it learns the TP group from the layout's mpu.
        deepspeed.checkpointing.configure(layout.mpu(), partition_activations=True,
                                          num_checkpoints=cfg.num_layers)
        return deepspeed.checkpointing.checkpoint
    return lambda fn, *args: torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def build_model(cfg: LlamaConfig, layout: ParallelLayout, partition_method: str = "type:transformer") -> PipelineModule:
    model = PipelineModule(
        layers=layer_specs(cfg),
        loss_fn=make_loss_fn(cfg),
        topology=layout.ds_topology(),
        partition_method=partition_method,
        activation_checkpoint_interval=cfg.checkpoint_num_layers if cfg.checkpoint_activations else 0,
        activation_checkpoint_func=_checkpoint_function(cfg, layout),
        checkpointable_layers=["TransformerLayerPipe"],
        seed_layers=False,  # init is seeded per layer by the layers themselves (layout-independent)
    )
    # DeepSpeed's PipelineEngine computes which layer blocks to checkpoint; without it (a bare `model(tokens)`)
    # forward() would silently skip every layer when checkpointing is on. Do it here so both paths work.
    model._precompute_checkpointable_values()
    return model
