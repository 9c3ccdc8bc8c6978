"""FP8 training of the transformer layers' linear GEMMs through torchao's float8 training primitives (`fp8:` key).

What runs in FP8: the four megatron-core linear layers of every transformer layer (attention's fused qkv and output
projection, SwiGLU's fused gate/up and down), forward and both backward GEMMs, with torchao's dynamic scaling
(`Float8LinearConfig.from_recipe_name("tensorwise" | "rowwise")`). What stays in high precision: the embedding,
the output layer (logits), the norms, attention itself and the loss (`HIGH_PRECISION` names them; the test checks
them). Scales are computed from each tensor at every step (dynamic scaling): there is no FP8 state, so checkpoints
are unchanged and an FP8 run's checkpoint loads into a bf16 run and back.

How: megatron-core's Column/RowParallelLinear are not `nn.Linear`, so torchao's module swap does not apply. Their
`forward` does the TP communication around one call, `self._forward_impl(input, weight, bias, ...)`, the local GEMM.
`convert_layer` replaces that call, per layer instance, by torchao's own autograd function for an FP8 linear
(`matmul_with_hp_or_float8_args`, the one inside `Float8Linear`). The TP communication stays megatron-core's:
- the column-parallel input gradient all-reduce (megatron-core's `allreduce_dgrad`, run inside its GEMM function)
  becomes `copy_to_tensor_model_parallel_region` on the input (identity forward, all-reduce backward);
- the row-parallel output all-reduce is untouched (it follows `_forward_impl` in megatron-core's forward).

Tensor parallelism and the scales. A TP rank holds a shard of some GEMM operands (the weights; a column-parallel
layer's output gradient; a row-parallel layer's input). With tensorwise scaling one scale covers the whole tensor,
so the shard's amax is all-reduced (MAX) over the TP group before scaling, through torchao's own
`hp_tensor_to_float8_dynamic(..., reduce_amax=True, device_mesh=<TP mesh>)`, which is how torchao's own TP support
scales DTensor shards: the numbers are those of torchao's `Float8Linear` on the gathered weights, at every TP size
(tests/test_fp8.py checks one training step at TP 2 x PP 2 against that reference). The pre-cast operands are
handed to torchao's matmul as Float8 tensors, which it uses as given. With rowwise scaling each scale covers one
row of the reduction dimension; where TP splits that dimension (row-parallel forward, column-parallel input
gradient) each rank scales its part of the row: finer, not coarser, than TP 1, so not bitwise the TP 1 numbers.

Gradient-accumulation fusion (megatron/grad_accum_fusion.py): the weight-gradient GEMM is torchao's FP8 GEMM, whose
output is in the weight's dtype (bf16); `_IntoMainGrad` adds it into the fp32 `main_grad` buffer and hands
autograd no `.grad`, so DeepSpeed's side (no bf16 gradient buffer, fp32 sum across micro-batches, the optimizer's
bookkeeping) is unchanged. What FP8 changes is only that each micro-batch's weight gradient is rounded once to bf16
before that fp32 add (an FP8 GEMM cannot take the fp32 accumulator as its C operand in torchao).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Optional

import torch

# The linear layers of a transformer layer that run in FP8; every other linear layer (the output layer) and the
# embedding keep megatron-core's high-precision GEMM (tests/test_fp8.py checks both lists on a built model).
CONVERTED = ("attention.qkv", "attention.dense", "mlp.gate_up", "mlp.down")
RECIPES = ("tensorwise", "rowwise")
INSTALL_HINT = "pip install -r requirements/fp8.txt (torchao)"


def available() -> bool:
    with torchao_import_noise_silenced():
        try:
            import torchao.float8  # noqa: F401
        except ImportError:
            return False
    return True


@contextlib.contextmanager
def torchao_import_noise_silenced():
    """While torchao is imported: its import tries its CUDA extensions and logs a warning per .so it cannot load
    (all of them on a CPU-only torch), though the float8 training path is pure Python on torch._scaled_mm and needs
    none of them; it also registers its enums with torch's pytree, which torch 2.13 deprecates with a warning.
    Noise to a user. megatron/generation/loading.py loads models inside it too: transformers imports torchao (its
    float8 and mx_formats modules) whenever it is installed, so every generation or evaluation printed those."""
    logs = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def hardware_problem(emulate: bool) -> Optional[str]:
    """Why FP8 cannot run on this machine's device, or None. FP8 tensor cores: Hopper (sm90) and Ada (sm89)."""
    if not available():
        return f"torchao is not installed: {INSTALL_HINT}"
    if emulate:
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU: FP8 matmuls need an NVIDIA Hopper or Ada GPU"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return (f"{torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]}) has no FP8 tensor cores: Hopper (sm90) or "
                "Ada (sm89)")
    return None


