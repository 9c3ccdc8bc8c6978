"""The model's architecture numbers as the planner counts them: parameters and FLOPs per token."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.config.schema import NeoXConfig

# Llama-3's tokenizer, assumed when a config leaves vocab_size to the tokenizer (configs/tiny_cpu.yml does):
# planning should not need to load a tokenizer.
LLAMA3_VOCAB = 128256


@dataclass(frozen=True)
class Shape:
    """The architecture numbers the planner needs (HF names in comments)."""

    layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    ffn: int  # intermediate_size (per SwiGLU branch)
    vocab: int  # vocab_size (the tokenizer's)
    vocab_multiple: int  # make_vocab_size_divisible_by: rows are padded to a multiple of this x TP
    seq: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def padded_vocab(self, tp: int) -> int:
        m = self.vocab_multiple * tp
        return -(-self.vocab // m) * m

    # Parameters, as Hugging Face's LlamaForCausalLM holds them (untied embeddings, no biases).
    def attn_params(self) -> int:
        return self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)

    def mlp_params(self) -> int:
        return 3 * self.hidden * self.ffn

    def layer_params(self) -> int:
        return self.attn_params() + self.mlp_params() + 2 * self.hidden  # + the two RMSNorm weights

    def parameter_count(self) -> int:
        return self.layers * self.layer_params() + 2 * self.vocab * self.hidden + self.hidden  # + final norm


def shape_of(cfg: NeoXConfig) -> Shape:
    return Shape(layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.kv_heads,
                 ffn=cfg.intermediate_size, vocab=cfg.vocab_size or LLAMA3_VOCAB,
                 vocab_multiple=cfg.make_vocab_size_divisible_by, seq=cfg.seq_length)


def flops_per_token(shape: Shape) -> float:
    """megatron.metrics.flops_per_token (6·N_matmul + 12·L·h·s), the figure the trainer prints TFLOP/s with."""
    from megatron.metrics import flops_per_token as trainer_flops
    from megatron.model.config import LlamaConfig

    cfg = LlamaConfig(num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads,
                      num_kv_heads=shape.kv_heads, intermediate_size=shape.ffn, vocab_size=shape.vocab,
                      padded_vocab_size=shape.padded_vocab(1))
    return trainer_flops(cfg, shape.seq)
