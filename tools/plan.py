#!/usr/bin/env python3
"""Plan a run from its config: parameters, memory per GPU by pipeline stage, bubble, FLOPs, step and run time.

    python tools/plan.py configs/astrosage70b_cpt.yml --gpu mi250x
    python tools/plan.py configs/llama3.1-70b.yml my_run.yml --gpus 64 --gpu h100 --tp 8 --pp 2

The YAML files merge and validate as in deepy.py (model presets may leave data and train_iters to a run file).
--gpus/--tp/--pp/--micro-batch/--checkpoint evaluate another layout with the same global batch. When the layout
does not fit, the nearest one that does is suggested (on the same GPUs, else the smallest multiple of them).
Exit status: 0; 1 with --strict when the layout does not fit; 2 when the config or a flag's value is invalid
(counts and rates must be above 0, --mfu at most 1).
The model behind the numbers: docs/planning.md.

On a machine with one CUDA GPU, --measure runs 3 optimizer steps of the config (TP = PP = DP = 1) through the
trainer's own pieces and prints the measured peak next to the prediction; --record appends it to
benchmarks/results/memory_measurements.json, the file tests/test_plan.py validates the planner against.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing

from megatron.config import ConfigError  # noqa: E402
from megatron import planning  # noqa: E402


def _changes(new: planning.Layout, old: planning.Layout, batch: int | None = None) -> dict[str, int | bool | str]:
    """The config keys to write for `new`, where it differs from the evaluated layout `old`; train_batch_size
    where the global batch differs from the config's `batch` (default: old's), which an evaluated layout may
    already have changed (alternative_layout's note). The GPU count is not a key: see format_suggestions."""
    keys: dict[str, int | bool | str] = {}
    if new.tp != old.tp:
        keys["model_parallel_size"] = new.tp
    if new.pp != old.pp:
        keys["pipe_parallel_size"] = new.pp
    if new.micro != old.micro:
        keys["train_micro_batch_size_per_gpu"] = new.micro
    if new.gas != old.gas:
        keys["gradient_accumulation_steps"] = new.gas
    if new.global_batch != (old.global_batch if batch is None else batch):  # a config that sets it would refuse
        keys["train_batch_size"] = new.global_batch
    if new.checkpoint != old.checkpoint:
        keys["checkpoint_activations"] = new.checkpoint
    if new.checkpoint and new.checkpoint_layers != old.checkpoint_layers:  # the search plans every layer's
        keys["checkpoint_num_layers"] = new.checkpoint_layers
    if new.partition != old.partition:
        keys["partition_activations"] = new.partition
    if new.selective != old.selective:  # the config refuses selective without checkpointing or with partitioning
        keys["recompute_granularity"] = "selective" if new.selective else "full"
    return keys


def _yaml_pairs(keys: dict[str, int | bool | str]) -> str:
    return ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items())


def format_suggestions(plan: planning.Plan, found: list[planning.Plan], more_gpus: int | None,
                       batch: int | None = None) -> str:
    """The suggested layouts with the keys to set; `batch`: the config's global batch (default the plan's)."""
    batch = plan.layout.global_batch if batch is None else batch
    if not found:
        return (f"No layout of TP (divisors of {plan.gpu.per_node}) x PP (divisors of {plan.shape.layers} layers) "
                f"fits {plan.gpu.name}, up to {max(plan.gpus, planning.MAX_SEARCH_GPUS):,} GPUs.")
    where = f"on {more_gpus:,} GPUs (none fits on {plan.gpus:,})" if more_gpus else f"on the same {plan.gpus:,} GPUs"
    lines = [f"Nearest layouts that fit {where}:"]
    for i, p in enumerate(found):
        head = "  -> " if i == 0 else "     "
        lines.append(f"{head}{p.layout.describe()}")
        lines.append(f"       peak {p.peak_gib:.1f} GiB allocated, {p.device_gib:.1f} GiB of {p.gpu.memory_gib:.0f} on "
                     f"the device (stage {p.worst.stage}); step {planning._duration(p.step_seconds)}, bubble "
                     f"{100 * p.bubble:.0f}%")
        keys = _changes(p.layout, plan.layout, batch)
        gpus = f"; num_gpus x num_nodes = {p.gpus:,}" if p.gpus != plan.gpus else ""
        lines.append(f"       set: {_yaml_pairs(keys) or '(nothing)'}{gpus}")
        if "train_batch_size" in keys:
            lines.append(f"       note: the global batch becomes {p.layout.global_batch}, not the config's {batch} "
                         f"(DP {p.layout.dp}, micro-batch x accumulation {p.layout.micro} x {p.layout.gas})")
    return "\n".join(lines)


RECORDS = str(planning.MEMORY_RECORDS)