def gemm_dims(hidden: int, heads: int, kv_heads: int, intermediate: int, tp: int, tokens: int) -> dict[str, int]:
    """The per-rank GEMM dimensions torch._scaled_mm sees (each must be divisible by 16): the inner (K) and outer
    (N) sizes of the four converted layers, and the tokens per micro-batch (the K of the weight-gradient GEMM)."""
    from megatron.model import sharding

    head = hidden // heads
    kv_rows = sharding.kv_rows_per_rank(kv_heads, tp, head)
    return {"hidden_size": hidden, "qkv rows per TP rank": heads * head // tp + 2 * kv_rows,
            "attention width per TP rank": heads * head // tp,
            "intermediate_size per TP rank": intermediate // tp,
            "tokens per micro-batch (micro batch x seq_length)": tokens}


@functools.lru_cache(maxsize=None)
def float8_config(recipe: str, emulate: bool):
    from torchao.float8 import Float8LinearConfig

    cfg = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        import dataclasses

        cfg = dataclasses.replace(cfg, emulate=True)
    return cfg


def _mm_config(config):
    """The per-GEMM settings `Float8Linear.__init__` derives from its config (output, grad_input, grad_weight)."""
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    return LinearMMConfig(*(ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim)
                            for g in (config.gemm_config_output, config.gemm_config_grad_input,
                                      config.gemm_config_grad_weight)))


class _IntoMainGrad(torch.autograd.Function):
    """Identity on the weight; its gradient (the FP8 weight-gradient GEMM's output) is added into the fp32
    `weight.main_grad` and autograd gets none (megatron-core's fused path does the same)."""

    @staticmethod
    def forward(ctx, weight):
        ctx.weight = weight
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        ctx.weight.main_grad.add_(grad.to(ctx.weight.main_grad.dtype))
        return None


class _GradToFloat8Reduced(torch.autograd.Function):
    """Identity forward; backward casts the output gradient to FP8 with one tensorwise scale over the TP group (the
    gradient of a column-parallel output is sharded). torchao's NoopFwToFloat8BwDynamic, with the amax reduced."""

    @staticmethod
    def forward(ctx, tensor, mm_config, config, mesh):
        ctx.mm_config, ctx.config, ctx.mesh = mm_config, config, mesh
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
        from torchao.float8.float8_training_tensor import GemmInputRole

        c = ctx.config.cast_config_grad_output
        return (hp_tensor_to_float8_dynamic(grad, c.target_dtype, ctx.mm_config, reduce_amax=True,
                                            gemm_input_role=GemmInputRole.GRAD_OUTPUT, device_mesh=ctx.mesh,
                                            round_scales_to_power_of_2=ctx.config.round_scales_to_power_of_2),
                None, None, None)


@functools.lru_cache(maxsize=None)
def _tp_mesh(group):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, "cuda" if torch.cuda.is_available() else "cpu")


