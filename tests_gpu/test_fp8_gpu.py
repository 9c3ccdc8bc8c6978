"""FP8 on the GPU (megatron/model/fp8.py; `make test-gpu` on a Hopper or Ada machine with requirements/fp8.txt).

The CPU tests (tests/test_fp8.py) check the maths with torchao's emulation; these check the real path: torchao's
FP8 GEMMs (`aten._scaled_mm`, cuBLAS tensorwise / CUTLASS rowwise) ran, with the same numbers as torchao's own
Float8Linear, close to bf16, under selective recompute with the compiled pointwise ops, and into the fp32
main_grad with gradient_accumulation_fusion."""

import pytest
import torch

from gpu_helpers import DEV, assert_close, single_process
from megatron.model import fp8


def _close(a, b, tol):
    assert_close(a, b, tol, floor=1e-6)


def test_this_gpu_runs_fp8():
    """Not a skip: a GPU session without torchao or without FP8 tensor cores must say so."""
    assert fp8.hardware_problem(emulate=False) is None, fp8.hardware_problem(emulate=False)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_parallel_layers_run_scaled_mm_like_torchao_float8linear(recipe, compiled):
    """Eager: exactly torchao's Float8Linear. Compiled (fuse_pointwise: the casts fused with the GEMM): the same
    up to the fused casts' rounding order."""
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig
    from torchao.float8.float8_linear import Float8Linear

    single_process()
    torch.manual_seed(0)
    mp = ModelParallelConfig(tensor_model_parallel_size=1, params_dtype=torch.bfloat16)
    col = tensor_parallel.ColumnParallelLinear(4096, 2 * 14336, config=mp, init_method=torch.nn.init.normal_,
                                               bias=False, gather_output=False).to(DEV)
    fp8.convert_layer(torch.nn.ModuleDict({"col": col}), recipe, emulate=False, compile=compiled)
    ref = Float8Linear.from_float(torch.nn.Linear(4096, 2 * 14336, bias=False), config=fp8.float8_config(recipe, False))
    ref.weight = torch.nn.Parameter(col.weight.detach().clone())
    x = torch.randn(1, 4096, 4096, device=DEV, dtype=torch.bfloat16)
    g = torch.randn(1, 4096, 2 * 14336, device=DEV, dtype=torch.bfloat16)
    outs = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for module in (col, ref):
            xi = x.clone().requires_grad_(True)
            y = module(xi)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(g)
            outs.append((y.detach(), xi.grad, module.weight.grad))
    ops = {e.name for e in prof.events()}
    assert any("scaled_mm" in o for o in ops), sorted(o for o in ops if "mm" in o)
    for ours, theirs in zip(*outs):
        if compiled:
            _close(ours, theirs, 1e-2)
        else:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    exact = x.float().view(-1, 4096) @ col.weight.float().t()
    _close(outs[0][0].view(-1, 2 * 14336), exact, 0.1)


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_layer_selective_recompute_and_compiled_pointwise(recipe):
    """A bf16 transformer layer at 1B-like width in FP8 with torch.compile'd pointwise ops: selective recompute
    gives the un-checkpointed layer's gradients (the FP8 GEMMs run eagerly under selective recompute, so the
    policy sees them and keeps their outputs: fp8.convert_transformer_layer)."""
    from megatron.model import recompute
    from megatron.model.config import LlamaConfig
    from megatron.model.layers import TransformerLayer

    single_process()
    cfg = LlamaConfig(num_layers=1, hidden_size=2048, num_attention_heads=16, num_kv_heads=4, intermediate_size=8192,
                      vocab_size=1000, padded_vocab_size=1024, max_position_embeddings=4096,
                      params_dtype=torch.bfloat16, fuse_pointwise=True, fp8_recipe=recipe,
                      checkpoint_activations=True, recompute_granularity="selective")
    layer = TransformerLayer(cfg, 0).to(DEV)
    assert [layer.get_submodule(n).fp8_compile for n in fp8.CONVERTED] == [False] * 4
    torch.manual_seed(0)
    x = torch.randn(1, 4096, 2048, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    results = []
    for run in (lambda: layer(x), lambda: recompute.checkpoint_selective(layer, x)):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        run().backward(g)
        results.append([x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        _close(a, b, 1e-2)


def test_fp8_weight_gradients_go_into_fp32_main_grad():
    from megatron import grad_accum_fusion
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    single_process()
    grad_accum_fusion.install()
    mp = ModelParallelConfig(tensor_model_parallel_size=1, params_dtype=torch.bfloat16,
                             gradient_accumulation_fusion=True)
    row = tensor_parallel.RowParallelLinear(8192, 2048, config=mp, init_method=torch.nn.init.normal_, bias=False,
                                            input_is_parallel=True, skip_bias_add=False).to(DEV)
    fp8.convert_layer(torch.nn.ModuleDict({"row": row}), "tensorwise", emulate=False)
    row.weight.main_grad = torch.zeros(row.weight.shape, dtype=torch.float32, device=DEV)
    x = torch.randn(1, 2048, 8192, device=DEV, dtype=torch.bfloat16)
    g = torch.randn(1, 2048, 2048, device=DEV, dtype=torch.bfloat16)
    for _ in range(2):
        row(x)[0].backward(g)
    assert row.weight.grad is None
    exact = 2 * (g.float().view(-1, 2048).t() @ x.float().view(-1, 8192))
    _close(row.weight.main_grad, exact, 0.1)
