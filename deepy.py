#!/usr/bin/env python
"""Launcher, as in GPT-NeoX:  python deepy.py train.py CONFIG.yml [MORE.yml ...]

1. Merge the YAML files in order (later files override earlier ones; each override is printed).
2. Validate everything before any process starts; on problems print them all and exit 2.
3. Write the resolved config to RUN_DIR/config.yml.
4. Start the workers with DeepSpeed's runner on one node, or through pdsh, srun (`launcher: slurm` /
   `deepspeed_slurm`) or mpirun (`openmpi`, `mpich`): megatron/launcher.py builds the command, docs/multinode.md
   explains it. Without GPUs it starts `num_gpus` CPU processes that talk over gloo, so every distributed path
   runs on a laptop too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

from megatron.config import ConfigError, load_config, save_resolved  # noqa: E402
from megatron.launcher import LaunchError, forward_stop_signals, plan_launch  # noqa: E402


# What a GPU driver leaves on a machine (NVIDIA: the proc entry, the control device, WSL's /dev/dxg; AMD ROCm: the
# KFD device). Without any of them torch would find no device, and importing it only to learn that costs ~1 s of
# every launch and of every refused config.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def cuda_device_count() -> int:
    if not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return 0
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


# Entry scripts that run as one process with their own config rules (not the training launch).
SINGLE_PROCESS = {"generate.py": "generate", "eval.py": "eval"}
OVERRIDES = ("eval_tasks", "eval_results_prefix", "iteration", "sample_input_file", "sample_output_file",
             "wandb_group", "wandb_team", "hostfile")


def with_suffix(path: str) -> str:
    """GPT-NeoX accepts `125M` for `125M.yml`."""
    if not os.path.exists(path) and not path.endswith((".yml", ".yaml", ".json")) and os.path.exists(path + ".yml"):
        return path + ".yml"
    return path


def entry_script(script: str) -> str | None:
    """The script to run: as given when it exists from here, else the one in this checkout (GPT-NeoX users write
    `train.py` wherever they stand); None when neither exists."""
    if os.path.isfile(script):
        return script
    in_root = os.path.join(ROOT, script)
    return in_root if not os.path.isabs(script) and os.path.isfile(in_root) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="the worker script, normally train.py")
    parser.add_argument("configs", nargs="+", help="YAML files, merged in order")
    parser.add_argument("-d", "--conf_dir", default=None, help="directory the config names are relative to")
    parser.add_argument("--dry-run", action="store_true", help="validate, write the config, print the command")
    # GPT-NeoX's deepy.py options: each overrides the config key of the same name (printed as an override).
    neox = parser.add_argument_group("GPT-NeoX overrides")
    neox.add_argument("--eval_tasks", nargs="+", default=None, help="eval.py: lm-eval tasks")
    neox.add_argument("--eval_results_prefix", default=None, help="eval.py: results file prefix")
    neox.add_argument("--iteration", type=int, default=None, help="eval.py / generate.py: step to load "
                      "(load_iteration); default the latest")
    neox.add_argument("-i", "--sample_input_file", default=None, help="generate.py: prompt file")
    neox.add_argument("-o", "--sample_output_file", default=None, help="generate.py: output file")
    neox.add_argument("--wandb_group", default=None)
    neox.add_argument("--wandb_team", default=None)
    neox.add_argument("-H", "--hostfile", default=None)
    args = parser.parse_args(argv)
    script = entry_script(args.script)
    if script is None:  # before the config is read: a typo must not launch DeepSpeed or touch the run folder
        looked = " and ".join(dict.fromkeys([os.getcwd(), ROOT]))
        print(f"Launch error; nothing was launched:\n  - entry script {args.script!r} not found (looked in {looked})"
              "\n    fix: name train.py, generate.py or eval.py, or the path of your own script", file=sys.stderr)
        return 2
    args.script = script

    paths = [with_suffix(os.path.join(args.conf_dir, c) if args.conf_dir else c) for c in args.configs]
    overrides = {k: v for k, v in vars(args).items() if k in OVERRIDES and v is not None}
    if "iteration" in overrides:
        overrides["load_iteration"] = overrides.pop("iteration")
    gpus = cuda_device_count()
    # generate.py and eval.py are one process (the model may span a node's GPUs), validated by their own rules.
    purpose = SINGLE_PROCESS.get(Path(args.script).name, "train")
    single_process = purpose != "train"
    try:
        loaded = load_config(paths, extra=overrides, available_devices=gpus or None, purpose=purpose)
    except ConfigError as err:
        print(err.format(), file=sys.stderr)
        return 2
    cfg = loaded.config
    if cfg.hostfile and not args.dry_run and not Path(cfg.hostfile).is_file():
        print(f"{loaded.sources.get('hostfile')}: hostfile = {cfg.hostfile!r}: file not found; nothing was launched\n"
              "    fix: write one line `HOST slots=GPUS` per node (under SLURM: scontrol show hostnames "
              "$SLURM_JOB_NODELIST | sed 's/$/ slots=8/' > hostfile)", file=sys.stderr)
        return 2
    for line in loaded.overrides:
        print(f"override  {line}")
    for line in loaded.notes:
        print(f"info  GPT-NeoX {line}")
    from megatron.preflight import before_launch  # data, checkpoint and run-lock checks on disk (exit 2 if bad)

    # generate.py / eval.py read `load` (a checkpoint or an HF folder) and write no checkpoint: their loader checks
    # the model.
    if not single_process and before_launch(cfg, loaded.sources, dry_run=args.dry_run):
        return 2

    run_dir = Path(cfg.run_dir or os.path.join("runs", Path(paths[-1]).stem))
    config_path = (run_dir / "config.yml").resolve()
    try:
        launch = plan_launch(cfg, args.script, config_path, run_dir.resolve(), gpus, ROOT, dry_run=args.dry_run)
    except LaunchError as err:
        print(f"Launch error; nothing was launched:\n  - {loaded.sources.get('launcher', paths[-1])}: {err}",
              file=sys.stderr)
        return 2
    save_resolved(cfg, config_path)
    print(f"resolved config: {config_path}")
    if single_process:  # one process: transformers places the model itself (device_map), no DeepSpeed runner
        launch.cmd = [sys.executable, "-u", args.script, "--config", str(config_path), "--run-dir",
                      str(run_dir.resolve())]
    for note in launch.notes:
        print(f"note: {note}")
    print("launch: " + shlex.join(launch.cmd), flush=True)
    if args.dry_run:
        return 0
    proc = subprocess.Popen(launch.cmd, env=launch.env)
    forward_stop_signals(proc, launch, args.script, str(config_path))
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
