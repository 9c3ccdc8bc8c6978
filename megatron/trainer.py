"""The trainer: build everything from the config, then `fit()` — a loop meant to be read top to bottom.

config → layout (process groups) → tokenizer → model (PipelineModule) → DeepSpeed engine → data → train/eval/save.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from megatron import grad_accum_fusion
from megatron.checkpoint.manager import CheckpointManager
from megatron.config.deepspeed_config import deepspeed_config
from megatron.config.schema import NeoXConfig
from megatron.data.data_utils import Packing, build_train_valid_test_datasets, make_data_loader, train_samples_needed
from megatron.data.lm_batches import GlobalTokenBatches
from megatron.data.lm_batches import lm_batches as _lm_batches
from megatron.data.packing import packing_summaries, plan_label_epochs
from megatron.data.tokenizer import build_tokenizer
from megatron.eval import in_training
from megatron.guards import BadStepGuard, ExitConditions, injected_nan_steps, injected_step_delay
from megatron.metrics import MetricSinks, StepTimer, flops_per_token, format_step, max_over_ranks, peak_memory_gib
from megatron.model.config import LlamaConfig
from megatron.model.llama import build_model
from megatron.optim import build_optimizer, build_scheduler, lr_at
from megatron.parallel.layout import ParallelLayout
from megatron.profiling import PhaseTimes, StepProfiler, gather_stage_phases, install_phase_timers


def _packing_ids(cfg) -> tuple[int, int | None]:
    """(EOD, end-of-message) ids for whole-document packing (padding, and where long conversations are cut)."""
    tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.vocab_file)
    return tokenizer.eod_id, getattr(tokenizer, "eot_id", None)


class Trainer:
    def __init__(self, cfg: NeoXConfig, run_dir: str):
        import deepspeed

        self.user_cfg, self.run_dir = cfg, run_dir  # as written (and saved in checkpoints)
        world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        self.layout = ParallelLayout.from_world(cfg.tp, cfg.pp, world, rank)
        backend = cfg.distributed_backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        self.layout.initialize(backend=backend, seed=cfg.seed, num_kv_heads=cfg.kv_heads, verbose=True)
        # Same seed on every TP/DP rank of a stage (init is seeded per layer anyway); stages differ, as in Megatron.
        self._seed_everything(cfg.seed + 100 * self.layout.pp_rank)

        self.global_batch = cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * self.layout.dp
        self.epoch_data = self.label_epochs = None
        if cfg.train_epochs is not None and cfg.train_label_data_paths:  # epochs of whole conversations (SFT)
            self.label_epochs = plan_label_epochs(cfg, self.global_batch, *_packing_ids(cfg))
            cfg = cfg.model_copy(update={"train_iters": self.label_epochs.train_iters()})
        elif cfg.train_epochs is not None:
            # Epoch-based runs (with or without replay) know their length only once the samples are planned; the
            # schedule needs it, so plan before the engine. The derived train_iters stays out of saved configs.
            from megatron.data.replay import build_epoch_datasets

            self.epoch_data = build_epoch_datasets(
                cfg, self.global_batch, replay_valid_num_samples=max(1, cfg.eval_iters) * self.global_batch)
            cfg = cfg.model_copy(update={"train_iters": self.epoch_data.plan.train_iters()})
        self.cfg = cfg

        self.precision = cfg.resolved_precision
        self.tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.vocab_file)
        if cfg.vocab_size and cfg.vocab_size < self.tokenizer.vocab_size and self.layout.rank == 0:
            print(f"note: vocab_size {cfg.vocab_size} is below the tokenizer's {self.tokenizer.vocab_size}: a token id "
                  f">= {cfg.vocab_size} in the data fails at TP 1 and trains on a masked row at TP > 1", flush=True)
        # Fusing the weight-gradient accumulation needs the fp32 buffer of DeepSpeed's bf16 optimizer.
        fuse_grads = grad_accum_fusion.applies(cfg.gradient_accumulation_fusion, self.precision,
                                               cfg.data_types.grad_accum_dtype)
        self.model_cfg = LlamaConfig.from_neox(cfg, cfg.vocab_size or self.tokenizer.vocab_size, torch.float32,
                                               eod_token_id=self.tokenizer.eod_id,
                                               gradient_accumulation_fusion=fuse_grads)
        model = build_model(self.model_cfg, self.layout, cfg.pipe_partition_method)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, cfg),
            lr_scheduler=build_scheduler(cfg),
            config=deepspeed_config(cfg, self.layout.dp, self.precision),
        )
        fusion_note = None
        if fuse_grads:
            n = grad_accum_fusion.attach(self.engine.optimizer, grad_accum_fusion.fused_weights(self.engine.module))
            device = next(self.engine.module.parameters()).device
            fusion_note = f"gradient accumulation fusion: {n} weights, {grad_accum_fusion.describe(device)}"
        elif cfg.gradient_accumulation_fusion is True:
            fusion_note = f"gradient accumulation fusion: off ({self.precision} run, no fp32 bf16-optimizer buffer)"
        self.iteration = 0
        self.consumed_samples = 0
        self.is_logger = rank == 0
        self.sinks = MetricSinks(
            enabled=self.is_logger, run_dir=run_dir, tensorboard_dir=cfg.tensorboard_dir, use_wandb=cfg.use_wandb,
            wandb_kwargs={"project": cfg.wandb_project, "group": cfg.wandb_group, "entity": cfg.wandb_team},
            config=cfg.to_yaml_dict(),
        )
        if fusion_note:
            self.sinks.print(fusion_note)
        if self.epoch_data is not None:
            for line in self.epoch_data.plan.summary_lines():
                self.sinks.print(line)
        self.checkpoints = CheckpointManager(cfg, self.engine, self.layout, self.model_cfg, self.sinks.print,
                                             config_to_save=self.user_cfg)
        if cfg.load or cfg.save:  # a restarted job continues from its own latest save (CheckpointManager.load)
            loaded = self.checkpoints.load()
            if loaded is not None:
                self.iteration, self.consumed_samples = loaded.iteration, loaded.consumed_samples
        self.sinks.resume_history(self.iteration)
        self._set_schedule_step(self.iteration)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.exit = ExitConditions(cfg.exit_interval, cfg.exit_duration_in_mins, cfg.save_on_signal, device)
        self.guard = BadStepGuard(cfg.max_bad_steps, cfg.loss_spike_factor)
        self._install_nan_injection(injected_nan_steps())
        self.step_delay = injected_step_delay()
        self.phase_times = None
        if cfg.log_phase_times:
            install_phase_timers(self.engine)
            self.phase_times = PhaseTimes(self.engine)
        self.profiler = StepProfiler(cfg, run_dir, rank, self.sinks.print if self.is_logger else (lambda m: None))
        self._build_data()
        self.mcq = in_training.build(self)  # mcq_eval: the knowledge curve (None without it)
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

    def _set_schedule_step(self, iteration: int) -> None:
        """The lr schedule is a pure function of the step and the config, so resume sets it rather than loading it
        (override_lr_scheduler decides whether a changed schedule is accepted: see CheckpointManager)."""
        sched = self.engine.lr_scheduler
        groups = sched.optimizer.param_groups
        for group in groups:
            group["initial_lr"], group["lr"] = self.cfg.lr, lr_at(iteration, self.cfg)
        sched.base_lrs = [self.cfg.lr] * len(groups)
        sched.last_epoch = iteration
        sched._last_lr = [g["lr"] for g in groups]

    def _install_nan_injection(self, steps: set[int]) -> None:
        """Tests only (NEOX_INJECT_NAN_STEPS): turn the loss into NaN at the given steps to exercise the guard."""
        if not steps:
            return
        module, loss_fn = self.engine.module, self.engine.module.loss_fn

        def poisoned(output, labels):
            loss = loss_fn(output, labels)
            return loss * float("nan") if self.iteration + 1 in steps else loss

        module.loss_fn = poisoned

    def _data_state(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def _build_data(self) -> None:
        cfg = self.cfg
        epochs = self.epoch_data is not None
        # What the steps left need: a checkpoint saved with another global batch consumed its samples at that
        # batch, so train_iters x this run's batch may be too few (a smaller batch now) for the steps left.
        train_samples = train_samples_needed(cfg.train_iters, self.iteration, self.consumed_samples,
                                             self.global_batch)
        if epochs:
            # The plan's length is fixed by train_epochs: refuse now rather than run out at the end.
            note = self.epoch_data.plan.check_resume(self.consumed_samples, self.iteration, cfg.train_iters,
                                                     self.global_batch)
        elif train_samples > cfg.train_iters * self.global_batch:
            note = (f"note: resumed at step {self.iteration} after {self.consumed_samples:,} samples, with global "
                    f"batch {self.global_batch} now: the training set holds {train_samples:,} samples, enough for "
                    f"the {cfg.train_iters - self.iteration} steps left")
        else:
            note = None
        if note:
            self.sinks.print(note)
        train, valid, _ = build_train_valid_test_datasets(
            train_data_paths=cfg.train_data_paths,
            train_data_weights=self.label_epochs.weights if self.label_epochs else cfg.train_data_weights,
            valid_data_paths=cfg.valid_data_paths, valid_data_weights=cfg.valid_data_weights,
            test_data_paths=cfg.test_data_paths, test_data_weights=cfg.test_data_weights,
            train_label_data_paths=cfg.train_label_data_paths, valid_label_data_paths=cfg.valid_label_data_paths,
            test_label_data_paths=cfg.test_label_data_paths,
            data_path=cfg.data_path, split=cfg.split, seq_length=cfg.seq_length, seed=cfg.seed,
            train_num_samples=0 if epochs else train_samples,
            # The same validation samples every evaluation, so the curve compares like with like.
            valid_num_samples=max(1, cfg.eval_iters) * self.global_batch,
            test_num_samples=0, cache_dir=cfg.data_cache_dir,
            packing=Packing(cfg.resolved_pack_impl, self.tokenizer.eod_id, getattr(self.tokenizer, "eot_id", None)),
        )
        for line in ([self.label_epochs.summary()] if self.label_epochs else []) + packing_summaries(train):
            self.sinks.print(line)
        if epochs:
            train = self.epoch_data.train
        micro, lay = cfg.train_micro_batch_size_per_gpu, self.layout
        # Read a step ahead so each micro-batch's loss is divided by the global batch's loss tokens (per-token loss).
        self.train_iter = GlobalTokenBatches(_lm_batches(
            make_data_loader(train, micro, lay.dp_rank, lay.dp, self.consumed_samples, cfg.num_workers),
            self.tokenizer.eod_id if cfg.eod_mask_loss else None), cfg.gradient_accumulation_steps, lay.dp,
            lay.mpu().get_data_parallel_group() if lay.dp > 1 else None)
        # Validation sets by metric prefix: the domain set, and with replay the general-text set, so forgetting
        # shows directly as valid_replay/loss.
        self.valid_sets = {}
        if cfg.eval_iters > 0:
            if valid is not None:
                self.valid_sets["valid"] = valid
            if epochs and self.epoch_data.replay_valid is not None:
                self.valid_sets["valid_replay"] = self.epoch_data.replay_valid

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        try:
            result = self._fit()
        except BaseException:
            try:
                self.profiler.finish()  # stopped, so the process can exit; a failure here must not hide the first
            except Exception:
                pass
            raise
        self.profiler.finish()  # a window the run cut short is still written
        return result

    def _fit(self) -> dict:
        cfg = self.cfg
        flops_token = flops_per_token(self.model_cfg, cfg.seq_length)
        # Throughput counts training time only: validation and checkpoint saves inside a log window are left out
        # of `window_seconds` (as Megatron stops its interval timer around them).
        timer, window_seconds, window_losses, window_start, last = StepTimer(), 0.0, [], self.iteration, {}
        window_loss_tokens = [0, 0]  # loss tokens, label positions: read by the data iterator, summed over DP
        bar = tqdm(total=cfg.train_iters, initial=self.iteration, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.is_logger and sys.stderr.isatty()))  # log lines suffice in files
        stop_reason = None
        while self.iteration < cfg.train_iters:
            self.profiler.before_step(self.iteration + 1)
            lr = self.engine.get_lr()[0]  # the lr this step's update uses (the scheduler moves on after it)
            loss = self.engine.train_batch(data_iter=self.train_iter).item()  # all micro-batches, then the update
            self.iteration += 1
            window_loss_tokens = [window_loss_tokens[0] + self.train_iter.loss_tokens,
                                  window_loss_tokens[1] + self.train_iter.label_positions]
            # DeepSpeed does not step the scheduler on a skipped update; a resume sets the lr from the step count,
            # so set it that way here too, or a run with skipped steps would resume at another lr.
            self._set_schedule_step(self.iteration)
            self.profiler.after_step(self.iteration)
            self.consumed_samples += self.global_batch
            bar.update(1)
            if self.epoch_data is not None:
                self._log_epoch_boundaries(self.consumed_samples - self.global_batch)
            if self.step_delay:
                time.sleep(self.step_delay)
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
            for message in self.guard.observe(self.iteration, loss, grad_norm):
                self.sinks.print(message)
            if self.guard.should_stop:
                stop_reason = "bad_steps"
                break
            if math.isfinite(loss):
                window_losses.append(loss)

            if self.iteration % cfg.log_interval == 0 or self.iteration == cfg.train_iters:
                seconds, window_seconds = window_seconds + timer.lap(), 0.0
                steps = max(1, self.iteration - window_start)  # skipped steps did their work too
                tokens_per_s = steps * self.global_batch * cfg.seq_length / seconds
                last = {
                    "loss": sum(window_losses) / len(window_losses) if window_losses else float("nan"),
                    "lr": lr,
                    "grad_norm": grad_norm if grad_norm is not None else 0.0,
                    "tokens_per_s": tokens_per_s,
                    "tflops_per_gpu": flops_token * tokens_per_s / self.layout.world_size / 1e12,
                    "peak_mem_gib": max_over_ranks(peak_memory_gib()),
                    "consumed_samples": self.consumed_samples,
                    "skipped_steps": self.guard.total_skipped,
                    "loss_tokens": window_loss_tokens[0] / steps,
                    "loss_token_share": window_loss_tokens[0] / max(1, window_loss_tokens[1]),
                }
                if not window_losses:  # every step of the window was skipped: there is no loss to report
                    del last["loss"]
                if self.phase_times is not None:
                    self._log_phase_times(self.phase_times.report(steps))
                self.sinks.log(self.iteration, last)
                if self.is_logger:
                    bar.write(format_step(self.iteration, cfg.train_iters, last))
                window_losses, window_start, window_loss_tokens = [], self.iteration, [0, 0]

            valid_due = bool(self.valid_sets) and (self.iteration % cfg.eval_interval == 0
                                                   or self.iteration == cfg.train_iters)
            eval_due = valid_due or (self.mcq is not None and self.mcq.due(self.iteration))
            save_due = self._save_due()
            if eval_due or save_due:
                window_seconds += timer.lap()
                if self.phase_times is not None:
                    self.phase_times.collect()
                if eval_due:
                    self.evaluate(valid_due)
                if save_due:
                    self.save()
                timer.lap()  # neither is training throughput
                if self.phase_times is not None:
                    self.phase_times.discard()
            stop_reason = self.exit.check(self.iteration)
            if stop_reason:
                break
        bar.close()
        if stop_reason == "bad_steps":
            return self._stop_on_bad_steps()
        if cfg.save:
            self.save()  # no-op if this step was just saved
        if stop_reason:
            self.sinks.print(f"stopping at step {self.iteration}: {stop_reason}; checkpoint saved, exiting cleanly")
        train_losses = [(r["step"], r["train/loss"]) for r in self.sinks.history if "train/loss" in r]
        if len(train_losses) > 1:
            (first_step, first), (last_step, final) = train_losses[0], train_losses[-1]
            drop = 100.0 * (1.0 - final / first)
            self.sinks.print(f"training loss {first:.4f} (step {first_step}) -> {final:.4f} (step {last_step}), "
                             f"{drop:.1f}% lower")
        plot = self.sinks.plot()
        if plot:
            self.sinks.print(f"loss and learning-rate curves: {plot}")
        self.sinks.close()
        return last

    def _log_phase_times(self, phases: dict[str, float]) -> None:
        """Each pipeline stage's phases (its first TP/DP rank's): the last stage holds the loss and the logits,
        the first waits longest for gradients, so one stage's numbers would misdescribe the others."""
        per_stage = gather_stage_phases(self.layout, phases)
        if per_stage is None:
            return
        for stage, stage_phases in enumerate(per_stage):
            prefix = f"phase/stage{stage}" if len(per_stage) > 1 else "phase"
            where = f"stage {stage} " if len(per_stage) > 1 else ""
            self.sinks.log(self.iteration, stage_phases, prefix=prefix)
            self.sinks.print(f"{where}phases (ms/step): "
                             + " | ".join(f"{k[:-3]} {v:.1f}" for k, v in stage_phases.items()))

    def _save_due(self) -> bool:
        cfg = self.cfg
        if not cfg.save:
            return False
        return bool((cfg.checkpoint_factor and self.iteration % cfg.checkpoint_factor == 0)
                    or (cfg.extra_save_iters and self.iteration in cfg.extra_save_iters))

    def _stop_on_bad_steps(self) -> dict:
        """Every bad step's update was skipped, so the weights are still those from before the fault: save them
        (with the data position past the bad batches) and stop with a message saying what to do."""
        g, start = self.guard, self.checkpoints.resumed_from
        where = ""
        if g.first_bad_step == start + 1:  # no finite step since the start: the loaded weights themselves are bad
            where = (f" No step since the start (step {start}) was finite, so nothing was saved: check the loaded "
                     "checkpoint (tools/ckpts/inspect_checkpoint.py --verify) and the data.")
        elif self.cfg.save:
            path = self.save()
            where = f" The weights from before the fault are saved in {path}."
        message = (f"stopping: {g.consecutive} consecutive steps ({g.first_bad_step}..{self.iteration}) had a "
                   f"non-finite loss or gradient norm (max_bad_steps {g.max_bad_steps}).{where} Lower the learning "
                   f"rate (override_lr_scheduler: true) or skip the data, then resume.")
        self.sinks.print(message)
        self.sinks.close()
        raise TrainingDiverged(message)

    def evaluate(self, validation: bool = True) -> dict:
        """The validation sets' loss (when `validation`) and the in-training MCQ when due (megatron/eval)."""
        return in_training.evaluate(self, validation)

    def _log_epoch_boundaries(self, previous_consumed: int) -> None:
        plan = self.epoch_data.plan
        for summary in plan.completed_between(previous_consumed, self.consumed_samples):
            self.sinks.print(summary.format(len(plan.epochs)))
            self.sinks.log(self.iteration, summary.metrics(), prefix="epoch")

    # ------------------------------------------------------------------ checkpoints
    def save(self):
        return self.checkpoints.save(self.iteration, self.consumed_samples, self._data_state())


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; train.py turns it into exit code 3."""
