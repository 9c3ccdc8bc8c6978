"""Name and layout map between Hugging Face `LlamaForCausalLM` tensors and this model's pipeline state.

Pipeline state names are `{spec_index}.{module path}`: spec 0 is the embedding, 1..L the transformer layers,
L+1 the final norm and L+2 the output layer (see `megatron.model.llama.layer_specs`). Tensors are fetched one by
one through `get(name)` so callers can stream from safetensors without holding the model twice.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from megatron.model import sharding
from megatron.model.config import LlamaConfig

Getter = Callable[[str], torch.Tensor]


def spec_index_of_layer(layer: int) -> int:
    return layer + 1


def hf_to_pipe_state(get: Getter, cfg: LlamaConfig, tp_rank: int, tp: int, spec_indices: Iterable[int]) -> dict:
    """This TP rank's tensors for the given pipeline spec indices, from HF tensors."""
    out: dict[str, torch.Tensor] = {}
    L = cfg.num_layers
    for idx in spec_indices:
        if idx == 0:
            w = sharding.pad_vocab(get("model.embed_tokens.weight"), cfg.padded_vocab_size)
            out["0.word_embeddings.weight"] = sharding.shard_dim(w, tp_rank, tp, 0).clone()
        elif idx == L + 1:
            out[f"{idx}.weight"] = get("model.norm.weight").clone()
        elif idx == L + 2:
            w = sharding.pad_vocab(get("lm_head.weight"), cfg.padded_vocab_size)
            out[f"{idx}.linear.weight"] = sharding.shard_dim(w, tp_rank, tp, 0).clone()
        else:
            p = f"model.layers.{idx - 1}."
            out[f"{idx}.input_layernorm.weight"] = get(p + "input_layernorm.weight").clone()
            out[f"{idx}.post_attention_layernorm.weight"] = get(p + "post_attention_layernorm.weight").clone()
            out[f"{idx}.attention.qkv.weight"] = sharding.shard_qkv(
                get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
                get(p + "self_attn.v_proj.weight"), tp_rank, tp, cfg.head_dim)
            out[f"{idx}.attention.dense.weight"] = sharding.shard_dim(
                get(p + "self_attn.o_proj.weight"), tp_rank, tp, 1).clone()
            out[f"{idx}.mlp.gate_up.weight"] = sharding.shard_gate_up(
                get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"), tp_rank, tp)
            out[f"{idx}.mlp.down.weight"] = sharding.shard_dim(get(p + "mlp.down_proj.weight"), tp_rank, tp, 1).clone()
    return out


def pipe_to_hf_state(shards: list[dict], cfg: LlamaConfig, spec_indices: Iterable[int]) -> dict:
    """HF tensors for the given spec indices from the states of all TP ranks (`shards[tp_rank]`)."""
    out: dict[str, torch.Tensor] = {}
    L = cfg.num_layers
    for idx in spec_indices:
        if idx == 0:
            w = torch.cat([s["0.word_embeddings.weight"] for s in shards], 0)
            out["model.embed_tokens.weight"] = w[: cfg.vocab_size]
        elif idx == L + 1:
            out["model.norm.weight"] = shards[0][f"{idx}.weight"]
        elif idx == L + 2:
            w = torch.cat([s[f"{idx}.linear.weight"] for s in shards], 0)
            out["lm_head.weight"] = w[: cfg.vocab_size]
        else:
            p = f"model.layers.{idx - 1}."
            out[p + "input_layernorm.weight"] = shards[0][f"{idx}.input_layernorm.weight"]
            out[p + "post_attention_layernorm.weight"] = shards[0][f"{idx}.post_attention_layernorm.weight"]
            q, k, v = sharding.unshard_qkv([s[f"{idx}.attention.qkv.weight"] for s in shards],
                                           cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim)
            out[p + "self_attn.q_proj.weight"], out[p + "self_attn.k_proj.weight"] = q, k
            out[p + "self_attn.v_proj.weight"] = v
            out[p + "self_attn.o_proj.weight"] = torch.cat([s[f"{idx}.attention.dense.weight"] for s in shards], 1)
            gate, up = sharding.unshard_gate_up([s[f"{idx}.mlp.gate_up.weight"] for s in shards])
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
            out[p + "mlp.down_proj.weight"] = torch.cat([s[f"{idx}.mlp.down.weight"] for s in shards], 1)
    return out