def _fp8_linear(layer, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                sequence_parallel=False, grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, **_):
    """Stands in for megatron-core's `_forward_impl` (same arguments): the local GEMM of a column- or
    row-parallel layer, in FP8 through torchao."""
    from megatron.core import tensor_parallel
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    if sequence_parallel or grad_output_buffer is not None:
        raise NotImplementedError("fp8 with sequence parallelism or deferred embedding wgrad")
    config, mm_config = layer.fp8_config, layer.fp8_mm_config
    if allreduce_dgrad:  # megatron-core would all-reduce the input gradient inside its GEMM function
        input = tensor_parallel.copy_to_tensor_model_parallel_region(input, group=layer.tp_group)
    if gradient_accumulation_fusion and hasattr(weight, "main_grad"):
        weight = _IntoMainGrad.apply(weight)
    weight_t = weight.t()
    column = isinstance(layer, tensor_parallel.ColumnParallelLinear)
    sharded_tp = layer.tp_group.size() > 1 and \
        config.cast_config_weight.scaling_granularity is ScalingGranularity.TENSORWISE
    if sharded_tp:  # one scale over the whole (gathered) tensor for every sharded operand, see module docstring
        mesh = _tp_mesh(layer.tp_group)
        cast = functools.partial(hp_tensor_to_float8_dynamic, linear_mm_config=mm_config, reduce_amax=True,
                                 device_mesh=mesh, round_scales_to_power_of_2=config.round_scales_to_power_of_2)
        weight_t = cast(weight_t, config.cast_config_weight.target_dtype, gemm_input_role=GemmInputRole.WEIGHT)
        if not column:
            input = cast(input, config.cast_config_input.target_dtype, gemm_input_role=GemmInputRole.INPUT)
    # The casts (amax, scale, cast, transposed copies) are memory-bound passes over each operand: compiled with the
    # GEMM (fuse_pointwise, on CUDA) they fuse, as torchao's own benchmarks run it. The TP-reduced casts above stay
    # eager (their all-reduce is a collective inside the cast).
    gemm = matmul_with_hp_or_float8_args.apply if sharded_tp or not layer.fp8_compile else _compiled_fp8_mm()
    out = gemm(input, weight_t, mm_config, config)
    if sharded_tp and column:
        out = _GradToFloat8Reduced.apply(out, mm_config, config, mesh)
    return out + bias if bias is not None else out


def _fp8_mm(input, weight_t, mm_config, config):
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

    return matmul_with_hp_or_float8_args.apply(input, weight_t, mm_config, config)


def _compiled_fp8_mm():
    from megatron.model import kernels

    return kernels.fused(_fp8_mm, True)


def convert_layer(module: torch.nn.Module, recipe: str, emulate: bool, compile: bool = False) -> list[str]:
    """Run the GEMMs of every megatron-core linear layer inside `module` (one transformer layer) in FP8. Returns
    the converted layers' names. `compile` (the model's fuse_pointwise): torch.compile each GEMM with its casts
    on CUDA (kernels.fused; on CPU the same function runs eagerly)."""
    from megatron.core import tensor_parallel  # here: deepy.py's config checks import this module without it

    problem = hardware_problem(emulate)  # imports torchao quietly (available())
    if problem:
        raise RuntimeError(f"fp8: {problem}; set fp8.emulate: true to emulate it (slow, for tests) or remove fp8")
    config = float8_config(recipe, emulate)
    converted = []
    for name, layer in module.named_modules():
        if isinstance(layer, (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)):
            layer.fp8_config, layer.fp8_mm_config, layer.fp8_compile = config, _mm_config(config), compile
            layer._forward_impl = functools.partial(_fp8_linear, layer)
            converted.append(name)
    return converted


def convert_transformer_layer(layer: torch.nn.Module, cfg) -> list[str]:
    """What TransformerLayer calls with its LlamaConfig. The GEMMs are compiled with fuse_pointwise, except under
    selective recompute: torch's checkpoint policy cannot see into compiled code, so it would replay compiled FP8
    GEMMs instead of keeping their outputs (megatron/model/recompute.py)."""
    selective = cfg.checkpoint_activations and cfg.recompute_granularity == "selective"
    return convert_layer(layer, cfg.fp8_recipe, cfg.fp8_emulate, compile=cfg.fuse_pointwise and not selective)


def is_converted(layer: torch.nn.Module) -> bool:
    return getattr(layer, "fp8_config", None) is not None
