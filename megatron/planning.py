"""Run planning from the config alone: parameters, per-GPU memory by pipeline stage, bubble, FLOPs and time.

A pure model (no GPU, no process group) of how *this* trainer spends memory: DeepSpeed 0.19.8's pipeline engine
and its bf16 optimizer, megatron-core's tensor-parallel layers and vocab-parallel loss, and the layers in
`megatron/model/layers.py`. Every term names the code that allocates it; docs/planning.md explains the model and
tests/test_plan.py checks it (parameter counts against Hugging Face, activations against autograd's saved
tensors, peaks against `benchmarks/results/memory_measurements.json`).

Units: bytes inside, GiB (2**30) in every printed figure.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron import grad_accum_fusion
from megatron.model import doc_mask
from megatron.config.schema import NeoXConfig

GIB = 2**30

# Llama-3's tokenizer, assumed when a config leaves vocab_size to the tokenizer (configs/tiny_cpu.yml does):
# planning should not need to load a tokenizer.
LLAMA3_VOCAB = 128256

# DeepSpeed's engine reduces gradients in buckets of this many elements (MEMORY_OPT_ALLREDUCE_SIZE).
ALLREDUCE_BUCKET = 500_000_000


# ------------------------------------------------------------------------------------------------ hardware
@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory_gib: float  # what the device reports as total memory
    peak_tflops: float  # dense bf16 peak
    per_node: int  # GPUs (GCDs) per node: tensor parallelism stays inside a node


GPUS: dict[str, GPU] = {
    # One MI250X module is two GCDs; each GCD is a separate device with 64 GiB HBM2e and 191.5 dense bf16 TFLOP/s.
    # Frontier nodes hold 4 modules = 8 GCDs (the AstroSage run: 256 nodes x 8 = 2,048 GCDs).
    "mi250x": GPU("mi250x", "AMD MI250X GCD", 64.0, 191.5, 8),
    "a100-80g": GPU("a100-80g", "NVIDIA A100 80GB", 80.0, 312.0, 8),
    # nvidia-smi reports 81,559 MiB for the H100 SXM and 143,771 MiB for the H200.
    "h100": GPU("h100", "NVIDIA H100 80GB SXM", 81559 / 1024, 989.0, 8),
    "h200": GPU("h200", "NVIDIA H200 141GB", 143771 / 1024, 989.0, 8),
}
DEFAULT_GPU = "h100"

# Assumed share of the bf16 peak a GPU sustains while it computes: outside the pipeline bubble, with activation
# recomputation counted as work. Anchors: Megatron-core 54-62% MFU for Llama-3.1 on H100, torchtitan 33-39%; the
# AstroSage run's ~50 TFLOP/s per MI250X GCD end to end (26% MFU) is ~52% while computing once its bubble (30% at
# 16 micro-batches, PP 8), its last stage's extra output layer (x1.045 on the step) and recomputation (x1.33) are
# taken out. 40% is a middle assumption; --tflops or --mfu replaces it.
DEFAULT_MFU = 0.40

# What a device holds beyond PyTorch's caching allocator, and the allocator's own slack. The planner predicts the
# allocated peak (torch.cuda.max_memory_allocated) from the code; to decide whether a layout *fits* it adds
#  - FRAGMENTATION: the caching allocator rounds blocks and keeps freed blocks cached, so it reserves more than
#    the allocated peak. Measured on one H100 for six runs of this trainer: reserved/allocated 1.02-1.09 (the most
#    with the compiled kernels). 10% is assumed.
#  - CONTEXT_GIB: memory outside the allocator: the CUDA context with its kernels, cuBLAS/cuDNN workspaces and
#    NCCL buffers. Measured on the same runs (device used minus reserved): 2.1-2.4 GiB with a one-rank NCCL group.
#    Multi-rank communicators (TP, PP, DP groups) add NCCL buffers of a few MiB per channel and peer, so 3 GiB is
#    assumed. ROCm on MI250X is not measured here; the same figure is used.
# Together they overestimate the measured device memory by 2-9%: a fit verdict errs on the safe side.
CONTEXT_GIB = 3.0
FRAGMENTATION = 0.10


# ------------------------------------------------------------------------------------------------ model shape
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


# ------------------------------------------------------------------------------------------------ layout
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


# ------------------------------------------------------------------------------------------------ memory terms
@dataclass(frozen=True)
class Precision:
    """Number formats, optimizer sharding and the kernel choices that change what autograd keeps."""

    name: str  # "bf16" or "fp32"
    grad_accum: str  # "fp32" or "bf16"
    zero_stage: int
    fused: bool = False  # fuse_pointwise: torch.compile'd RMSNorm/RoPE/SwiGLU (GPU only)
    attention: str = "auto"  # attention_backend, or "flex" for document masking (memory modelled as flash's)
    fused_grads: bool | None = False  # gradient_accumulation_fusion as configured (None: wherever it applies)
    fp8: Optional[str] = None  # the fp8 recipe (megatron/model/fp8.py), None when off

    @property
    def grads_fused(self) -> bool:
        """Whether the matrices' gradients go straight into the fp32 buffer (the trainer's rule)."""
        return grad_accum_fusion.applies(self.fused_grads, self.name, self.grad_accum)

    @property
    def act_bytes(self) -> int:
        return 2 if self.name == "bf16" else 4

    def optimizer(self) -> tuple[str, dict[str, float], bool]:
        """(DeepSpeed wrapper, bytes per local parameter by component with "/dp" entries divided by DP later,
        validated?). Which wrapper DeepSpeed picks is engine._do_optimizer_sanity_check's decision."""
        if self.name == "bf16" and self.grad_accum == "fp32":
            if self.zero_stage == 0:
                return "refused by DeepSpeed (bf16 + fp32 accumulation needs ZeRO stage 1)", {}, False
            # BF16_Optimizer: the bf16 weights are flattened in place; param.grad (bf16) is zeroed, never freed,
            # between micro-batches; each backward adds it into a flat fp32 buffer of the *whole* local model;
            # the fp32 master copy and Adam's m and v exist only for this rank's 1/DP slice.
            return "DeepSpeed BF16_Optimizer (ZeRO-1 sharding)", {
                "weights": 2, "grads": 2 + 4, "master/dp": 4, "adam/dp": 8}, True
        if self.name == "bf16":
            if self.zero_stage == 0:
                # Pipeline + bf16 accumulation also selects BF16_Optimizer, with a bf16 accumulation buffer.
                return "DeepSpeed BF16_Optimizer, bf16 accumulation", {
                    "weights": 2, "grads": 2 + 2, "master/dp": 4, "adam/dp": 8}, False
            # ZeRO-1 optimizer: bf16 grads, fp32 gradient partition, master and Adam partitions.
            return "DeepSpeed ZeRO-1 optimizer, bf16 gradients", {
                "weights": 2, "grads": 2, "grads/dp": 4, "master/dp": 4, "adam/dp": 8}, False
        if self.zero_stage == 0:
            return "torch AdamW (fp32, unsharded)", {"weights": 4, "grads": 4, "adam": 8}, False
        return "DeepSpeed ZeRO-1 optimizer (fp32)", {
            "weights": 4, "grads": 4, "grads/dp": 4, "master/dp": 4, "adam/dp": 8}, False


