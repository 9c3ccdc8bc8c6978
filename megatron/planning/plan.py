"""A plan: memory by stage (memory.py) and the step time of DeepSpeed's 1F1B schedule at an assumed TFLOP/s, for the
config's own layout or a changed one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from megatron.config.schema import NeoXConfig
from megatron.planning.hardware import DEFAULT_GPU, DEFAULT_MFU, FRAGMENTATION, GIB, GPU, GPUS, device_bytes
from megatron.planning.layout import Layout, _selective, layout_of
from megatron.planning.loading import config_world_size
from megatron.planning.memory import Precision, StageMemory, fp8_working_bytes, plan_memory, precision_of
from megatron.planning.records import config_from_keys
from megatron.planning.shape import LLAMA3_VOCAB, Shape, flops_per_token, shape_of

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
                          "FP8 working copies are PREDICTIONS (megatron/planning/plan.py fp8_time_factor), not yet "
                          "measured on a GPU (docs/fp8.md)")
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
