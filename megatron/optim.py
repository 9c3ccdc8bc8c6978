"""Parameter groups and the learning-rate schedule (warmup, then cosine/linear/constant decay to min_lr)."""

from __future__ import annotations

import math

import torch

from megatron.config.schema import NeoXConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (1-D tensors), as Megatron and GPT-NeoX do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: NeoXConfig) -> torch.optim.Optimizer:
    p = cfg.optimizer.params
    fused = torch.cuda.is_available()  # one multi-tensor kernel per step on GPU
    # DeepSpeed's ZeRO-1 and bf16 optimizers wrap it: they skip a non-finite update and compute the gradient norm
    # (ZeRO stage 0, which would hand it to the engine unwrapped, is refused by the config validation).
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=p.lr, betas=tuple(p.betas), eps=p.eps,
                             fused=fused)


def lr_at(step: int, cfg: NeoXConfig) -> float:
    """Learning rate after `step` optimizer steps."""
    peak, floor = cfg.lr, cfg.min_lr
    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    warmup = int(cfg.warmup * decay_iters)
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if cfg.lr_decay_style == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, decay_iters - warmup))
    if cfg.lr_decay_style == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg: NeoXConfig):
    """A callable DeepSpeed applies to the optimizer it wraps (ZeRO/bf16), so the schedule drives the real one."""

    def make(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)

    return make
