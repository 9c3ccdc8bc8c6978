"""Llama-3.1 building blocks on megatron-core's tensor-parallel layers.

Activations are [batch, seq, hidden]. Tensor parallelism changes no code here: the column/row-parallel layers and
the shard shapes come from the layout held by megatron-core's parallel_state. Weights are initialised as the full
(HF-layout) matrix from a generator seeded by (seed, layer, name) and then sharded, so one seed gives the same
model at every TP/PP layout.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

from megatron import grad_accum_fusion
from megatron.model import doc_mask, fp8, kernels, sharding
from megatron.model.config import LlamaConfig
from megatron.model.rope import RotaryEmbedding
from megatron.parallel.layout import kv_group


class _GatherSharedKV(torch.autograd.Function):
    """All-gather the k/v head slices of the ranks sharing a kv head (last dim, rank order); the backward pass
    sums the incoming gradients over the group (each rank's q heads used the whole head) and keeps this rank's
    slice: an all-reduce plus a split, since gloo has no reduce-scatter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank, ctx.size = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.size, dim=-1)[ctx.rank].contiguous(), None


def tp_rank_size() -> tuple[int, int]:
    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def megatron_config(cfg: LlamaConfig) -> ModelParallelConfig:
    _, tp = tp_rank_size()
    if cfg.gradient_accumulation_fusion:
        grad_accum_fusion.install()  # before the layers are built: they check for the wgrad kernel
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        params_dtype=cfg.params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # we initialise full matrices ourselves, see module docstring
        gradient_accumulation_fusion=cfg.gradient_accumulation_fusion,
        sequence_parallel=False,
    )


def init_generator(seed: int, layer: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{layer}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def normal_full(shape: tuple[int, ...], std: float, seed: int, layer: int, name: str) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=init_generator(seed, layer, name))


@torch.no_grad()
def copy_shard_(param: torch.Tensor, shard: torch.Tensor, partition_dim: int) -> None:
    """Fill a TP-sharded weight and mark it as such. megatron-core only sets the `tensor_model_parallel`
    attribute when it initialises the weight itself; without it DeepSpeed's gradient norm would count the
    weight on TP rank 0 only (as for the norms' weights, which every TP rank holds whole)."""
    if param.shape != shard.shape:
        raise ValueError(f"shard shape {tuple(shard.shape)} does not fit parameter {tuple(param.shape)}")
    param.copy_(shard.to(dtype=param.dtype, device=param.device))
    tensor_parallel.set_tensor_model_parallel_attributes(param, is_parallel=True, dim=partition_dim, stride=1)


