"""Gradient-accumulation fusion (megatron/grad_accum_fusion.py): the weight-gradient GEMMs of megatron-core's
linear layers add straight into DeepSpeed's fp32 buffer.

References: the fp64 product of the exact bf16 operands (what an fp32-accumulating GEMM computes up to summation
order), and for the whole run the same training without the fusion.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from megatron import grad_accum_fusion

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train_e2e import run_deepy, synthetic_corpus  # noqa: E402


def bf16_operands(tokens=96, n_in=40, n_out=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=gen).to(torch.bfloat16)
    g = torch.randn(tokens, n_out, generator=gen).to(torch.bfloat16)
    return x, g


def test_unset_fuses_wherever_the_fp32_buffer_exists():
    """The key's three values (schema: unset = on wherever it applies), as the trainer and the planner read them."""
    assert grad_accum_fusion.applies(None, "bf16", "fp32") and grad_accum_fusion.applies(True, "bf16", "fp32")
    assert not grad_accum_fusion.applies(False, "bf16", "fp32")
    assert not any(grad_accum_fusion.applies(c, p, a) for c in (None, True) for p, a in [("fp32", "fp32"),
                                                                                        ("bf16", "bf16")])


def test_kernel_accumulates_in_fp32_into_the_buffer():
    x, g = bf16_operands()
    main_grad = torch.full((24, 40), 0.5)
    wgrad = g.double().t() @ x.double()
    grad_accum_fusion.wgrad_gemm_accum_fp32(x, g, main_grad)
    grad_accum_fusion.wgrad_gemm_accum_fp32(x, g, main_grad)
    torch.testing.assert_close(main_grad.double(), 0.5 + 2 * wgrad, rtol=1e-6, atol=1e-5)


def test_probe_rejects_kernels_that_fail_or_overwrite():
    cpu = torch.device("cpu")

    def raises(x, g, out):
        raise RuntimeError("no such overload")

    def overwrites(x, g, out):
        out.copy_(g.float().t() @ x.float())

    assert grad_accum_fusion._works(grad_accum_fusion._upcast_then_accumulate, cpu)
    assert not grad_accum_fusion._works(raises, cpu)
    assert not grad_accum_fusion._works(overwrites, cpu)
    assert grad_accum_fusion.kernel_for(cpu)[1] is grad_accum_fusion._upcast_then_accumulate


def test_megatron_core_layers_write_main_grad_not_grad(single_rank):
    """Column- and row-parallel layers built with the flag: three micro-batches land in main_grad, summed in fp32,
    and `.grad` is never written. Without the fusion each micro-batch's gradient is rounded to bf16 first."""
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    grad_accum_fusion.install()
    assert grad_accum_fusion.describe(torch.device("cpu")) == "upcast + fp32 GEMM"  # ours, not APEX's
    layers = {}
    for fused in (True, False):
        cfg = ModelParallelConfig(tensor_model_parallel_size=1, params_dtype=torch.bfloat16,
                                  use_cpu_initialization=True, gradient_accumulation_fusion=fused)
        col = tensor_parallel.ColumnParallelLinear(40, 24, config=cfg, init_method=torch.nn.init.normal_,
                                                   bias=False, gather_output=False)
        row = tensor_parallel.RowParallelLinear(24, 40, config=cfg, init_method=torch.nn.init.normal_, bias=False,
                                                input_is_parallel=True, skip_bias_add=True)
        layers[fused] = (col, row)
    col, row = layers[True]
    for src, dst in zip(layers[False], layers[True]):
        dst.weight.data.copy_(src.weight.data)
    for layer in (col, row):
        layer.weight.main_grad = torch.zeros(layer.weight.shape, dtype=torch.float32)
    assert grad_accum_fusion.fused_weights(torch.nn.ModuleList([col, row])) == [col.weight, row.weight]

    expected = {"col": torch.zeros(24, 40, dtype=torch.float64), "row": torch.zeros(40, 24, dtype=torch.float64)}
    unfused_sum = {"col": torch.zeros(24, 40), "row": torch.zeros(40, 24)}
    for step in range(3):
        x, r = bf16_operands(tokens=32, n_in=40, n_out=40, seed=step)
        x = x.view(4, 8, 40)
        for fused, (c, rw) in layers.items():
            c.weight.grad, rw.weight.grad = None, None
            h, _ = c(x)
            h = h.detach().requires_grad_(True)  # separate graphs: each layer's grad_output is known exactly
            y, _ = rw(h)
            (y.float() * r.float().view(4, 8, 40)).sum().backward()
            grad_h = h.grad.clone()
            h2, _ = c(x)
            h2.backward(grad_h)
            if fused:
                expected["row"] += r.double().t() @ h.detach().double().view(32, 24)
                expected["col"] += grad_h.double().view(32, 24).t() @ x.double().view(32, 40)
            else:
                unfused_sum["col"] += c.weight.grad.float()
                unfused_sum["row"] += rw.weight.grad.float()
    assert col.weight.grad is None and row.weight.grad is None
    for name, layer in (("col", col), ("row", row)):
        err = (layer.weight.main_grad.double() - expected[name]).abs().max().item()
        unfused_err = (unfused_sum[name].double() - expected[name]).abs().max().item()
        scale = expected[name].abs().max().item()
        assert err <= 1e-6 * scale, (name, err, scale)
        assert unfused_err > 10 * err  # the bf16 rounding the fusion removes


