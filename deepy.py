#!/usr/bin/env python
"""Launcher, as in GPT-NeoX:  python deepy.py train.py CONFIG.yml [MORE.yml ...]

1. Merge the YAML files in order (later files override earlier ones; each override is printed).
2. Validate everything before any process starts; on problems print them all and exit 2.
3. Write the resolved config to RUN_DIR/config.yml.
4. Start the workers with DeepSpeed's runner (`--hostfile`, `--num_nodes`, `--num_gpus`, `--include`,
   `--exclude`, `--launcher` pass through from the config). Without GPUs it starts `num_gpus` CPU processes
   that talk over gloo, so every distributed path runs on a laptop too.
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
from megatron.config.schema import NeoXConfig  # noqa: E402


def cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def runner_command(cfg: NeoXConfig, script: str, config_path: Path, run_dir: Path, gpus: int) -> list[str]:
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if cfg.hostfile:
        launcher = "slurm" if cfg.deepspeed_slurm else cfg.launcher  # GPT-NeoX's deepspeed_slurm means srun
        cmd += ["--hostfile", cfg.hostfile, "--launcher", launcher]
        if cfg.num_nodes > 0:
            cmd += ["--num_nodes", str(cfg.num_nodes)]
    else:
        # No hostfile: one node. DeepSpeed would otherwise look for /job/hostfile.
        cmd += ["--hostfile", os.devnull]
    if cfg.num_gpus or not gpus:
        cmd += ["--num_gpus", str(cfg.num_gpus or 1)]
    if cfg.include:
        cmd += ["--include", cfg.include]
    if cfg.exclude:
        cmd += ["--exclude", cfg.exclude]
    if cfg.master_addr:
        cmd += ["--master_addr", cfg.master_addr]
    if cfg.comment:
        cmd += ["--comment", cfg.comment]
    cmd += ["--master_port", str(cfg.master_port)]
    cmd += [script, "--config", str(config_path), "--run-dir", str(run_dir)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="the worker script, normally train.py")
    parser.add_argument("configs", nargs="+", help="YAML files, merged in order")
    parser.add_argument("-d", "--conf_dir", default=None, help="directory the config names are relative to")
    parser.add_argument("--dry-run", action="store_true", help="validate, write the config, print the command")
    args = parser.parse_args(argv)

    paths = [os.path.join(args.conf_dir, c) if args.conf_dir else c for c in args.configs]
    gpus = cuda_device_count()
    # generate.py is one process (its model may span a node's GPUs) validated by the generation rules.
    generating = Path(args.script).name == "generate.py"
    try:
        loaded = load_config(paths, available_devices=gpus or None, purpose="generate" if generating else "train")
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

    run_dir = Path(cfg.run_dir or os.path.join("runs", Path(paths[-1]).stem))
    config_path = save_resolved(cfg, run_dir / "config.yml")
    print(f"resolved config: {config_path}")
    cmd = runner_command(cfg, args.script, config_path.resolve(), run_dir.resolve(), gpus)
    if generating:
        cmd = [sys.executable, "-u", args.script, "--config", str(config_path.resolve()), "--run-dir",
               str(run_dir.resolve())]
    print("launch: " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    if not gpus:
        # CPU ranks share the cores: without this each rank starts one thread per core and they thrash.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.world_size())))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, env=env)
    forward_stop_signals(proc, Path(args.script).name)
    return proc.wait()


def forward_stop_signals(proc: subprocess.Popen, script: str) -> None:
    """SIGTERM/SIGUSR1 to this launcher reach the workers as SIGUSR1: they save a checkpoint and exit 0.

    DeepSpeed's local launcher would kill its children on SIGTERM, losing the work since the last save; the
    workers themselves handle both signals (under SLURM, srun delivers them to every task directly)."""
    import signal

    def forward(signum, frame):
        import psutil  # a DeepSpeed dependency

        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                if any(part.endswith(script) for part in child.cmdline()):
                    child.send_signal(signal.SIGUSR1)
            except psutil.Error:
                pass
        print(f"deepy: forwarded {signal.Signals(signum).name} to the workers; they save and exit", flush=True)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)


if __name__ == "__main__":
    sys.exit(main())