class RMSNorm(torch.nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, fuse: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self._norm = kernels.fused(kernels.rms_norm, fuse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.weight, self.eps)


class Attention(torch.nn.Module):
    """Grouped-query self-attention: fused column-parallel qkv, SDPA, row-parallel output projection."""

    def __init__(self, cfg: LlamaConfig, layer_number: int):
        super().__init__()
        rank, tp = tp_rank_size()
        d = cfg.head_dim
        self.cfg, self.head_dim = cfg, d
        self.rotary = RotaryEmbedding(d, cfg.rope_theta, cfg.rope_scaling)
        self.heads = cfg.num_attention_heads // tp
        self.kv_heads = sharding.kv_heads_per_rank(cfg.num_kv_heads, tp)
        self.kv_rows = sharding.kv_rows_per_rank(cfg.num_kv_heads, tp, d)  # < kv_heads * d when the head is shared
        self.kv_group = kv_group() if sharding.kv_replicas(cfg.num_kv_heads, tp) > 1 else None
        self._rope = kernels.fused(kernels.rope_qk, cfg.fuse_pointwise)
        if self.kv_rows < self.kv_heads * d and self.kv_group is None:
            raise RuntimeError(f"TP {tp} > num_kv_heads {cfg.num_kv_heads} needs the kv-head groups: "
                               "call ParallelLayout.initialize(..., num_kv_heads=...) first")
        mp = megatron_config(cfg)
        self.qkv = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, tp * (self.heads * d + 2 * self.kv_rows), config=mp,
            init_method=lambda w: None, bias=cfg.attn_bias, gather_output=False,
        )
        self.dense = tensor_parallel.RowParallelLinear(
            cfg.num_attention_heads * d, cfg.hidden_size, config=mp, init_method=lambda w: None,
            bias=cfg.attn_bias, input_is_parallel=True, skip_bias_add=False,
        )
        h, nq, nkv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads
        s, std_in, std_out = cfg.seed, cfg.input_std(), cfg.output_std()
        q = normal_full((nq * d, h), std_in, s, layer_number, "q_proj")
        k = normal_full((nkv * d, h), std_in, s, layer_number, "k_proj")
        v = normal_full((nkv * d, h), std_in, s, layer_number, "v_proj")
        copy_shard_(self.qkv.weight, sharding.shard_qkv(q, k, v, rank, tp, d), 0)
        o = normal_full((h, nq * d), std_out, s, layer_number, "o_proj")
        copy_shard_(self.dense.weight, sharding.shard_dim(o, rank, tp, 1), 1)
        for bias in (self.qkv.bias, self.dense.bias):
            if bias is not None:
                with torch.no_grad():
                    bias.zero_()

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [b, s, hidden]; doc_ids [b, s] (document of each token of a packed sample) only when
        reset_position_ids / reset_attention_mask are on (doc_mask.py)."""
        b, s, _ = x.shape
        d = self.head_dim
        qkv, _ = self.qkv(x)
        q, k, v = torch.split(qkv, [self.heads * d, self.kv_rows, self.kv_rows], dim=-1)
        if self.kv_group is not None:  # this rank holds a slice of a shared kv head: gather the whole head
            k, v = _GatherSharedKV.apply(torch.stack([k, v]), self.kv_group).unbind(0)
        q = q.view(b, s, self.heads, d).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, d).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, d).transpose(1, 2)
        if doc_ids is not None and self.cfg.reset_position_ids:
            cos, sin = doc_mask.rope_tables(self.rotary, doc_ids, x.dtype)  # positions restart per document
        else:
            cos, sin = self.rotary(s, x.device, x.dtype)
        q, k = self._rope(q, k, cos, sin)
        dropout = self.cfg.attention_dropout if self.training else 0.0
        gqa = self.kv_heads != self.heads
        if doc_ids is not None and self.cfg.reset_attention_mask:
            out = doc_mask.attention(q, k, v, doc_ids, dropout_p=dropout, enable_gqa=gqa,
                                     backend=self.cfg.attention_backend)
        else:
            # enable_gqa lets SDPA broadcast kv heads instead of materialising repeated k/v.
            with kernels.sdpa_context(self.cfg.attention_backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(b, s, self.heads * d)
        out, _ = self.dense(out)
        return out


class SwiGLU(torch.nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused in one column-parallel matmul."""

    def __init__(self, cfg: LlamaConfig, layer_number: int):
        super().__init__()
        rank, tp = tp_rank_size()
        mp = megatron_config(cfg)
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_up = tensor_parallel.ColumnParallelLinear(
            h, 2 * f, config=mp, init_method=lambda w: None, bias=cfg.mlp_bias, gather_output=False
        )
        self.down = tensor_parallel.RowParallelLinear(
            f, h, config=mp, init_method=lambda w: None, bias=cfg.mlp_bias, input_is_parallel=True,
            skip_bias_add=False,
        )
        s, std_in, std_out = cfg.seed, cfg.input_std(), cfg.output_std()
        gate = normal_full((f, h), std_in, s, layer_number, "gate_proj")
        up = normal_full((f, h), std_in, s, layer_number, "up_proj")
        copy_shard_(self.gate_up.weight, sharding.shard_gate_up(gate, up, rank, tp), 0)
        down = normal_full((h, f), std_out, s, layer_number, "down_proj")
        copy_shard_(self.down.weight, sharding.shard_dim(down, rank, tp, 1), 1)
        for bias in (self.gate_up.bias, self.down.bias):
            if bias is not None:
                with torch.no_grad():
                    bias.zero_()
        self._act = kernels.fused(kernels.swiglu, cfg.fuse_pointwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up(x)
        out, _ = self.down(self._act(gate_up))
        return out


class TransformerLayer(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_number: int):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_epsilon, cfg.params_dtype, cfg.fuse_pointwise)
        self.attention = Attention(cfg, layer_number)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_epsilon, cfg.params_dtype,
                                                cfg.fuse_pointwise)
        self.mlp = SwiGLU(cfg, layer_number)
        if cfg.fp8_recipe:  # the four linear layers above; embedding and output layer stay high precision
            fp8.convert_transformer_layer(self, cfg)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.cfg.hidden_dropout, self.training) if self.cfg.hidden_dropout else x

    def forward(self, x: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self._dropout(self.attention(self.input_layernorm(x), doc_ids))
        return x + self._dropout(self.mlp(self.post_attention_layernorm(x)))


class FusedGradVocabParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    """megatron-core's VocabParallelEmbedding whose weight gradient goes into `weight.main_grad` (fp32) instead of
    a vocab-sized bf16 `.grad` (gradient_accumulation_fusion, megatron/grad_accum_fusion.py). The forward is
    megatron-core's without sequence parallelism (which this model does not use): the lookup is the only change."""

    gradient_accumulation_fusion = True  # fused_weights() finds it by this, like the linear layers

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.reduce_scatter_embeddings:
            raise NotImplementedError("gradient_accumulation_fusion with sequence-parallel embeddings")
        if self.tp_group.size() > 1:
            # Tokens outside this rank's vocab slice look up row 0 and are zeroed (their gradient adds 0 there).
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local = (input_ - self.vocab_start_index).masked_fill(outside, 0)
            out = grad_accum_fusion.lookup_accumulating(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            out = grad_accum_fusion.lookup_accumulating(input_, self.weight)
        return tensor_parallel.reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


class Embedding(torch.nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        rank, tp = tp_rank_size()
        embedding = FusedGradVocabParallelEmbedding if cfg.gradient_accumulation_fusion else \
            tensor_parallel.VocabParallelEmbedding
        self.word_embeddings = embedding(
            cfg.padded_vocab_size, cfg.hidden_size, init_method=lambda w: None, config=megatron_config(cfg)
        )
        full = normal_full((cfg.vocab_size, cfg.hidden_size), cfg.input_std(), cfg.seed, -1, "embed_tokens")
        full = sharding.pad_vocab(full, cfg.padded_vocab_size)
        copy_shard_(self.word_embeddings.weight, sharding.shard_dim(full, rank, tp, 0), 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(tokens)


class OutputLayer(torch.nn.Module):
    """Vocab-parallel logits: each TP rank keeps its slice of the vocabulary, never the full 128K row."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        rank, tp = tp_rank_size()
        self.linear = tensor_parallel.ColumnParallelLinear(
            cfg.hidden_size, cfg.padded_vocab_size, config=megatron_config(cfg), init_method=lambda w: None,
            bias=False, gather_output=False,
        )
        full = normal_full((cfg.vocab_size, cfg.hidden_size), cfg.input_std(), cfg.seed, -1, "lm_head")
        full = sharding.pad_vocab(full, cfg.padded_vocab_size)
        copy_shard_(self.linear.weight, sharding.shard_dim(full, rank, tp, 0), 0)
        # Padding rows (added so the vocab divides over TP) must not take probability mass: mask their logits.
        local = cfg.padded_vocab_size // tp
        first_pad = cfg.vocab_size - rank * local
        pad = torch.arange(max(0, first_pad), local) if first_pad < local else None
        self.register_buffer("pad_columns", pad, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.linear(x)
        if self.pad_columns is not None:
            logits = logits.index_fill(-1, self.pad_columns.to(logits.device), torch.finfo(logits.dtype).min)
        return logits


def causal_lm_loss(logits: torch.Tensor, labels, fuse: bool = False) -> torch.Tensor:
    """Cross-entropy summed over positions whose label is not -100 (SFT masks prompts that way), divided by
    the step's divisor when `labels` is (labels, divisor) — training: the per-token loss over the global batch,
    see megatron/data/lm_batches.py — and else by the micro-batch's own count of such positions (evaluation).

    With TP > 1, megatron-core's vocab-parallel cross-entropy reduces over the TP ranks, so the full logits are
    never gathered; with TP 1 on a GPU the logits are whole and a two-pass kernel does the same maths (kernels.py).
    On CPU megatron-core's version is used throughout: eager, the two-pass kernel is 3x slower there.
    """
    divisor = None
    if isinstance(labels, (tuple, list)):
        labels, divisor = labels
    mask = labels.ne(-100)
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    if parallel_state.get_tensor_model_parallel_world_size() == 1 and logits.is_cuda:
        losses = kernels.cross_entropy(logits, safe_labels, fuse)
    else:
        losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), safe_labels)
    mask = mask.to(losses.dtype)
    if divisor is None:
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)
    return (losses * mask).sum() / divisor.to(losses.device, losses.dtype)


def make_loss_fn(cfg: LlamaConfig):
    return functools.partial(causal_lm_loss, fuse=cfg.fuse_pointwise)
