"""Gradient-accumulation fusion: weight gradients go straight into DeepSpeed's fp32 accumulation buffer.

Why: with bf16 weights and fp32 gradient accumulation, DeepSpeed's BF16_Optimizer lets autograd write each weight
gradient in bf16 (`param.grad`), then after every micro-batch casts it to fp32 and adds it into its flat fp32
buffer. On the H100 profile (docs/performance.md) that cast-and-add was ~14% of a step: memory traffic over every
weight, eight times per optimizer step. Megatron's answer is `gradient_accumulation_fusion`: the weight-gradient
GEMM reads the fp32 accumulator as its C operand and writes the sum back (beta = 1), so the bf16 gradient never
exists, and the sum is rounded once per step instead of once per micro-batch.

megatron-core's Column/RowParallelLinear already implement the autograd side: with the flag on they call
`fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32(input, grad_output, weight.main_grad)` and return no
weight gradient. That kernel ships in APEX, which has to be compiled from source; the same GEMM is a single
torch call (`addmm` with `out_dtype=float32`, cuBLAS with a bf16 A/B and an fp32 C), so `install()` gives
megatron-core that function instead of requiring APEX. `attach()` points each fused weight's `main_grad` at its
slice of DeepSpeed's fp32 buffer and tells the optimizer those gradients arrived (it would otherwise skip them in
the norm and clipping, since their `.grad` stays empty).

The embedding gets the same treatment (`lookup_accumulating`): its weight gradient is a scatter-add of the
output gradient into the rows of the tokens seen, so the backward adds those few rows into `main_grad` in fp32
instead of autograd filling a whole vocab x hidden bf16 gradient (1 GiB at 8B width) that DeepSpeed then reads
again. Only the norms' small vectors still take DeepSpeed's path.

Only bf16 runs with fp32 accumulation have such a buffer (DeepSpeed's BF16_Optimizer); the trainer turns the
fusion on for those alone.
"""

from __future__ import annotations

import types
from typing import Callable, Iterable

import torch

Accumulate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


# ---------------------------------------------------------------------------------------------------- kernels
# Each computes main_grad += grad_output^T @ total_input for 2-D [tokens, out] / [tokens, in] operands, with the
# products summed in fp32 (bf16 x bf16 products are exact in fp32, so all three agree up to summation order).

def _gemm_accumulate_in_place(total_input, grad_output, main_grad) -> None:
    """One cuBLAS GEMM: C = C + A @ B with bf16 A, B and an fp32 C (what APEX's kernel does)."""
    torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)


def _gemm_fp32_out_then_add(total_input, grad_output, main_grad) -> None:
    """fp32 GEMM output plus an add: no bf16 rounding, one extra pass over the weight (older torch)."""
    main_grad.add_(torch.mm(grad_output.t(), total_input, out_dtype=torch.float32))


def _upcast_then_accumulate(total_input, grad_output, main_grad) -> None:
    """Reference and CPU path: upcast the operands and accumulate in place (CPU has no mixed-dtype GEMM)."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


UPCAST = ("upcast + fp32 GEMM", _upcast_then_accumulate)
CUDA_CANDIDATES: list[tuple[str, Accumulate]] = [
    ("cuBLAS GEMM accumulating into the fp32 buffer", _gemm_accumulate_in_place),
    ("fp32-output GEMM + add", _gemm_fp32_out_then_add),
    UPCAST,
]


def _works(fn: Accumulate, device: torch.device) -> bool:
    """Whether `fn` runs here and gives the fp32-accumulated answer (torch builds differ in what addmm takes)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=gen).to(device, torch.bfloat16)
    g = torch.randn(64, 32, generator=gen).to(device, torch.bfloat16)
    start = torch.randn(32, 48, generator=gen).to(device)
    expected = start.double() + g.double().t() @ x.double()
    out = start.clone()
    try:
        fn(x, g, out)
        fn(x, g, out)  # twice: the second call must add to the first, not overwrite it
    except (RuntimeError, TypeError):
        return False
    expected = expected + g.double().t() @ x.double()
    return bool(torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-4))


_chosen: dict[str, tuple[str, Accumulate]] = {}


def kernel_for(device: torch.device) -> tuple[str, Accumulate]:
    """The fastest correct accumulate-GEMM on this device type, probed once per process."""
    if device.type not in _chosen:
        _chosen[device.type] = UPCAST if device.type != "cuda" else \
            next(((n, f) for n, f in CUDA_CANDIDATES if _works(f, device)), UPCAST)
    return _chosen[device.type]


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """APEX's `fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32` contract, on any device."""
    kernel_for(main_grad.device)[1](total_input, grad_output, main_grad)