def precision_of(cfg: NeoXConfig) -> Precision:
    # Unset precision means bf16 on a GPU (schema), which is what a plan is for.
    name = cfg.precision or ("fp32" if cfg.bf16 is not None and not cfg.bf16.enabled else "bf16")
    # getattr: the kernel keys are newer than this module's first version; without them the layers are unfused.
    attention = str(getattr(cfg, "attention_backend", "auto"))
    if cfg.reset_attention_mask and doc_mask.flex_applies(attention, cfg.attention_dropout):
        attention = "flex"  # document masking on a GPU runs compiled FlexAttention
    return Precision(name, cfg.data_types.grad_accum_dtype, cfg.zero_optimization.stage,
                     fused=bool(getattr(cfg, "fuse_pointwise", False)), attention=attention,
                     fused_grads=getattr(cfg, "gradient_accumulation_fusion", False),
                     fp8=cfg.fp8.recipe if getattr(cfg, "fp8", None) else None)


def layer_activation_bytes(shape: Shape, tp: int, micro: int, act: int, fused: bool = False,
                           attention: str = "auto") -> int:
    """Bytes autograd keeps for one transformer layer's backward (megatron/model/layers.py), one micro-batch.

    RMSNorm (x2): the fp32 copy of its input (kept by pow; with fp32 activations it is the input itself), its
      rsqrt, the normalised activations (kept by the weight multiply) and its output (kept by the next matmul).
      Fused (torch.compile), the compiled backward recomputes the pointwise steps: only the input and the rsqrt.
    Attention: the fused qkv output (SDPA keeps v, a view into it), rotated q and k, SDPA's output (flash/cuDNN
      write it [b, s, heads, d], so the reshape for the output projection is a view) and its fp32 logsumexp.
      Flash/cuDNN SDPA keep no seq x seq matrix (the math backend does). When TP exceeds the kv heads the
      gathered k/v replace the qkv output.
    SwiGLU: the fused gate/up output (silu keeps gate, the product keeps up), silu's output and the product;
      fused, silu's output is recomputed.
    Dropout is 0 in Llama (no masks).
    """
    s, h, f = micro * shape.seq, shape.hidden, shape.ffn
    d = shape.head_dim
    q = shape.heads // tp * d
    replicas = max(1, tp // shape.kv_heads)
    kv_heads = shape.kv_heads // tp if shape.kv_heads >= tp else 1
    kv_rows = kv_heads * d // replicas
    norm = s * (2 * act * h + 4) if fused else s * (4 * h + 4 + 2 * act * h)
    kv_source = 2 * kv_heads * d if replicas > 1 else q + 2 * kv_rows  # what SDPA's v is a view of
    attn = act * s * (kv_source + q + kv_heads * d + q) + 4 * s * shape.heads // tp
    if attention == "math":  # the softmax probabilities and the k/v expanded to every query head
        attn += act * micro * (shape.heads // tp) * shape.seq**2 + 2 * act * s * q
    mlp = act * s * (3 if fused else 4) * f // tp
    return 2 * norm + attn + mlp


def selective_kept_bytes(shape: Shape, tp: int, micro: int, act: int, attention: str = "auto") -> int:
    """Bytes a selectively checkpointed layer keeps besides its input (megatron/model/recompute.py): the outputs of
    its matmuls (qkv and gate/up are TP slices; the output projection and down projection are full width, reduced
    over TP in place) and of attention (the output and its fp32 logsumexp; the math backend's two bmm outputs, the
    seq x seq scores among them, instead). Compiled FlexAttention (document masking on a GPU) runs out of the
    policy's sight (torch's checkpoint modes ignore compiled code), so nothing of it is kept: it is recomputed."""
    s, h, f = micro * shape.seq, shape.hidden, shape.ffn
    d = shape.head_dim
    q = shape.heads // tp * d
    replicas = max(1, tp // shape.kv_heads)
    kv_rows = (shape.kv_heads // tp if shape.kv_heads >= tp else 1) * d // replicas
    matmuls = act * s * ((q + 2 * kv_rows) + h + 2 * f // tp + h)
    if attention == "math":
        attn = act * micro * (shape.heads // tp) * shape.seq**2 + act * s * q
    elif attention == "flex":
        attn = 0
    else:
        attn = act * s * q + 4 * s * shape.heads // tp
    return matmuls + attn


def backward_working_bytes(shape: Shape, tp: int, micro: int, act: int, fused_grads: bool = False) -> int:
    """Gradients alive at once inside one layer's backward: the gate/up gradient being assembled (2f/TP wide), the
    gradient of the layer output and of the residual branch, and one bf16 weight gradient before it is added into
    param.grad (the fused gate/up weight is the largest; none with gradient_accumulation_fusion)."""
    s = micro * shape.seq
    weight_grad = 0 if fused_grads else act * 2 * shape.ffn * shape.hidden // tp
    return act * s * (2 * shape.ffn // tp + 2 * shape.hidden) + weight_grad


# ---- FP8 (megatron/model/fp8.py): PREDICTIONS, not yet measured on a GPU (docs/fp8.md says how to measure) ----
# Time. FP8 changes only the transformer layers' linear GEMMs. Measured here at bf16 (docs/performance.md, H100
# profile of the default run at the 8B width): matmuls are 74% of the step, at the bf16 GEMM peak. The FP8 tensor
# cores have twice the bf16 peak, but torchao adds the scaling casts (amax, scale, cast, and a transposed copy per
# operand: memory-bound passes over every GEMM input and gradient), so the layer GEMMs *with their casts* are
# assumed to take 1/1.6 (tensorwise) and 1/1.25 (rowwise: CUTLASS rowwise kernels, slower than cuBLAS tensorwise)
# of their bf16 time. Anchors: torchao/torchtitan report +25% (tensorwise) and +10% (rowwise) tokens/s for
# Llama-3-8B on H100, where the layer GEMMs are a larger share of the step than in our few-layer benchmark shapes.
FP8_MATMUL_SHARE = 0.74
FP8_GEMM_SPEEDUP = {"tensorwise": 1.6, "rowwise": 1.25}


def fp8_time_factor(shape: Shape, recipe: Optional[str]) -> float:
    """Step compute time with FP8 over bf16 (a prediction): the layer GEMMs' share of the matmul FLOPs (6 N_layers
    of 6 N + 12 L h s: the output layer and attention's score/value products stay bf16) speeds up by
    FP8_GEMM_SPEEDUP; the rest of the step (the other matmuls, attention, pointwise, optimizer) does not."""
    if not recipe:
        return 1.0
    layer_gemms = 6 * shape.layers * (shape.attn_params() + shape.mlp_params())
    share = FP8_MATMUL_SHARE * layer_gemms / flops_per_token(shape)
    return 1 - share + share / FP8_GEMM_SPEEDUP[recipe]


def fp8_working_bytes(shape: Shape, tp: int, micro: int) -> int:
    """Transient FP8 copies at the worst GEMM (a prediction): the gate/up weight-gradient step casts the output
    gradient [tokens, 2f/TP] and the input [tokens, h] to one byte each, in the row- and the column-major layout
    the two backward GEMMs read, and the weight [2f/TP, h] likewise. What autograd keeps between forward and
    backward does not grow: torchao's FP8 linear saves its high-precision input, which the bf16 path keeps too
    (at TP > 1 the row-parallel inputs are kept in FP8 instead, which the model ignores: a small overestimate)."""
    s, h, f2 = micro * shape.seq, shape.hidden, 2 * shape.ffn // tp
    return 2 * (s * f2 + s * h + f2 * h)


def loss_peak_bytes(shape: Shape, tp: int, micro: int, act: int, fused: bool = False,
                    fused_grads: bool = False) -> int:
    """The last stage around the loss (causal_lm_loss; this rank's V/TP slice of the logits). Throughout, the
    logits stay in DeepSpeed's pipe_buffers['outputs'] until the backward is done; the worst moment is one of:
    - TP > 1, megatron-core's vocab-parallel cross-entropy: its softmax is computed in place in the fp32 copy the
      loss makes of the logits, kept for backward and turned into the gradient in place, then cast back to the
      logits' dtype: 2+4+2 bytes per logit in bf16 (4+4 in fp32, where the 'copy' is the logits themselves);
    - TP 1, kernels.cross_entropy: compiled (fuse_pointwise), it reads the logits and writes their gradient, so no
      fp32 logits exist; eager, its backward holds the fp32 logits, exp(x - lse), the one-hot mask (1 byte), its
      float copy and their difference at once: 17 bytes per logit besides the logits (13 in fp32);
    - then the output layer's backward: the logits, their gradient and its bf16 weight gradient (none with
      gradient_accumulation_fusion: it goes into the fp32 buffer)."""
    logits = micro * shape.seq * shape.padded_vocab(tp) // tp
    weight = 0 if fused_grads else shape.padded_vocab(tp) * shape.hidden // tp
    output_backward = 2 * act * logits + act * weight
    if tp > 1:
        return max(8 * logits, output_backward)
    if fused:
        return output_backward
    return max((act + (4 if act == 2 else 0) + 13) * logits, output_backward)


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class StageMemory:
    stage: int
    items: list[str]
    params: int  # this rank's parameters
    weights: float
    grads: float  # bf16 param.grad + fp32 accumulation buffer (bf16 path)
    master: float  # fp32 master slice
    optimizer: float  # Adam m, v slice
    act_stored: float  # activations kept per in-flight micro-batch (incl. pipeline buffers)
    act_no_ckpt: float  # the same without checkpointing (for comparison)
    act_ckpt: float  # the same with checkpointing every layer, partitioned as configured (for comparison)
    in_flight: int
    transient: float  # working memory on top of the stored activations at the worst moment
    peak: float  # predicted allocated peak (torch.cuda.max_memory_allocated)
    peak_phase: str

    @property
    def layers(self) -> int:
        return self.items.count("layer")

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.master + self.optimizer

    @property
    def device(self) -> float:
        return device_bytes(self.peak)

    def label(self) -> str:
        parts = [f"{self.layers} layers"]
        if "embedding" in self.items:
            parts.append("embedding")
        if "output" in self.items:
            parts.append("norm + output + loss")
        return " + ".join(parts)


def device_bytes(allocated_peak: float) -> float:
    return allocated_peak * (1 + FRAGMENTATION) + CONTEXT_GIB * GIB


@dataclass
class Plan:
    shape: Shape
    layout: Layout
    gpus: int  # the world size asked for (layout.gpus differs when TP x PP does not divide it: a problem)
    gpu: GPU
    precision: Precision
    optimizer_name: str
    validated_path: bool
    params: int
    stages: list[StageMemory]
    flops_per_token: float
    tflops: float  # assumed TFLOP/s a GPU computes at (all its work, recomputation included), bubble excluded
    train_iters: Optional[int]
    train_epochs: Optional[float]
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the layout is illegal for this model (config rules)

    # ---- memory ----
    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.peak)

    @property
    def peak_gib(self) -> float:
        return self.worst.peak / GIB

    @property
    def device_gib(self) -> float:
        return self.worst.device / GIB

    @property
    def fits(self) -> bool:
        return not self.problems and self.device_gib <= self.gpu.memory_gib

    # ---- time ----
    @property
    def bubble(self) -> float:
        return (self.layout.pp - 1) / (self.layout.gas + self.layout.pp - 1)

    @property
    def tokens_per_step(self) -> int:
        return self.layout.global_batch * self.shape.seq

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    def _layer_recompute_flops(self) -> float:
        """FLOPs per token one transformer layer's recomputation adds: full checkpointing runs its forward again
        (2 N_layer + 4 h s); selective replays only pointwise ops, and compiled FlexAttention (not kept)."""
        if not self.layout.checkpoint:
            return 0.0
        sh = self.shape
        attention_forward = 4 * sh.hidden * sh.seq
        if self.layout.selective:
            return attention_forward if self.precision.attention == "flex" else 0.0
        return 2 * (sh.attn_params() + sh.mlp_params()) + attention_forward

    @property
    def recompute_factor(self) -> float:
        """GPU work per model FLOP: with checkpointing each transformer layer's forward runs twice, i.e. a third
        of the layers' 6N + 12Lhs again (the output layer is not recomputed)."""
        return 1 + self.shape.layers * self._layer_recompute_flops() / self.flops_per_token

    def stage_flops_per_token(self) -> list[float]:
        """GPU work of each pipeline stage per trained token (all its TP ranks together, recomputation included):
        its transformer layers' share of 6N + 12Lhs and, on the last stage, the output layer's 6·V·h. The
        embedding is a lookup and the norms are not counted (megatron/metrics.py's convention). Sums to
        flops_per_token x recompute_factor."""
        sh = self.shape
        layer = 6 * (sh.attn_params() + sh.mlp_params()) + 12 * sh.hidden * sh.seq + self._layer_recompute_flops()
        output = 6 * sh.vocab * sh.hidden
        return [st.layers * layer + (output if "output" in st.items else 0) for st in self.stages]

    @property
    def stage_seconds(self) -> list[float]:
        """Forward plus backward time of one micro-batch on each stage, at the assumed TFLOP/s per GPU."""
        tokens = self.layout.micro * self.shape.seq
        return [w * tokens * self.fp8_time_factor / (self.layout.tp * self.tflops * 1e12)
                for w in self.stage_flops_per_token()]

    @property
    def imbalance(self) -> float:
        """The slowest stage's work over the average stage's (1.0 for a balanced pipeline)."""
        t = self.stage_seconds
        return max(t) / (sum(t) / len(t))

    @property
    def fp8_time_factor(self) -> float:
        """Compute time with FP8 over compute time without (1.0 when off): fp8_time_factor() below, a prediction."""
        return fp8_time_factor(self.shape, self.precision.fp8)

    @property
    def compute_seconds(self) -> float:
        return (self.flops_per_step * self.recompute_factor * self.fp8_time_factor
                / (self.layout.gpus * self.tflops * 1e12))

    @property
    def step_seconds(self) -> float:
        """DeepSpeed's 1F1B schedule, its stages coupled by blocking sends and receives: the first micro-batch
        passes every stage forward and back once, and the slowest stage paces the other GAS - 1. Exact when the
        slowest stage is the last (the output layer's: the usual case), an upper bound otherwise; for balanced
        stages it is compute / (1 - bubble). tests/test_plan.py checks it against DeepSpeed's TrainSchedule."""
        t = self.stage_seconds
        return sum(t) + (self.layout.gas - 1) * max(t)

    @property
    def end_to_end_tflops(self) -> float:
        """What the trainer would print: model FLOPs (6N + 12Lhs) over wall time, recompute and bubble included."""
        return self.flops_per_step / self.step_seconds / self.layout.gpus / 1e12

    @property
    def run_seconds(self) -> Optional[float]:
        return self.train_iters * self.step_seconds if self.train_iters else None


def plan_memory(shape: Shape, layout: Layout, precision: Precision, partition_method: str = "type:transformer"
                ) -> tuple[str, bool, list[StageMemory]]:
    tp, pp, dp, b = layout.tp, layout.pp, layout.dp, layout.micro
    act = precision.act_bytes
    optimizer_name, per_param, validated = precision.optimizer()
    sbh = b * shape.seq * shape.hidden
    vp = shape.padded_vocab(tp)
    a_layer = layer_activation_bytes(shape, tp, b, act, precision.fused, precision.attention)
    kept_selective = selective_kept_bytes(shape, tp, b, act, precision.attention)
    fused_grads = precision.grads_fused
    work = backward_working_bytes(shape, tp, b, act, fused_grads)
    if precision.fp8:
        work += fp8_working_bytes(shape, tp, b)
    # DeepSpeed's pipeline config defaults pipe_partitioned/grad_partitioned to true: with TP > 1 a stage keeps
    # only its TP slice of the output it sent (engine._exec_forward_pass).
    pipe_partitioned = tp > 1
    local = {"embedding": vp * shape.hidden // tp, "output": vp * shape.hidden // tp, "final_norm": shape.hidden,
             "layer": (shape.attn_params() + shape.mlp_params()) // tp + 2 * shape.hidden}
    stages = []
    for i, items in enumerate(stage_items(shape, tp, pp, partition_method)):
        params = sum(local[it] for it in items)
        per = {k: v * params / (dp if k.endswith("/dp") else 1) for k, v in per_param.items()}
        weights = per.get("weights", 0.0)
        grads = per.get("grads", 0.0) + per.get("grads/dp", 0.0)
        # Fused, the matrices (embedding and output layer included) never get a bf16 param.grad: only the fp32
        # buffer. The norms' vectors keep theirs.
        vectors = 2 * shape.hidden * items.count("layer") + shape.hidden * items.count("final_norm")
        if fused_grads:
            grads -= 2 * (params - vectors)
        master = per.get("master/dp", 0.0)
        adam = per.get("adam/dp", 0.0) + per.get("adam", 0.0)
        first, last = i == 0, i == pp - 1

        def stored(checkpoint: bool, k: int) -> float:
            """Bytes one in-flight micro-batch keeps on this stage until its backward."""
            total = 0.0
            # DeepSpeed checkpoints a chunk of k consecutive specs only if all are transformer layers.
            for c in range(0, len(items), k if checkpoint else 1):
                chunk = items[c:c + (k if checkpoint else 1)]
                n_layers = chunk.count("layer")
                if checkpoint and n_layers == len(chunk):
                    total += act * sbh // (tp if (layout.partition and tp > 1) else 1)  # the chunk's input
                    if layout.selective:
                        total += n_layers * kept_selective
                else:
                    total += n_layers * a_layer
            if "embedding" in items:
                total += 16 * b * shape.seq  # token ids (and their TP mask) kept by the embedding lookup
            if "final_norm" in items:
                total += b * shape.seq * (2 * act * shape.hidden + 4 if precision.fused
                                          else 4 * shape.hidden + 4 + 2 * act * shape.hidden)
            if not last:
                # the stage output kept for backward (only this rank's TP slice when pipe-partitioned)
                total += act * sbh // (tp if pipe_partitioned else 1)
            return total

        per_mb = stored(layout.checkpoint, layout.checkpoint_layers)
        in_flight = min(pp - i, layout.gas)  # DeepSpeed TrainSchedule: 1F1B, stage i runs PP-i forwards ahead
        # DeepSpeed keeps max(2, in-flight) pipe buffers per stage and never clears a buffer's input after the
        # backward (nor, on the last stage, its output: the logits), so each buffer holds its last tensors until
        # the next micro-batch overwrites them.
        buffers = max(2, in_flight) if layout.gas > 1 else 1
        logits = act * b * shape.seq * vp // tp if last else 0  # one micro-batch's, this rank's V/TP slice
        held = (0 if first else buffers * act * sbh) + (logits if buffers > 1 else 0)
        # The last stage's _exec_backward_pass returns before it clears pipe_buffers['outputs']: the current
        # micro-batch's logits stay alive through its whole backward and the fp32 accumulation after it (the
        # loss term below counts them itself).
        # During the backward of the oldest micro-batch: its recomputed chunk (checkpointing) and the gradients
        # in flight; on the last stage first the loss; on the first stage the embedding's weight gradient.
        current = work + (layout.checkpoint_layers * a_layer if layout.checkpoint else 0) + logits
        phase = "backward of a layer" + (" (recomputed)" if layout.checkpoint else "")
        loss = loss_peak_bytes(shape, tp, b, act, precision.fused, fused_grads)
        if last and loss > current:
            current, phase = loss, "loss backward (logits)"
        if first:  # the embedding's weight gradient: vocab-sized in bf16, or fused the fp32 rows it scatters
            current = max(current, 4 * b * shape.seq * shape.hidden if fused_grads else act * local["embedding"])
        p2p = (act * sbh if not first else 0) + (act * sbh if not last else 0)  # recv buffers (activation, grad)
        states = weights + grads + master + adam
        backward_peak = states + in_flight * per_mb + held + current + p2p
        reduce_peak = states + allreduce_bytes(params - vectors, vectors, precision)
        # After each micro-batch's backward the bf16 optimizer adds param.grad into the fp32 buffer one parameter
        # at a time through an fp32 copy (BF16_Optimizer._update_hp_grad), while the other in-flight micro-batches
        # still hold their activations.
        largest = max(local[it] if it != "layer" else 2 * shape.ffn * shape.hidden // tp for it in items)
        if fused_grads:  # only the norms' vectors take that path
            largest = shape.hidden
        accumulate_peak = states + (in_flight - 1) * per_mb + held + logits + 4 * largest
        peak, peak_phase = max((backward_peak, phase), (reduce_peak, "gradient all-reduce"),
                               (accumulate_peak, "fp32 gradient accumulation"))
        stages.append(StageMemory(
            stage=i, items=items, params=params, weights=weights, grads=grads, master=master, optimizer=adam,
            act_stored=in_flight * per_mb + held, act_no_ckpt=in_flight * stored(False, 1) + held,
            act_ckpt=in_flight * stored(True, 1) + held, in_flight=in_flight,
            transient=current + p2p, peak=peak, peak_phase=peak_phase))
    return optimizer_name, validated, stages


def allreduce_bytes(matrices: int, vectors: int, precision: Precision) -> int:
    """What DeepSpeed's data-parallel all-reduce of the gradients allocates after the last backward
    (PipelineEngine._bf16_reduce_grads -> buffered_allreduce_fallback -> allreduce_no_retain -> allreduce_bucket).

    BF16_Optimizer hands over one flat fp32 gradient buffer per parameter group (the trainer's two: matrices,
    then the norms' vectors). allreduce_no_retain adds buffers to a bucket until it holds more than
    ALLREDUCE_BUCKET elements; allreduce_bucket flattens it (a bucket of one tensor flattens to a view of it,
    two are concatenated into a new tensor) and casts to communication_data_type only if that differs, which the
    trainer sets to the accumulation dtype (megatron/config/deepspeed_config.py): no cast. So the matrices alone
    fill a bucket (no copy) when they exceed it; otherwise both buffers are copied into one. Other precision
    paths reduce inside the ZeRO optimizer (not modelled: 0)."""
    if precision.name != "bf16" or precision.grad_accum != "fp32":
        return 0
    if matrices > ALLREDUCE_BUCKET or not (matrices and vectors):
        return 0
    return 4 * (matrices + vectors)


def layout_problems(cfg: NeoXConfig, layout: Layout) -> list[str]:
    """The config's own cross-field rules (megatron/config/validate.py) applied to a candidate layout."""
    from megatron.config.validate import check_cross_field

    trial = cfg.model_copy(update={
        "model_parallel_size": layout.tp, "pipe_parallel_size": layout.pp, "num_gpus": layout.gpus, "num_nodes": 1,
        "hostfile": None, "train_micro_batch_size_per_gpu": layout.micro,
        "gradient_accumulation_steps": layout.gas, "train_batch_size": None,
        "checkpoint_activations": layout.checkpoint, "checkpoint_num_layers": layout.checkpoint_layers,
        "partition_activations": layout.partition,
        "recompute_granularity": "selective" if layout.selective else "full"})
    layout_keys = {"model_parallel_size", "pipe_parallel_size", "train_batch_size", "partition_activations"}
    return [f"{i.key}: {i.message}" for i in check_cross_field(trial)
            if set(i.key.split(",")) & layout_keys]


def make_plan(cfg: NeoXConfig, gpus: Optional[int] = None, gpu: str = DEFAULT_GPU, tflops: Optional[float] = None,
              layout: Optional[Layout] = None) -> Plan:
    """Plan `cfg` on `gpus` devices of kind `gpu` (default: the config's own world size and layout, or the
    layout's GPUs when one is given) at `tflops` per GPU while computing (default DEFAULT_MFU of the peak)."""
    shape = shape_of(cfg)
    spec = GPUS[gpu]
    if gpus is None:
        gpus = layout.gpus if layout is not None else config_world_size(cfg)
    _require_positive(gpus=gpus, tflops=tflops)
    if layout is None:
        layout = layout_of(cfg, gpus)
    precision = precision_of(cfg)
    optimizer_name, validated, stages = plan_memory(shape, layout, precision, cfg.pipe_partition_method)
    plan = Plan(shape=shape, layout=layout, gpus=gpus, gpu=spec, precision=precision, optimizer_name=optimizer_name,
                validated_path=validated, params=shape.parameter_count(), stages=stages,
                flops_per_token=flops_per_token(shape),
                tflops=DEFAULT_MFU * spec.peak_tflops if tflops is None else tflops,
                train_iters=cfg.train_iters, train_epochs=cfg.train_epochs)
    if layout.gpus != gpus:
        # Planned anyway (as DP 1 when TP x PP exceeds the GPUs), so the memory of the layout is still shown.
        mp = layout.tp * layout.pp
        plan.problems.append(f"{gpus:,} GPUs is not a multiple of TP x PP = {mp}: memory and time are shown for "
                             f"DP {layout.dp} = {layout.gpus:,} GPUs; use a multiple of {mp} GPUs or a smaller TP x PP")
    plan.problems += layout_problems(cfg, layout)
    if not optimizer_name.startswith("DeepSpeed") and not optimizer_name.startswith("torch"):
        plan.problems.append(f"optimizer: {optimizer_name}")
    if layout.tp > spec.per_node:
        plan.notes.append(f"TP {layout.tp} spans nodes ({spec.per_node} GPUs per node): its all-reduces leave NVLink")
    if getattr(cfg, "reset_attention_mask", False):
        plan.notes.append("reset_attention_mask: the document-masked attention's memory is modelled as plain causal "
                          "attention (flash/cuDNN); a kernel that builds a dense mask would add seq x seq terms")
    if precision.fp8:
        extra = fp8_working_bytes(shape, layout.tp, layout.micro) / GIB
        plan.notes.append(f"fp8 {precision.fp8}: compute time x{plan.fp8_time_factor:.2f} and {extra:.2f} GiB of "
                          "FP8 working copies are PREDICTIONS (planning.fp8_time_factor), not yet measured on a GPU "
                          "(docs/fp8.md)")
    if cfg.vocab_size is None:
        plan.notes.append(f"vocab_size not set: assumed the Llama-3 tokenizer's {LLAMA3_VOCAB:,}")
    if not validated:
        plan.notes.append("memory for this precision/optimizer path is modelled but not validated against a GPU run")
    return plan


def _require_positive(**values: Optional[float]) -> None:
    """Refuse zero and negative counts and rates (None means "the default"): a 0 would otherwise divide by zero or
    plan a layout nobody asked for."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, not {value}")


def configured_global_batch(cfg: NeoXConfig) -> int:
    if cfg.train_batch_size:
        return cfg.train_batch_size
    world = config_world_size(cfg)
    return cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * max(1, world // (cfg.tp * cfg.pp))


def alternative_layout(cfg: NeoXConfig, gpus: Optional[int] = None, tp: Optional[int] = None,
                       pp: Optional[int] = None, micro: Optional[int] = None, checkpoint: Optional[bool] = None
                       ) -> tuple[Layout, list[str]]:
    """The configured layout with some knobs changed. The global batch is a training hyperparameter, so it is
    kept: gradient accumulation absorbs a change of DP or micro-batch when it can (else it is kept and the
    global batch changes, with a note)."""
    _require_positive(gpus=gpus, tp=tp, pp=pp, micro=micro)
    gpus = config_world_size(cfg) if gpus is None else gpus
    tp = cfg.tp if tp is None else tp
    pp = cfg.pp if pp is None else pp
    micro = cfg.train_micro_batch_size_per_gpu if micro is None else micro
    checkpoint = cfg.checkpoint_activations if checkpoint is None else checkpoint
    dp = max(1, gpus // (tp * pp))
    batch, notes = configured_global_batch(cfg), []
    if batch % (micro * dp) == 0:
        gas = batch // (micro * dp)
    else:
        gas = cfg.gradient_accumulation_steps
        notes.append(f"global batch {batch} is not a multiple of micro-batch x DP = {micro} x {dp}: kept "
                     f"{gas} accumulation steps (global batch {micro * gas * dp})")
    partition = cfg.partition_activations and checkpoint and tp > 1
    layout = Layout(tp=tp, pp=pp, dp=dp, micro=micro, gas=gas, checkpoint=checkpoint,
                    checkpoint_layers=cfg.checkpoint_num_layers, partition=partition,
                    selective=_selective(cfg, checkpoint) and not partition)
    return layout, notes


def predict_peak_gib(config_dict: dict[str, Any], world_size: int, what: str = "allocated") -> float:
    """Predicted peak GPU memory (GiB) of the worst rank for a config given as YAML keys.

    what="allocated" is what torch.cuda.max_memory_allocated() reports (megatron.metrics.peak_memory_gib, the
    trainer's `mem` column); "reserved" adds the caching allocator's slack; "device" also the context and
    communicator buffers (what nvidia-smi would show). Run-only keys (data, train_iters) may be left out.
    """
    plan = make_plan(config_from_keys(config_dict), gpus=world_size)
    peak = plan.worst.peak
    if what == "allocated":
        return peak / GIB
    if what == "reserved":
        return peak * (1 + FRAGMENTATION) / GIB
    if what == "device":
        return device_bytes(peak) / GIB
    raise ValueError(f"what must be allocated, reserved or device, not {what!r}")


# ------------------------------------------------------------------------------------- measurement records
# GPU peaks measured by tools/plan.py --measure and benchmarks/train_throughput.py; tests/test_plan.py holds the
# planner to them.
MEMORY_RECORDS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "memory_measurements.json"


def append_memory_records(records: list[dict[str, Any]], path: Path | str = MEMORY_RECORDS) -> None:
    path = Path(path)
    existing = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(existing + records, indent=1) + "\n")


def code_version() -> str:
    """The commit the measured code is at (a record is only evidence for the model code it ran): $GIT_COMMIT if
    set (copies of the tree, such as the GPU machine's, may carry a stale .git), else git's answer."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=MEMORY_RECORDS.parents[2],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def recorded_keys(cfg: NeoXConfig) -> dict[str, Any]:
    """The config keys that decide memory (model, layout, batch, precision, kernels), all explicit, so a memory
    measurement recorded with them stays meaningful if a default changes (benchmarks/results/)."""
    from megatron.config import schema

    keys = [k for sec in (schema.ModelArgs, schema.ParallelArgs, schema.TrainingArgs, schema.KernelArgs, schema.Fp8Args)
            for k in sec.model_fields]
    dumped = cfg.model_dump(mode="json")
    return {k: dumped[k] for k in keys if dumped.get(k) is not None}


def config_from_keys(config_dict: dict[str, Any]) -> NeoXConfig:
    """A NeoXConfig from YAML-style keys (aliases normalised, keys the schema does not know dropped), unvalidated
    beyond the schema's types: what the planner needs from a recorded or generated config."""
    from megatron.config.loader import _normalise

    raw = {k: v for k, v in _normalise(dict(config_dict)).items() if k in NeoXConfig.model_fields}
    return NeoXConfig(**raw)


# ------------------------------------------------------------------------------------------------ loading
PLACEHOLDER_DATA = "(not needed for planning)"


@dataclass
class Loaded:
    config: NeoXConfig
    overrides: list[str]  # the loader's "key: a (f1) -> b (f2)" lines
    placeholders: list[str]  # run-only keys the files leave unset, filled in only to pass validation


def load_for_planning(paths: list[str]) -> Loaded:
    """Merge and validate the YAML files with megatron.config.loader.load_config, as deepy.py does. A model preset
    (configs/llama3.1-*.yml) leaves train_iters and the data to a run file; those are filled with placeholders
    (reported, and never used: no data is read and no run time is computed from a placeholder). Raises
    ConfigError for everything else, as deepy.py would refuse it."""
    from megatron.config.loader import load_config, read_yaml_files

    raw = read_yaml_files(paths)[0]  # only to see which keys are absent; load_config reports file problems
    extra: dict[str, Any] = {}
    if "train_iters" not in raw and "train_epochs" not in raw:
        extra["train_iters"] = 1
    if not raw.get("data_path") and not raw.get("train_data_paths"):
        extra["data_path"] = PLACEHOLDER_DATA
    # The plan is for the cluster the config describes, not for this machine: no available-device count.
    loaded = load_config(paths, extra=extra or None)
    cfg = loaded.config
    if "train_iters" in extra:
        cfg = cfg.model_copy(update={"train_iters": None})
    return Loaded(config=cfg, overrides=loaded.overrides, placeholders=sorted(extra))


def config_world_size(cfg: NeoXConfig) -> int:
    """GPUs the config asks for, as DeepSpeed's runner counts them (megatron/config/validate.py), else 1."""
    from megatron.config.validate import launch_world_size

    try:
        return launch_world_size(cfg) or 1
    except ValueError:  # a malformed hostfile: the launcher refuses it and names it
        return 1


# ------------------------------------------------------------------------------------------------ search
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


# ------------------------------------------------------------------------------------------------ report
def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _stage_groups(stages: list[StageMemory]) -> list[tuple[str, StageMemory]]:
    """Consecutive stages with the same content and in-flight count but different peaks are still shown apart;
    identical middle stages collapse to one row (e.g. '1-6')."""
    rows: list[tuple[list[int], StageMemory]] = []
    for st in stages:
        if rows and rows[-1][1].items == st.items and abs(rows[-1][1].peak - st.peak) < 0.05 * GIB \
                and 0 < st.stage < len(stages) - 1 and 0 < rows[-1][0][-1]:
            rows[-1][0].append(st.stage)
        else:
            rows.append(([st.stage], st))
    return [(f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}-{ids[-1]}", st) for ids, st in rows]


def _step_lines(plan: Plan) -> list[str]:
    """The step time as the balanced-pipeline formula, stretched by the stages' imbalance when PP > 1."""
    lay = plan.layout
    fp8 = f" x {plan.fp8_time_factor:.2f} (fp8, predicted)" if plan.precision.fp8 else ""
    balanced = (f"FLOPs/step x {plan.recompute_factor:.2f}{fp8} / ({lay.gpus:,} GPUs x {plan.tflops:.1f} TFLOP/s) / "
                "(1 - bubble)")
    if lay.pp == 1:
        return [f"  step        {balanced} = {_duration(plan.step_seconds)}"]
    t = plan.stage_seconds
    slowest = plan.stages[t.index(max(t))]
    stretch = plan.step_seconds / (plan.compute_seconds / (1 - plan.bubble))
    return [f"  stages      the slowest, stage {slowest.stage} ({slowest.label()}), does x{plan.imbalance:.3f} the "
            f"average stage's work",
            f"  step        {balanced} x {stretch:.3f} = {_duration(plan.step_seconds)}",
            f"              (1F1B: each stage's micro-batch time once, then GAS-1 = {lay.gas - 1} of the slowest's)"]


def format_plan(plan: Plan, title: str = "") -> str:
    sh, lay, gpu = plan.shape, plan.layout, plan.gpu
    lines = []
    if title:
        lines.append(f"Plan for {title}")
    lines += [
        f"  model       Llama-3.1 shape: {sh.layers} layers, hidden {sh.hidden}, {sh.heads} heads ({sh.kv_heads} kv), "
        f"MLP {sh.ffn}, vocab {sh.vocab:,} (padded to {sh.padded_vocab(lay.tp):,} for TP {lay.tp}), seq {sh.seq:,}",
        f"  parameters  {plan.params:,} ({plan.params / 1e9:.2f}B; embedding and output {sh.vocab * sh.hidden:,} each)",
        f"  GPUs        {plan.gpus:,} x {gpu.name} ({gpu.memory_gib:.0f} GiB, {gpu.peak_tflops:g} bf16 TFLOP/s peak)",
        f"  layout      {lay.describe()}",
        f"  batch       global {lay.global_batch:,} sequences = {plan.tokens_per_step:,} tokens per step",
        f"  precision   {plan.precision.name}, gradient accumulation in {plan.precision.grad_accum}"
        f"{' (fused into the weight-gradient GEMMs)' if plan.precision.grads_fused else ''}, "
        f"ZeRO stage {plan.precision.zero_stage}: {plan.optimizer_name}",
        "",
        "Memory per GPU (GiB), by pipeline stage; activations are what the stage's in-flight micro-batches keep",
        f"  {'stage':<6} {'holds':<36} {'params':>8} {'weights':>7} {'grads':>6} {'master':>6} {'Adam':>6} "
        f"{'in-flt':>6} {'acts':>6} {'no-ckpt':>7} {'ckpt':>6} {'work':>6} {'peak':>6} {'device':>6}",
    ]
    for ids, st in _stage_groups(plan.stages):
        lines.append(
            f"  {ids:<6} {st.label():<36} {st.params / 1e9:>7.2f}B {_gib(st.weights):>7} {_gib(st.grads):>6} "
            f"{_gib(st.master):>6} {_gib(st.optimizer):>6} {st.in_flight:>6} {_gib(st.act_stored):>6} "
            f"{_gib(st.act_no_ckpt):>7} {_gib(st.act_ckpt):>6} {_gib(st.transient):>6} {_gib(st.peak):>6} "
            f"{_gib(st.device):>6}")
    w = plan.worst
    lines += [
        "  grads = bf16 param.grad + fp32 accumulation buffer (whole local model; gradient_accumulation_fusion",
        "  leaves only the norms a bf16 param.grad); master and Adam are this rank's",
        "  1/DP slice (ZeRO-1). acts = activations the in-flight micro-batches keep (1F1B: stage i has up to PP-i)",
        "  and DeepSpeed's pipe buffers; no-ckpt / ckpt = the same without / with activation checkpointing.",
        "  work = at the worst moment: a recomputed layer and the gradients in flight (the last stage also holds",
        "  the current micro-batch's logits until its backward is done), or the loss.",
        "  peak = weights + grads + master + Adam + acts + work (or, if larger, the moment of the gradient",
        "  all-reduce): what torch.cuda.max_memory_allocated reports;",
        f"  device = peak x {1 + FRAGMENTATION:.2f} (allocator) + {CONTEXT_GIB:g} GiB (context, NCCL, workspaces).",
        "",
    ]
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"Verdict: {verdict} - worst stage {w.stage} ({w.peak_phase}) needs {plan.device_gib:.1f} GiB of "
                 f"{gpu.memory_gib:.0f} GiB ({100 * plan.device_gib / gpu.memory_gib:.0f}%; allocated peak "
                 f"{plan.peak_gib:.1f} GiB)")
    for p in plan.problems:
        lines.append(f"  layout problem: {p}")
    for n in plan.notes:
        lines.append(f"  note: {n}")
    lines += [
        "",
        "Time",
        f"  FLOPs       {plan.flops_per_token / 1e9:,.1f} GFLOP per token (6N + 12Lhs, megatron/metrics.py) x "
        f"{plan.tokens_per_step:,} tokens = {plan.flops_per_step:.3e} per step",
        f"  bubble      (PP-1)/(GAS+PP-1) = {lay.pp - 1}/{lay.gas + lay.pp - 1} = {100 * plan.bubble:.1f}% of each step",
        f"  recompute   x{plan.recompute_factor:.2f} GPU work per model FLOP"
        + (" (selective checkpointing replays pointwise ops and FlexAttention)" if lay.selective
           and plan.precision.attention == "flex"
           else " (selective checkpointing replays only pointwise ops)" if lay.selective
           else " (checkpointing repeats each layer's forward)" if lay.checkpoint else " (no checkpointing)"),
        f"  assumed     {plan.tflops:.1f} TFLOP/s per GPU while computing ({100 * plan.tflops / gpu.peak_tflops:.0f}% "
        f"of peak)",
        *_step_lines(plan),
        f"  printed     the trainer would report {plan.end_to_end_tflops:.1f} TFLOP/s per GPU "
        f"({100 * plan.end_to_end_tflops / gpu.peak_tflops:.0f}% MFU; 6N + 12Lhs over wall time)",
    ]
    if plan.run_seconds is not None:
        derived = " (train_iters derived from train_epochs)" if plan.train_epochs else ""
        gpu_hours = plan.run_seconds * lay.gpus / 3600
        lines.append(f"  run         {plan.train_iters:,} steps{derived} x {_duration(plan.step_seconds)} = "
                     f"{_duration(plan.run_seconds)} ({gpu_hours:,.0f} GPU-hours)")
    elif plan.train_epochs:
        lines.append(f"  run         train_epochs {plan.train_epochs:g}: train_iters is derived from the corpus size "
                     f"at launch; run time = that x {_duration(plan.step_seconds)}")
    else:
        lines.append("  run         train_iters not set: no run time")
    return "\n".join(lines)
