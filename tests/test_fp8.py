"""FP8 training through torchao (megatron/model/fp8.py), on CPU with torchao's emulation.

References are torchao's own: its `Float8Linear` (the nn.Linear swap, `convert_to_float8_training`) with the same
`Float8LinearConfig`. In-process: one megatron-core layer against one Float8Linear. Through deepy.py: one training
step at TP 2 x PP 2 against a single-process Hugging Face model whose linear layers are torchao Float8Linear, on
the gathered weights the run started from; then resume.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron.config import ConfigError, build_config
from megatron.model import fp8

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train_e2e import VOCAB, synthetic_corpus  # noqa: E402

pytestmark = pytest.mark.skipif(not fp8.available(), reason=f"torchao missing: {fp8.INSTALL_HINT}")


def _tiny_raw(**over):
    raw = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    raw.update({"train_iters": 10, "train_data_paths": ["data/x_text_document"], "hidden_size": 64,
                "intermediate_size": 128, "seq_length": 32, "fp8": {"emulate": True}})
    raw.update(over)
    return raw


# ------------------------------------------------------------------------------------------------ the fp8 keys
def test_fp8_keys_are_validated():
    cfg = build_config(_tiny_raw())
    assert cfg.fp8.recipe == "tensorwise" and cfg.fp8.emulate
    assert build_config(_tiny_raw(fp8=None)).fp8 is None  # off by default
    with pytest.raises(ConfigError) as e:
        build_config(_tiny_raw(fp8={"recipe": "delayed", "emulate": True}))
    assert "fp8" in str(e.value) and "tensorwise" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(_tiny_raw(fp8={"emulate": True, "amax_history": 16}))
    assert "amax_history" in str(e.value)
    # torch._scaled_mm needs every per-rank GEMM size divisible by 16: intermediate 200 / TP 2 = 100 is not.
    with pytest.raises(ConfigError) as e:
        build_config(_tiny_raw(intermediate_size=200, model_parallel_size=2, num_gpus=2))
    assert e.value.keys() == ["fp8"] and "intermediate_size per TP rank = 100" in str(e.value)
    with pytest.raises(ConfigError) as e:  # micro batch 1 x seq 40 tokens: the weight-gradient GEMM's K
        build_config(_tiny_raw(seq_length=40, train_micro_batch_size_per_gpu=1))
    assert "tokens per micro-batch (micro batch x seq_length) = 40" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without an FP8 GPU")
def test_fp8_without_emulation_is_refused_before_launch_on_cpu(tmp_path):
    path = tmp_path / "fp8.yml"
    path.write_text(yaml.safe_dump(_tiny_raw(fp8={"recipe": "rowwise"})))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "fp8.emulate" in proc.stderr and "no CUDA GPU" in proc.stderr and "Hopper" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- one layer against torchao
def _layers(recipe, fused=False):
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    mp = ModelParallelConfig(tensor_model_parallel_size=1, params_dtype=torch.float32, use_cpu_initialization=True,
                             gradient_accumulation_fusion=fused)
    col = tensor_parallel.ColumnParallelLinear(64, 96, config=mp, init_method=torch.nn.init.normal_, bias=False,
                                               gather_output=False)
    row = tensor_parallel.RowParallelLinear(96, 64, config=mp, init_method=torch.nn.init.normal_, bias=False,
                                            input_is_parallel=True, skip_bias_add=False)
    holder = torch.nn.ModuleDict({"col": col, "row": row})
    assert sorted(fp8.convert_layer(holder, recipe, emulate=True)) == ["col", "row"]
    return col, row


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_parallel_layers_compute_what_torchao_float8linear_computes(single_rank, recipe):
    """A converted column- and row-parallel layer give torchao's Float8Linear's output and gradients exactly, and
    differ from the fp32 layer by FP8 rounding (so the FP8 path is really taken)."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    col, row = _layers(recipe)
    config = Float8LinearConfig.from_recipe_name(recipe)
    config = type(config)(**{**config.__dict__, "emulate": True})
    for layer, (n_in, n_out) in ((col, (64, 96)), (row, (96, 64))):
        ref = Float8Linear.from_float(torch.nn.Linear(n_in, n_out, bias=False), config=config)
        ref.weight = torch.nn.Parameter(layer.weight.detach().clone())
        hp = torch.nn.Linear(n_in, n_out, bias=False)
        hp.weight = torch.nn.Parameter(layer.weight.detach().clone())
        x = torch.randn(2, 16, n_in)
        g = torch.randn(2, 16, n_out)
        outs = []
        for module in (layer, ref, hp):
            xi = x.clone().requires_grad_(True)
            y = module(xi)
            y = y[0] if isinstance(y, tuple) else y
            y.backward(g)
            outs.append((y.detach(), xi.grad, module.weight.grad))
            module.weight.grad = None
        for ours, theirs in zip(outs[0], outs[1]):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        for ours, exact in zip(outs[0], outs[2]):
            err = (ours - exact).abs().max() / exact.abs().max()
            assert 1e-3 < err < 0.1, err  # FP8 rounding: e4m3 keeps 3 mantissa bits, e5m2 (gradients) 2


def test_fused_gradient_accumulation_goes_into_main_grad(single_rank):
    """With gradient_accumulation_fusion the FP8 weight gradient is added into the fp32 main_grad over
    micro-batches and `.grad` stays empty, as in megatron-core's fused path."""
    from megatron import grad_accum_fusion

    grad_accum_fusion.install()
    torch.manual_seed(0)
    col, _ = _layers("tensorwise", fused=True)
    plain, _ = _layers("tensorwise")
    plain.weight.data.copy_(col.weight.data)
    col.weight.main_grad = torch.full_like(col.weight, 0.25)
    total = torch.zeros_like(col.weight)
    for _ in range(2):
        x, g = torch.randn(2, 16, 64), torch.randn(2, 16, 96)
        col(x)[0].backward(g)
        plain(x)[0].backward(g)
        total += plain.weight.grad
        plain.weight.grad = None
    assert col.weight.grad is None
    torch.testing.assert_close(col.weight.main_grad, 0.25 + total, rtol=1e-6, atol=1e-6)