def test_embedding_scatters_its_gradient_into_main_grad(single_rank):
    """The fused embedding (layers.FusedGradVocabParallelEmbedding): same output as megatron-core's, and over three
    micro-batches with repeated tokens its weight gradient is the fp32 sum in main_grad, `.grad` never written.
    megatron-core's embedding instead hands DeepSpeed a bf16 gradient per micro-batch (rounded per row sum)."""
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    from megatron.model.layers import FusedGradVocabParallelEmbedding

    cfg = ModelParallelConfig(tensor_model_parallel_size=1, params_dtype=torch.bfloat16, use_cpu_initialization=True)
    plain = tensor_parallel.VocabParallelEmbedding(50, 16, init_method=torch.nn.init.normal_, config=cfg)
    fused = FusedGradVocabParallelEmbedding(50, 16, init_method=torch.nn.init.normal_, config=cfg)
    fused.weight.data.copy_(plain.weight.data)
    fused.weight.main_grad = torch.full((50, 16), 0.25)
    assert grad_accum_fusion.fused_weights(torch.nn.ModuleList([plain, fused])) == [fused.weight]

    expected = torch.full((50, 16), 0.25, dtype=torch.float64)
    unfused_sum = torch.full((50, 16), 0.25)
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 12, (4, 64), generator=gen)  # 256 lookups of 12 rows: many repeats per row
        g = torch.randn(4, 64, 16, generator=gen).to(torch.bfloat16)
        out = fused(ids)
        torch.testing.assert_close(out, plain(ids), rtol=0, atol=0)
        out.backward(g)
        plain.weight.grad = None
        plain(ids).backward(g)
        unfused_sum += plain.weight.grad.float()
        expected.index_add_(0, ids.reshape(-1), g.reshape(-1, 16).double())
    assert fused.weight.grad is None
    assert torch.equal(fused.weight.main_grad[12:], torch.full((38, 16), 0.25))  # rows never seen: untouched
    err = (fused.weight.main_grad.double() - expected).abs().max().item()
    unfused_err = (unfused_sum.double() - expected).abs().max().item()
    assert err <= 1e-6 * expected.abs().max().item(), err
    assert unfused_err > 10 * err

    # Bitwise repeatable at a size where torch's CPU index_put_ adds in parallel: 4,096 lookups of 2 rows.
    ids = torch.randint(0, 2, (8, 512), generator=torch.Generator().manual_seed(9))
    g = torch.randn(8, 512, 16, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    sums = []
    for _ in range(3):
        fused.weight.main_grad = torch.zeros(50, 16)
        fused(ids).backward(g)
        sums.append(fused.weight.main_grad)
    assert torch.equal(sums[0], sums[1]) and torch.equal(sums[0], sums[2])


@pytest.mark.distributed
def test_embedding_at_tp2_masks_the_other_ranks_tokens_out_of_main_grad():
    """Two gloo ranks each holding half the vocabulary (tests/distributed/tp_embedding_worker.py): the fused
    embedding's output equals megatron-core's and the full table's, and each rank's main_grad is the fp32 sum
    over its own tokens only, row 0 (where the other rank's tokens are looked up and masked) included."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "distributed" / "tp_embedding_worker.py")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0 and f"rank {rank}: ok" in out, out[-3000:]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


@pytest.mark.distributed
def test_fused_training_matches_unfused_through_deepspeed(tmp_path):
    """bf16 + fp32 accumulation at TP 2 x PP 2 (both stages' gradient paths: the pipeline engine's and the loss
    stage's; the embedding's vocab-sliced lookup), two micro-batches per step: with the fusion DeepSpeed's norm, clipping and update see the same gradients.
    A fused run resumed from its step-2 checkpoint continues exactly (the fp32 buffer is re-attached, empty)."""
    synthetic_corpus(str(tmp_path / "data"))

    def train(name: str, **extra) -> tuple[list[dict], str]:
        out = tmp_path / name
        out.mkdir()
        proc = run_deepy(out, {"data_path": str(tmp_path / "data"), "precision": "bf16", "pipe_parallel_size": 2,
                               "model_parallel_size": 2, "num_gpus": 4, "train_iters": 4, "log_interval": 1, "eval_iters": 0,
                               "eval_interval": 1000, "use_wandb": False, "tensorboard_dir": None,
                               "gradient_clipping": 0.5, **extra})
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        return metrics(out / "run"), log

    logs = {False: train("plain", save=None, gradient_accumulation_fusion=False),
            True: train("fused", checkpoint_factor=2, gradient_accumulation_fusion=True)}
    resumed, _ = train("resumed", save=None, gradient_accumulation_fusion=True,
                       load=str(tmp_path / "fused" / "ckpt"), load_iteration=2)
    assert [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in resumed] == \
        [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in logs[True][0][2:]]
    # stage 0 (rank 0 logs): 2 layers x 4 matrices + the embedding
    assert "gradient accumulation fusion: 9 weights" in logs[True][1]
    plain, fused = logs[False][0], logs[True][0]
    assert len(plain) == len(fused) == 4
    for a, b in zip(plain, fused):
        # Same maths, different rounding (the fused sum is rounded once, not per micro-batch). A fused weight left
        # out of the norm, or never updated, moves these by far more than that.
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=2e-3)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=2e-2)
