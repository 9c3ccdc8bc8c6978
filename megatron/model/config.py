"""The model's own config: the only thing (with the layout) the model code sees."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # the tokenizer's
    padded_vocab_size: int  # rows of the embedding/output matrices (padded for TP)
    max_position_embeddings: int = 131072
    rms_norm_epsilon: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[dict] = None
    init_method: str = "normal"
    output_layer_init_method: str = "scaled_normal"
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    attn_bias: bool = False
    mlp_bias: bool = False
    params_dtype: torch.dtype = torch.float32
    seed: int = 1234
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    partition_activations: bool = False
    recompute_granularity: str = "full"  # "selective": keep matmul/attention outputs (recompute.py)
    attention_backend: str = "auto"
    fuse_pointwise: bool = False
    # Weight gradients accumulate into `weight.main_grad` (fp32, attached by the trainer) instead of `.grad`.
    gradient_accumulation_fusion: bool = False
    # Packed samples (doc_mask.py): documents end with the tokenizer's EOD token; with either flag on, document
    # ids travel with the hidden states through the pipeline and positions / attention restart per document.
    eod_token_id: Optional[int] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    # FP8 GEMMs in the transformer layers (megatron/model/fp8.py): torchao recipe name, or None for off.
    fp8_recipe: Optional[str] = None
    fp8_emulate: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def document_aware(self) -> bool:
        """Whether activations between stages carry document ids with the hidden states."""
        return self.reset_position_ids or self.reset_attention_mask

    @classmethod
    def from_neox(cls, cfg, vocab_size: int, params_dtype: torch.dtype,
                  eod_token_id: Optional[int] = None, gradient_accumulation_fusion: bool = False) -> "LlamaConfig":
        """`eod_token_id`: the tokenizer's end-of-document id, needed when reset_position_ids or
        reset_attention_mask is on (the model finds document boundaries in the tokens by it).
        `gradient_accumulation_fusion`: only the trainer turns it on, for runs whose optimizer has the fp32
        buffer the gradients go into (a model built with it cannot run backward until that is attached)."""
        return cls(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.kv_heads,
            intermediate_size=cfg.intermediate_size,
            vocab_size=vocab_size,
            padded_vocab_size=cfg.padded_vocab_size(vocab_size),
            max_position_embeddings=cfg.max_positions,
            rms_norm_epsilon=cfg.rms_norm_epsilon,
            rope_theta=cfg.rotary_emb_base,
            rope_scaling=cfg.rope_scaling.model_dump() if cfg.rope_scaling else None,
            init_method=cfg.init_method,
            output_layer_init_method=cfg.output_layer_init_method,
            init_method_std=cfg.init_method_std,
            hidden_dropout=cfg.hidden_dropout,
            attention_dropout=cfg.attention_dropout,
            attn_bias=cfg.use_bias_in_attn_linear,
            mlp_bias=cfg.use_bias_in_mlp,
            params_dtype=params_dtype,
            seed=cfg.seed,
            checkpoint_activations=cfg.checkpoint_activations,
            checkpoint_num_layers=cfg.checkpoint_num_layers,
            partition_activations=cfg.partition_activations,
            recompute_granularity=cfg.recompute_granularity,
            attention_backend=cfg.attention_backend,
            fuse_pointwise=cfg.fuse_pointwise,
            gradient_accumulation_fusion=gradient_accumulation_fusion,
            eod_token_id=eod_token_id,
            # Whole-document packing pads with EODs and needs each document (and padding token) kept apart.
            reset_position_ids=cfg.reset_position_ids or cfg.resolved_pack_impl != "packed",
            reset_attention_mask=cfg.reset_attention_mask or cfg.resolved_pack_impl != "packed",
            fp8_recipe=cfg.fp8.recipe if cfg.fp8 else None,
            fp8_emulate=bool(cfg.fp8 and cfg.fp8.emulate),
        )

    # ---- initialisation scales ----
    def input_std(self) -> float:
        if self.init_method == "small_init":  # Nguyen & Salazar 2019, as in GPT-NeoX
            return math.sqrt(2.0 / (5.0 * self.hidden_size))
        return self.init_method_std

    def output_std(self) -> float:
        if self.output_layer_init_method == "wang_init":  # GPT-NeoX / Mesh-Transformer-JAX
            return 2.0 / self.num_layers / math.sqrt(self.hidden_size)
        if self.output_layer_init_method == "scaled_normal":  # Megatron: keep the residual stream's variance
            return self.init_method_std / math.sqrt(2.0 * self.num_layers)
        return self.init_method_std

    def count_parameters(self, padded: bool = False) -> int:
        """Exact parameter count of the untied Llama-3.1 architecture (no biases)."""
        h, d, f = self.hidden_size, self.head_dim, self.intermediate_size
        v = self.padded_vocab_size if padded else self.vocab_size
        attn = h * self.num_attention_heads * d * 2 + h * self.num_kv_heads * d * 2
        per_layer = attn + 3 * h * f + 2 * h
        return self.num_layers * per_layer + 2 * v * h + h
