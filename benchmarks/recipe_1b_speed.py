#!/usr/bin/env python3
"""Tokens/s of the recipe's one-H100 CPT config at Llama-3.2-1B scale (issue 24; docs/recipe.md).

Runs `python deepy.py train.py configs/recipe/llama3.2-1b.yml configs/recipe/h100_1b_cpt.yml OVERRIDES.yml` as
a user would, with only what this machine cannot have replaced: a random init instead of Meta's checkpoint (the
weights do not change the speed), the recipe miniature's corpus (Python's documentation as the domain corpus,
standard-library docstrings as the replay pool, MCQ questions made from the corpus) instead of astronomy papers,
and --steps optimizer steps instead of 2.5 epochs; no checkpoint is saved. Everything else is the config's: seq
4096, micro-batch 4 x 16 accumulation (262k tokens per step), bf16, activation checkpointing, 10% replay, the
knowledge curve's question file. Prints a table (median of the steps after the first two; the planner's peak
memory beside the measured one) and writes --json; --report appends the table to docs/performance.md.

    timeout 400 python benchmarks/recipe_1b_speed.py --steps 8 --json recipe_1b.json

--smoke runs the same chain on the CPU with the tiny model (configs/tiny_cpu.yml's shape, seq 256, fp32) to check
the wiring; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = [ROOT / "configs" / "recipe" / "llama3.2-1b.yml", ROOT / "configs" / "recipe" / "h100_1b_cpt.yml"]
SMOKE = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "intermediate_size": 192,
         "seq_length": 256, "max_position_embeddings": 512, "precision": "fp32", "train_micro_batch_size_per_gpu": 2,
         "gradient_accumulation_steps": 2,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}}


def run(cmd: list, log: Path, timeout: float | None = None) -> None:
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:3]))} exited {proc.returncode}:\n{log.read_text()[-4000:]}")


def build_data(data: Path, workers: int) -> None:
    """The recipe miniature's "corpus" stage (tools/recipe/run_recipe.py --list), with more general text."""
    py = sys.executable
    run([py, ROOT / "tools/datasets/build_demo_replay_corpus.py", "--output-dir", data, "--domain-chars", 400000,
         "--general-chars", 400000, "--general-valid-chars", 40000], data.parent / "corpus.log")
    for part in ("domain", "domain_valid", "general", "general_valid"):
        run([py, ROOT / "tools/datasets/preprocess_data.py", "--input", data / f"{part}.jsonl", "--output-prefix",
             data / part, "--append-eod", "--ftfy", "--workers", workers, "--no-progress"],
            data.parent / f"preprocess_{part}.log")
    run([py, ROOT / "tools/recipe/make_questions.py", "--corpus", data / "domain.jsonl", "--output",
         data / "questions.jsonl", "--shots", data / "shots.jsonl", "--count", 40], data.parent / "questions.log")


