"""Throughput accounting and metric sinks (console, JSONL, TensorBoard, Weights & Biases, a loss/LR plot).

FLOPs convention (stated wherever TFLOP/s is printed): per trained token 6·N_matmul + 12·L·h·s, where N_matmul
counts every weight matrix (GQA's smaller k/v and SwiGLU's three matrices at their real sizes, and the output
layer) and the attention term counts full, non-causal score and context matmuls (PaLM/torchtitan convention).
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from megatron.model.config import LlamaConfig


def matmul_params(cfg: LlamaConfig) -> int:
    h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    attn = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_kv_heads)
    return cfg.num_layers * (attn + 3 * h * f) + cfg.vocab_size * h


def flops_per_token(cfg: LlamaConfig, seq_length: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.hidden_size * seq_length


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process, or peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def max_over_ranks(value: float) -> float:
    """The largest value over all ranks (the peak memory that matters is the fullest GPU's, often the last
    pipeline stage's, which holds the logits); the value itself without torch.distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    nccl = torch.distributed.get_backend() == "nccl"
    t = torch.tensor([value], dtype=torch.float64, device=torch.cuda.current_device() if nccl else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


class StepTimer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.t = now - self.t, now
        return elapsed


class MetricSinks:
    """Writes on one rank only; the others get a sink that drops everything."""

    def __init__(self, enabled: bool, run_dir: str, tensorboard_dir: Optional[str], use_wandb: bool,
                 wandb_kwargs: dict, config: dict):
        self.enabled = enabled
        self.tb = self.wandb = None
        self.history: list[dict] = []
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if use_wandb:
            os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user says otherwise
            import wandb

            self.wandb = wandb.init(config=config, dir=str(self.run_dir), **wandb_kwargs)

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}": v for k, v in metrics.items()}}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def resume_history(self, iteration: int) -> None:
        """Take the records of the steps this run resumes after from run_dir/metrics.jsonl, so the plot and the
        summary cover the whole run. Records past `iteration` are from a later checkpoint's run that was rolled
        back; within the file, a record below the highest step before it starts such a rolled-back run too.

        The file is rewritten to hold the kept records only (a restart re-trains the steps after its checkpoint:
        left in place they would appear twice); the dropped lines go to metrics.rolled_back.jsonl, not lost."""
        path = self.run_dir / "metrics.jsonl" if self.enabled else None
        if path is None or not path.is_file() or path.stat().st_size == 0:
            return
        kept: list[tuple[dict, int]] = []  # (record, line number)
        lines = [line.rstrip("\n") + "\n" for line in path.read_text().splitlines()]
        for i, line in enumerate(lines):
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
            record["step"] = step
            if kept and step < kept[-1][0]["step"]:
                kept = [(r, j) for r, j in kept if r["step"] < step]
            kept.append((record, i))
        kept = [(r, j) for r, j in kept if r["step"] <= iteration]
        self.history = [r for r, _ in kept] + self.history
        kept_lines = {j for _, j in kept}
        dropped = [line for i, line in enumerate(lines) if i not in kept_lines]
        if not dropped:
            return
        with open(self.run_dir / "metrics.rolled_back.jsonl", "a") as f:
            f.writelines(dropped)
        self.jsonl.close()
        tmp = path.with_name(f".metrics.jsonl.tmp{os.getpid()}")
        tmp.write_text("".join(lines[j] for _, j in kept))
        os.replace(tmp, path)
        self.jsonl = open(path, "a")

    def print(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)

    def plot(self) -> Optional[Path]:
        """loss and learning-rate curves as run_dir/curves.png (a picture beats a table here)."""
        if not self.enabled or not self.history:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        train = [r for r in self.history if "train/loss" in r]
        valid = [r for r in self.history if "valid/loss" in r]
        fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        ax_loss.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train")
        if valid:
            ax_loss.plot([r["step"] for r in valid], [r["valid/loss"] for r in valid], "o-", label="validation")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        mcq = [r for r in self.history if "mcq/accuracy" in r]
        if mcq:  # mcq_eval's knowledge curve with its 95% Wilson interval, on its own axis (megatron/eval)
            ax_mcq, acc = ax_loss.twinx(), [r["mcq/accuracy"] for r in mcq]
            ax_mcq.errorbar([r["step"] for r in mcq], acc, fmt="s-", color="tab:green", label="MCQ accuracy",
                            yerr=[[a - r["mcq/ci95_low"] for a, r in zip(acc, mcq)],
                                  [r["mcq/ci95_high"] - a for a, r in zip(acc, mcq)]])
            ax_mcq.set(ylabel="MCQ accuracy", ylim=(0, 1))
            ax_mcq.legend(loc="upper center")
        ax_lr.plot([r["step"] for r in train], [r["train/lr"] for r in train], color="tab:orange")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("step")
        fig.tight_layout()
        path = self.run_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_step(step: int, total: int, m: dict) -> str:
    return (
        f"step {step:>6}/{total} | loss {m['loss']:.4f}" if "loss" in m else f"step {step:>6}/{total} | loss (skipped)"
    ) + (
        f" | lr {m['lr']:.3e} | grad norm {m['grad_norm']:.3f} | "
        f"{m['tokens_per_s']:,.0f} tok/s | {m['tflops_per_gpu']:.2f} TFLOP/s/GPU | mem {m['peak_mem_gib']:.2f} GiB"
    ) + (f" | loss tokens {m['loss_tokens']:,.0f}/step ({100 * m['loss_token_share']:.1f}%)" if "loss_tokens" in m
         else "")
