"""Llama-3.1 as a DeepSpeed PipelineModule: embedding on the first stage, final norm and output on the last.

With one stage (PP 1) it is still a PipelineModule, so one code path serves every layout; `model(tokens)` then
returns this TP rank's slice of the logits.

What flows between layers (and stages) is the hidden states [b, s, hidden]. With reset_position_ids or
reset_attention_mask on, it is the tuple (hidden states, document ids [b, s] int32): the embedding computes the
ids from the tokens (doc_mask.document_ids), every transformer layer passes them on, and the final norm drops
them. DeepSpeed's pipeline engine sends tuples between stages and sends gradients back for the floating-point
members only; activation checkpointing (torch's or DeepSpeed's partitioned one) saves the int ids as they are.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule

from megatron.model import doc_mask, recompute
from megatron.model.config import LlamaConfig
from megatron.model.layers import Embedding, OutputLayer, RMSNorm, TransformerLayer, make_loss_fn
from megatron.parallel.layout import ParallelLayout


class EmbeddingPipe(Embedding):
    def forward(self, tokens: torch.Tensor):
        hidden = super().forward(tokens)
        if not self.cfg.document_aware:
            return hidden
        eod = self.cfg.eod_token_id
        if eod is None:
            raise ValueError("reset_position_ids / reset_attention_mask find documents by the EOD token, but "
                             "eod_token_id is unset: pass the tokenizer's EOD id to LlamaConfig.from_neox")
        if not 0 <= eod < self.cfg.vocab_size:
            raise ValueError(f"reset_position_ids / reset_attention_mask: the tokenizer's EOD id {eod} is outside "
                             f"the model's vocabulary of {self.cfg.vocab_size} tokens, so no document boundary "
                             f"could be seen: use a tokenizer whose EOD fits, or a larger vocab_size")
        return hidden, doc_mask.document_ids(tokens, eod)


class TransformerLayerPipe(TransformerLayer):
    def forward(self, inputs):
        if isinstance(inputs, tuple):
            hidden, doc_ids = inputs
            return super().forward(hidden, doc_ids), doc_ids
        return super().forward(inputs)


class FinalNormPipe(RMSNorm):
    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg.hidden_size, cfg.rms_norm_epsilon, cfg.params_dtype, cfg.fuse_pointwise)

    def forward(self, inputs):
        return super().forward(inputs[0] if isinstance(inputs, tuple) else inputs)


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
        if cfg.recompute_granularity == "selective":  # the config refuses this; a hand-built LlamaConfig may not
            raise ValueError("recompute_granularity: selective cannot be combined with partition_activations")
        import deepspeed

        # DeepSpeed's checkpointing splits each saved layer input over the TP ranks (which hold it replicated)
        # and all-gathers it for the recomputation; it learns the TP group from the layout's mpu.
        deepspeed.checkpointing.configure(layout.mpu(), partition_activations=True,
                                          num_checkpoints=cfg.num_layers)
        return deepspeed.checkpointing.checkpoint
    return recompute.checkpoint_selective if cfg.recompute_granularity == "selective" else recompute.checkpoint_full


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
