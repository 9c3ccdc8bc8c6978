"""The trainer: build everything from the config, then `fit()` — a loop meant to be read top to bottom.

config → layout (process groups) → tokenizer → model (PipelineModule) → DeepSpeed engine → data → train/eval/save.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from megatron.config.deepspeed_config import deepspeed_config
from megatron.config.loader import save_resolved
from megatron.config.schema import NeoXConfig
from megatron.data.data_utils import build_train_valid_test_datasets, make_data_loader
from megatron.data.tokenizer import build_tokenizer
from megatron.metrics import MetricSinks, StepTimer, flops_per_token, format_step, peak_memory_gib
from megatron.model.config import LlamaConfig
from megatron.model.llama import build_model
from megatron.optim import build_optimizer, build_scheduler
from megatron.parallel.layout import ParallelLayout


def default_run_dir(cfg: NeoXConfig, name: str = "run") -> str:
    return cfg.run_dir or os.path.join("runs", name)


def _lm_batches(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, labels) pairs in the form DeepSpeed's pipeline engine consumes."""
    while True:
        for batch in loader:
            tokens = batch["tokens"]
            yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class Trainer:
    def __init__(self, cfg: NeoXConfig, run_dir: str):
        import deepspeed

        self.cfg, self.run_dir = cfg, run_dir
        world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.layout = ParallelLayout.from_world(cfg.tp, cfg.pp, world, rank)
        backend = cfg.distributed_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.layout.initialize(backend=backend, seed=cfg.seed, num_kv_heads=cfg.kv_heads, verbose=True)
        # Same seed on every TP/DP rank of a stage (init is seeded per layer anyway); stages differ, as in Megatron.
        self._seed_everything(cfg.seed + 100 * self.layout.pp_rank)

        self.precision = cfg.resolved_precision
        self.tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.vocab_file)
        self.model_cfg = LlamaConfig.from_neox(cfg, cfg.vocab_size or self.tokenizer.vocab_size, torch.float32)
        model = build_model(self.model_cfg, self.layout, cfg.pipe_partition_method)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, cfg),
            lr_scheduler=build_scheduler(cfg),
            config=deepspeed_config(cfg, self.layout.dp, self.precision),
        )
        self.global_batch = cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * self.layout.dp
        self.iteration = 0
        self.consumed_samples = 0
        self.is_logger = rank == 0
        self.sinks = MetricSinks(
            enabled=self.is_logger, run_dir=run_dir, tensorboard_dir=cfg.tensorboard_dir, use_wandb=cfg.use_wandb,
            wandb_kwargs={"project": cfg.wandb_project, "group": cfg.wandb_group, "entity": cfg.wandb_team},
            config=cfg.to_yaml_dict(),
        )
        if cfg.load:
            self._load(cfg.load)
        self._build_data()
        n_params = self.model_cfg.count_parameters()
        self.sinks.print(
            f"Llama: {n_params / 1e6:,.2f}M parameters | {self.layout.describe()} | {self.precision} | "
            f"global batch {self.global_batch} x {cfg.seq_length} tokens | FLOPs/token 6N+12Lhs"
        )

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _build_data(self) -> None:
        cfg = self.cfg
        train, valid, _ = build_train_valid_test_datasets(
            train_data_paths=cfg.train_data_paths, train_data_weights=cfg.train_data_weights,
            valid_data_paths=cfg.valid_data_paths, valid_data_weights=cfg.valid_data_weights,
            test_data_paths=cfg.test_data_paths, test_data_weights=cfg.test_data_weights,
            data_path=cfg.data_path, split=cfg.split, seq_length=cfg.seq_length, seed=cfg.seed,
            train_num_samples=cfg.train_iters * self.global_batch,
            # The same validation samples every evaluation, so the curve compares like with like.
            valid_num_samples=max(1, cfg.eval_iters) * self.global_batch,
            test_num_samples=0, cache_dir=cfg.data_cache_dir,
        )
        micro, lay = cfg.train_micro_batch_size_per_gpu, self.layout
        self.train_iter = _lm_batches(
            make_data_loader(train, micro, lay.dp_rank, lay.dp, self.consumed_samples, cfg.num_workers))
        self.valid_ds = valid if cfg.eval_iters > 0 else None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        flops_token = flops_per_token(self.model_cfg, cfg.seq_length)
        timer, window_losses, last = StepTimer(), [], {}
        bar = tqdm(total=cfg.train_iters, initial=self.iteration, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.is_logger and sys.stderr.isatty()))  # log lines suffice in files
        while self.iteration < cfg.train_iters:
            loss = self.engine.train_batch(data_iter=self.train_iter)  # forward+backward over all micro-batches
            self.iteration += 1
            self.consumed_samples += self.global_batch
            window_losses.append(loss.item())
            bar.update(1)

            if self.iteration % cfg.log_interval == 0 or self.iteration == cfg.train_iters:
                seconds = timer.lap()
                tokens_per_s = len(window_losses) * self.global_batch * cfg.seq_length / seconds
                last = {
                    "loss": sum(window_losses) / len(window_losses),
                    "lr": self.engine.get_lr()[0],
                    "grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                    "tokens_per_s": tokens_per_s,
                    "tflops_per_gpu": flops_token * tokens_per_s / self.layout.world_size / 1e12,
                    "peak_mem_gib": peak_memory_gib(),
                    "consumed_samples": self.consumed_samples,
                }
                self.sinks.log(self.iteration, last)
                if self.is_logger:
                    bar.write(format_step(self.iteration, cfg.train_iters, last))
                window_losses = []

            if self.valid_ds is not None and (self.iteration % cfg.eval_interval == 0
                                              or self.iteration == cfg.train_iters):
                self.evaluate()
                timer.lap()  # validation time is not training throughput
            if cfg.save and cfg.checkpoint_factor and self.iteration % cfg.checkpoint_factor == 0:
                self.save()
        bar.close()
        if cfg.save and (not cfg.checkpoint_factor or self.iteration % cfg.checkpoint_factor):
            self.save()
        train_losses = [r["train/loss"] for r in self.sinks.history if "train/loss" in r]
        if len(train_losses) > 1:
            drop = 100.0 * (1.0 - train_losses[-1] / train_losses[0])
            self.sinks.print(f"training loss {train_losses[0]:.4f} -> {train_losses[-1]:.4f} ({drop:.1f}% lower) "
                             f"over {self.iteration} steps")
        plot = self.sinks.plot()
        if plot:
            self.sinks.print(f"loss and learning-rate curves: {plot}")
        self.sinks.close()
        return last

    def evaluate(self) -> float:
        cfg, lay = self.cfg, self.layout
        loader = make_data_loader(self.valid_ds, cfg.train_micro_batch_size_per_gpu, lay.dp_rank, lay.dp, 0, 0)
        batches = _lm_batches(loader)
        losses = [self.engine.eval_batch(data_iter=batches).item() for _ in range(cfg.eval_iters)]
        loss = sum(losses) / len(losses)
        ppl = float(np.exp(min(loss, 50.0)))
        self.sinks.log(self.iteration, {"loss": loss, "ppl": ppl}, prefix="valid")
        self.sinks.print(f"validation at step {self.iteration}: loss {loss:.4f} | perplexity {ppl:.2f}")
        return loss

    # ------------------------------------------------------------------ checkpoints
    def _tag(self, iteration: int) -> str:
        return f"global_step{iteration}"

    def save(self) -> None:
        cfg = self.cfg
        tag = self._tag(self.iteration)
        state = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                 "config": cfg.to_yaml_dict()}
        self.engine.save_checkpoint(cfg.save, tag=tag, client_state=state)
        if self.is_logger:
            save_resolved(cfg, Path(cfg.save) / tag / "config.yml")
            self.sinks.print(f"saved checkpoint {Path(cfg.save) / tag}")
            self._prune(Path(cfg.save))
        torch.distributed.barrier()

    def _prune(self, root: Path) -> None:
        keep = self.cfg.keep_last_n_checkpoints
        if not keep:
            return
        tags = sorted((p for p in root.glob("global_step*") if p.is_dir()), key=lambda p: int(p.name[11:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _load(self, load_dir: str) -> None:
        finetune = self.cfg.finetune
        path, state = self.engine.load_checkpoint(
            load_dir, load_optimizer_states=not finetune, load_lr_scheduler_states=not finetune,
            load_module_only=finetune,
        )
        if path is None:
            self.sinks.print(f"no checkpoint found in {load_dir}; starting from scratch")
            return
        if not finetune:
            self.iteration = int(state["iteration"])
            self.consumed_samples = int(state["consumed_samples"])
        self.sinks.print(f"loaded {path} ({'weights only, new run' if finetune else f'step {self.iteration}'})")


def run(cfg: NeoXConfig, run_dir: Optional[str] = None) -> dict:
    trainer = Trainer(cfg, run_dir or default_run_dir(cfg))
    return trainer.fit()