def measure(cfg, steps: int = 3) -> dict:
    """Peak memory of `steps` optimizer steps on this machine's GPU, built exactly as megatron/trainer.py builds
    a run (build_model, build_optimizer, build_scheduler, deepspeed_config, engine.train_batch), on random tokens
    instead of a dataset (memory does not depend on the token values)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--measure needs a CUDA GPU")
    if cfg.tp * cfg.pp != 1:
        raise SystemExit("--measure runs on one GPU: set model_parallel_size and pipe_parallel_size to 1")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    import deepspeed

    from megatron.config.deepspeed_config import deepspeed_config
    from megatron.model.config import LlamaConfig
    from megatron.model.llama import build_model
    from megatron.optim import build_optimizer, build_scheduler
    from megatron.parallel.layout import ParallelLayout

    layout = ParallelLayout.from_world(1, 1, 1, 0)
    layout.initialize(backend="nccl", seed=cfg.seed, num_kv_heads=cfg.kv_heads)
    vocab = cfg.vocab_size or planning.LLAMA3_VOCAB
    model = build_model(LlamaConfig.from_neox(cfg, vocab, torch.float32), layout, cfg.pipe_partition_method)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg),
                                           lr_scheduler=build_scheduler(cfg),
                                           config=deepspeed_config(cfg, 1, cfg.resolved_precision))
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            t = torch.randint(0, vocab, (cfg.train_micro_batch_size_per_gpu, cfg.seq_length + 1), generator=gen)
            yield t[:, :-1].contiguous(), t[:, 1:].contiguous()

    data, seconds = batches(), []
    for _ in range(steps):  # Adam's state appears in step 1's optimizer step: the peak is reached from step 2 on
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.train_batch(data_iter=data)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    free, total = torch.cuda.mem_get_info()
    return {
        "measured_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "measured_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        "measured_device_gib": round((total - free) / 2**30, 3),
        "metric": "torch.cuda.max_memory_allocated",
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "steps": steps,
        "step_seconds": round(seconds[-1], 3),
        "commit": planning.code_version(),
    }


def _positive(kind: type):
    """An argparse type for a count or rate that must be above zero (argparse names the flag in its error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"not {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value
    return parse


def _fraction(text: str) -> float:
    value = _positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"is a share of the peak, in (0, 1], not {text} (for TFLOP/s use --tflops)")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="YAML files, merged in order")
    parser.add_argument("--gpus", type=_positive(int), help="world size (default: num_gpus x num_nodes of the config)")
    parser.add_argument("--gpu", choices=sorted(planning.GPUS), default=planning.DEFAULT_GPU,
                        help=f"device kind (default {planning.DEFAULT_GPU})")
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument("--tflops", type=_positive(float),
                      help="assumed TFLOP/s a GPU computes at outside the bubble, recomputation included")
    rate.add_argument("--mfu", type=_fraction, default=planning.DEFAULT_MFU,
                      help=f"the same as a fraction of the GPU's bf16 peak (default {planning.DEFAULT_MFU})")
    parser.add_argument("--tp", type=_positive(int), help="evaluate this tensor-parallel size instead")
    parser.add_argument("--pp", type=_positive(int), help="evaluate this pipeline-parallel size instead")
    parser.add_argument("--micro-batch", type=_positive(int), help="evaluate this micro-batch size instead")
    parser.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=None,
                        help="evaluate with/without activation checkpointing")
    parser.add_argument("--train-iters", type=_positive(int),
                        help="steps for the run time (when the config derives them from train_epochs at launch)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the layout does not fit")
    parser.add_argument("--measure", action="store_true", help="also measure the peak on this machine's one GPU")
    parser.add_argument("--record", nargs="?", const=RECORDS, metavar="FILE",
                        help=f"with --measure: append the measurement to FILE (default {os.path.relpath(RECORDS)})")
    args = parser.parse_args(argv)

    try:
        loaded = planning.load_for_planning(args.configs)
    except ConfigError as err:
        print(err.format(), file=sys.stderr)
        return 2
    cfg = loaded.config
    for line in loaded.overrides:
        print(f"override  {line}")
    if loaded.placeholders:
        print(f"(run keys not set by these files, not needed for a plan: {', '.join(loaded.placeholders)})")

    gpus = planning.config_world_size(cfg) if args.gpus is None else args.gpus
    layout, notes = planning.alternative_layout(cfg, gpus=gpus, tp=args.tp, pp=args.pp, micro=args.micro_batch,
                                                checkpoint=args.checkpoint)
    gpu = planning.GPUS[args.gpu]
    tflops = args.mfu * gpu.peak_tflops if args.tflops is None else args.tflops
    plan = planning.make_plan(cfg, gpus=gpus, gpu=args.gpu, tflops=tflops, layout=layout)
    plan.notes += notes
    if args.train_iters is not None:
        plan.train_iters, plan.train_epochs = args.train_iters, None
    print(planning.format_plan(plan, title=" + ".join(args.configs)))
    if not plan.fits:
        print()
        batch = planning.configured_global_batch(cfg)  # the hyperparameter, which `plan` may not have kept
        found, more_gpus = planning.suggest(cfg, plan, batch=batch)
        print(format_suggestions(plan, found, more_gpus, batch))
    if args.measure:
        result = measure(cfg)
        predicted = planning.predict_peak_gib(planning.recorded_keys(cfg), 1)
        err = 100 * (predicted / result["measured_peak_gib"] - 1)
        print(f"\nMeasured on {result['device']}: peak {result['measured_peak_gib']:.2f} GiB allocated "
              f"(reserved {result['measured_reserved_gib']:.2f}, device {result['measured_device_gib']:.2f}); "
              f"predicted {predicted:.2f} GiB ({err:+.1f}%)")
        if args.record:
            record = {"config": planning.recorded_keys(cfg), **result, "world_size": 1,
                      "predicted_peak_gib": round(predicted, 3), "date": datetime.date.today().isoformat(),
                      "source": "tools/plan.py --measure " + " ".join(args.configs)}
            planning.append_memory_records([record], args.record)
            print(f"recorded in {args.record}")
    return 1 if args.strict and not plan.fits else 0


if __name__ == "__main__":
    sys.exit(main())