class _LookupAccumulating(torch.autograd.Function):
    """`F.embedding(ids, weight)` whose weight gradient is added into `weight.main_grad` (fp32) and not returned.

    Repeated tokens are summed in a fixed order, so a run repeats bitwise: on CUDA index_put_ with accumulate sorts
    the indices (megatron-core's deterministic embedding relies on the same kernel; index_add_ there uses atomics);
    on CPU index_add_ walks the index serially (index_put_ there may use parallel atomic adds). The sum of one
    micro-batch is formed in fp32, never rounded to bf16."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight  # main_grad is looked up at backward time: it is attached after the model is built
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        main_grad = ctx.weight.main_grad
        ids, rows = ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(main_grad.dtype)
        if main_grad.is_cuda:
            main_grad.index_put_((ids,), rows, accumulate=True)
        else:
            main_grad.index_add_(0, ids, rows)
        return None, None


def lookup_accumulating(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Embedding lookup for a fused run: the weight gradient goes into `weight.main_grad`, `.grad` stays None."""
    return _LookupAccumulating.apply(ids, weight)


# ---------------------------------------------------------------------------------------------------- wiring
def applies(configured: bool | None, precision: str, grad_accum_dtype: str) -> bool:
    """Whether a run fuses: `configured` is the config key (unset = wherever it applies, false = never), and only
    bf16 with fp32 accumulation has the BF16_Optimizer buffer to fuse into (the trainer and the planner both ask
    this; validate.py refuses the explicit contradictions)."""
    return configured is not False and precision == "bf16" and grad_accum_dtype == "fp32"


def describe(device: torch.device) -> str:
    """Which wgrad kernel megatron-core will call (APEX's when it is installed, else ours and its variant)."""
    from megatron.core.tensor_parallel import layers

    module = getattr(layers, "fused_weight_gradient_mlp_cuda", None)
    if module is not None and getattr(module, "wgrad_gemm_accum_fp32", None) is not wgrad_gemm_accum_fp32:
        return "APEX fused_weight_gradient_mlp_cuda"
    return kernel_for(device)[0]


def install() -> None:
    """Give megatron-core's tensor-parallel layers our wgrad kernel in place of APEX's extension module.

    megatron-core looks the module up as a global of tensor_parallel/layers.py and refuses the flag when it is
    missing; both names are checked so a megatron-core that moves them fails here, loudly, not mid-backward."""
    from megatron.core.tensor_parallel import layers

    if not hasattr(layers, "_grad_accum_fusion_available"):
        raise RuntimeError("gradient_accumulation_fusion: this megatron-core has no `_grad_accum_fusion_available` "
                           "in tensor_parallel/layers.py; set gradient_accumulation_fusion: false")
    if not getattr(layers, "fused_weight_gradient_mlp_cuda", None):
        # Only the fp32 entry: the bf16-accumulation path megatron-core would call otherwise is refused by config.
        layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32)
    layers._grad_accum_fusion_available = True


def fused_weights(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights whose gradient goes into `main_grad`: megatron-core's Column/RowParallelLinear built with the
    flag on, and embeddings that look up through `lookup_accumulating` (they carry the same attribute)."""
    return [m.weight for m in module.modules()
            if getattr(m, "gradient_accumulation_fusion", False) is True and isinstance(m.weight, torch.nn.Parameter)]


def attach(optimizer, weights: Iterable[torch.nn.Parameter]) -> int:
    """Point each weight's `main_grad` at its fp32 gradient slice in DeepSpeed's BF16_Optimizer; returns how many
    weights were attached. Must run after the engine is built (the optimizer flattens the weights)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if not isinstance(optimizer, BF16_Optimizer):
        raise RuntimeError(f"gradient_accumulation_fusion needs DeepSpeed's BF16_Optimizer (bf16 with fp32 "
                           f"accumulation), got {type(optimizer).__name__}; set gradient_accumulation_fusion: false")
    if optimizer.immediate_grad_update:
        # Its per-parameter hooks fire only when .grad is written, which a fused weight's never is.
        raise RuntimeError("gradient_accumulation_fusion does not work with bf16.immediate_grad_update")
    wanted = {id(w): w for w in weights}
    attached = set()
    for i, group in enumerate(optimizer.bf16_groups):
        for j, lp in enumerate(group):
            if id(lp) in wanted:
                lp.main_grad = optimizer.fp32_groups_gradients[i][j].view(lp.shape)
                attached.add(id(lp))
    if attached != set(wanted):
        raise RuntimeError(f"gradient_accumulation_fusion: {len(set(wanted) - attached)} fused weights are not "
                           "in the optimizer's parameter groups")

    update_one = optimizer._update_hp_grad

    def update_hp_grad(lp, group_idx, param_idx, clear_lp_grads):
        # A fused weight's gradient is already in the fp32 buffer and its .grad stays None (which DeepSpeed
        # reads as "no gradient this step"): record that it has one, so the norm and clipping include it.
        if lp.grad is None and id(lp) in attached:
            optimizer.fp32_groups_has_gradients[group_idx][param_idx] = True
            lp._hp_grad = lp.main_grad
            return
        update_one(lp, group_idx, param_idx, clear_lp_grads)

    optimizer._update_hp_grad = update_hp_grad
    return len(attached)