def overrides(data: Path, run_dir: Path, steps: int, smoke: bool) -> dict:
    """The run's length stays in epochs (replay is mixed into each epoch, so the config refuses train_iters):
    as many epochs of this small domain corpus as make about `steps` steps of the config's batch."""
    from megatron.data.indexed_dataset import IndexedDataset

    shape = {**yaml.safe_load(CONFIGS[1].read_text()), **(SMOKE if smoke else {})}
    step_tokens = shape["seq_length"] * shape["train_micro_batch_size_per_gpu"] * shape["gradient_accumulation_steps"]
    domain_tokens = IndexedDataset(str(data / "domain_text_document")).num_tokens
    epochs = round(steps * step_tokens * 0.9 / domain_tokens, 3)  # 10% of each step is replay
    keys = {"load": None, "finetune": False, "train_epochs": epochs,
            "train_data_paths": [str(data / "domain_text_document")],
            "valid_data_paths": [str(data / "domain_valid_text_document")],
            "replay": {"data_paths": [str(data / "general_text_document")], "fraction": 0.1, "fresh_each_epoch": True,
                       "valid_data_paths": [str(data / "general_valid_text_document")]},
            "mcq_eval": {"questions": str(data / "questions.jsonl"), "shots": str(data / "shots.jsonl"),
                         "interval": 10 * steps},
            "log_interval": 1, "eval_interval": 10 * steps, "eval_iters": 0, "save": None, "checkpoint_factor": None,
            "run_dir": str(run_dir),
            "tensorboard_dir": None, "use_wandb": False}
    if smoke:
        keys.update(SMOKE)
    return keys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--work", default=None, help="folder for the data and the run (default: a temporary one)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--report", action="store_true", help="append the table to docs/performance.md")
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU: checks the wiring only")
    ap.add_argument("--timeout", type=float, default=None, help="seconds for the training run (killed after)")
    args = ap.parse_args()

    from megatron import planning
    from megatron.config.loader import read_yaml_files

    work = Path(args.work or tempfile.mkdtemp(prefix="recipe_1b_"))
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not (data / "questions.jsonl").exists():
        build_data(data, min(8, os.cpu_count() or 1))
    data_s = time.perf_counter() - t0
    run_dir = work / "run"
    over = work / "overrides.yml"
    over.write_text(yaml.safe_dump(overrides(data, run_dir, args.steps, args.smoke)))
    keys = read_yaml_files([str(p) for p in (*CONFIGS, over)])[0]  # deepy.py validates them below
    planned = planning.predict_peak_gib(keys, 1, what="allocated")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()  # the trainer appends: a rerun must not mix in an earlier run's steps
    t0 = time.perf_counter()
    run([sys.executable, ROOT / "deepy.py", "train.py", *CONFIGS, over], work / "train.log", args.timeout)
    wall = time.perf_counter() - t0
    train = [r for r in map(json.loads, metrics.read_text().splitlines()) if "train/tokens_per_s" in r]
    steady = train[2:] if len(train) > 2 else train

    def med(key):
        return statistics.median(r[key] for r in steady)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else \
        f"CPU ({os.cpu_count()} cores)"
    rec = {"when": time.strftime("%Y-%m-%d %H:%M"), "device": device, "smoke": args.smoke, "steps": len(train),
           "tokens_per_step": keys["seq_length"] * keys["train_micro_batch_size_per_gpu"]
           * keys["gradient_accumulation_steps"],
           "tokens_per_s": med("train/tokens_per_s"), "tflops_per_gpu": med("train/tflops_per_gpu"),
           "peak_mem_gib": max(r["train/peak_mem_gib"] for r in train), "planned_peak_gib": round(planned, 2),
           "final_loss": train[-1]["train/loss"], "data_s": data_s, "train_wall_s": wall,
           "torch": torch.__version__, "python": platform.python_version()}
    lines = [f"## Recipe CPT at Llama-3.2-1B scale on one GPU (benchmarks/recipe_1b_speed.py) ({rec['when']})", "",
             f"`deepy.py train.py configs/recipe/llama3.2-1b.yml configs/recipe/h100_1b_cpt.yml` on {device}: "
             f"random init, the recipe miniature's corpus with 10% replay, {rec['steps']} steps of "
             f"{rec['tokens_per_step']:,} tokens (medians after the first two); torch {rec['torch']}."
             + (" SMOKE RUN (tiny model on the CPU): the numbers mean nothing." if args.smoke else ""), "",
             "| tokens/s | TFLOP/s per GPU | peak memory GiB (planner) | final loss |", "|---:|---:|---:|---:|",
             f"| {rec['tokens_per_s']:,.0f} | {rec['tflops_per_gpu']:.1f} | {rec['peak_mem_gib']:.1f} "
             f"({rec['planned_peak_gib']:.1f}) | {rec['final_loss']:.3f} |", ""]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(rec, indent=2) + "\n")
    if args.report:
        with open(ROOT / "docs" / "performance.md", "a") as f:
            f.write("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
