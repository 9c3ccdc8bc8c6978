"""Per-GPU memory by pipeline stage: the weights, gradients and optimizer states of each precision path, what
autograd keeps per layer and micro-batch, the working memory of the backward and the loss, and DeepSpeed's pipe
and all-reduce buffers. Every term names the code that allocates it (docs/planning.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron import grad_accum_fusion
from megatron.config.schema import NeoXConfig
from megatron.model import doc_mask
from megatron.planning.hardware import device_bytes
from megatron.planning.layout import Layout, stage_items
from megatron.planning.shape import Shape

# DeepSpeed's engine reduces gradients in buckets of this many elements (MEMORY_OPT_ALLREDUCE_SIZE).
ALLREDUCE_BUCKET = 500_000_000


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


# FP8 (megatron/model/fp8.py): a PREDICTION, not yet measured on a GPU (docs/fp8.md says how to measure).
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
