"""Learning-rate schedules and parameter groups."""

import math

import pytest
import torch

from megatron.config import build_config
from megatron.optim import lr_at, param_groups

BASE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
        "train_iters": 100, "train_data_paths": ["x"], "optimizer": {"params": {"lr": 1.0e-3}}, "min_lr": 1.0e-4,
        "warmup": 0.1}


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_warmup_then_decay_to_min_lr(style):
    cfg = build_config({**BASE, "lr_decay_style": style})
    assert lr_at(0, cfg) == pytest.approx(1.0e-4)  # warmup: 1/10 of the peak after the first step
    assert lr_at(9, cfg) == pytest.approx(1.0e-3)  # end of warmup reaches the peak
    mid, end = lr_at(55, cfg), lr_at(100, cfg)
    if style == "constant":
        assert mid == end == pytest.approx(1.0e-3)
    elif style == "linear":
        assert mid == pytest.approx(1.0e-4 + 0.9e-3 * 0.5) and end == pytest.approx(1.0e-4)
    else:
        assert mid == pytest.approx(1.0e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
        assert end == pytest.approx(1.0e-4)
    assert lr_at(10_000, cfg) == pytest.approx(end)  # past the decay horizon it stays at the floor


def test_lr_decay_iters_sets_the_horizon():
    cfg = build_config({**BASE, "lr_decay_iters": 200, "warmup": 0.0, "lr_decay_style": "linear"})
    assert lr_at(100, cfg) == pytest.approx(1.0e-4 + 0.9e-3 * 0.5)


def test_no_weight_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 1 and decay["params"][0].ndim == 2
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_precision_defaults_to_bf16_on_gpu_with_fp32_accumulation(monkeypatch):
    from megatron.config.deepspeed_config import deepspeed_config

    cfg = build_config(BASE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cfg.resolved_precision == "bf16"
    ds = deepspeed_config(cfg, dp=4, precision=cfg.resolved_precision)
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["train_batch_size"] == 4 and ds["zero_optimization"]["stage"] == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cfg.resolved_precision == "fp32"
    assert build_config({**BASE, "bf16": {"enabled": True}}).resolved_precision == "bf16"
    assert deepspeed_config(cfg, dp=1, precision="fp32")["bf16"] == {"enabled": False}
