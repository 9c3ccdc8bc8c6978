"""How `deepy.py` starts the workers: one DeepSpeed runner command for every launcher GPT-NeoX supports.

    single node (no hostfile)   runner -> deepspeed.launcher.launch -> N local workers
    pdsh (hostfile)             runner -> pdsh -w HOSTS -> launch on each host -> workers
    slurm / deepspeed_slurm     runner -> srun -n N -> workers (rank from SLURM_PROCID ..., see parallel/launch_env.py)
    openmpi, mpich, mvapich     runner -> mpirun -> workers (rank from OMPI_* / PMI_*)

DeepSpeed's runner does the launching; this module only decides its arguments, the hostfile (given, DLTS_HOSTFILE,
or written from the SLURM allocation), the rendezvous address, and the environment the remote workers need
(exported through DeepSpeed's own `.deepspeed_env` mechanism, which every launcher honours: pdsh `export`, mpirun
`-x`/`-genv`, srun `--export`). It also forwards stop signals so that every rank on every node saves and exits 0.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from megatron.config.schema import NeoXConfig

MPI_LAUNCHERS = ("openmpi", "mpich", "mvapich", "impi")
# Variables the workers need on every node. pdsh starts them in a fresh ssh login environment and mpirun exports only
# what it is told to, so they travel in the deepspeed_env file (DS_ENV_FILE) that DeepSpeed's runner exports.
WORKER_ENV = ("MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS", "WANDB_MODE", "WANDB_SILENT", "TOKENIZERS_PARALLELISM")


class LaunchError(Exception):
    """A launch that cannot work in this environment (deepy.py prints it and exits 2)."""


@dataclass
class Launch:
    cmd: list[str]
    env: dict[str, str]  # the runner's environment
    launcher: str  # "local" or the multi-node launcher used
    hosts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def expand_hostlist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (`node[001-003,007],gpu7`) as host names, in order (what `scontrol show
    hostnames` prints), so deepy.py works inside an allocation without calling scontrol."""
    hosts, depth, part = [], 0, ""
    for ch in nodelist + ",":
        if ch == "," and depth == 0:
            if part:
                hosts += _expand_one(part)
            part = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        part += ch
    return hosts


def _expand_one(item: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
    if not m:
        return [item]
    prefix, ranges, rest = m.groups()
    out = []
    for r in ranges.split(","):
        lo, _, hi = r.partition("-")
        width = len(lo)
        for i in range(int(lo), int(hi or lo) + 1):
            out += [prefix + str(i).zfill(width) + tail for tail in _expand_one(rest)]
    return out


def _hostfile_hosts(path: str) -> list[str]:
    hosts = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            hosts.append(line.split()[0])
    return hosts


def resolve_hostfile(cfg: NeoXConfig, run_dir: Path, environ: Mapping[str, str], gpus: int,
                     dry_run: bool = False) -> Optional[str]:
    """The hostfile of this launch: the config's, else $DLTS_HOSTFILE (GPT-NeoX and DeepSpeed read it), else, for
    a SLURM launch inside an allocation, one written from SLURM_JOB_NODELIST; None means one node."""
    if cfg.hostfile:
        return cfg.hostfile
    if environ.get("DLTS_HOSTFILE"):
        return environ["DLTS_HOSTFILE"]
    if launcher_name(cfg) != "slurm":
        return None
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        if cfg.num_nodes > 1 and dry_run:
            return str(run_dir / "hostfile")  # what the job will write; the dry run says so
        if cfg.num_nodes > 1:
            raise LaunchError("launcher slurm without a hostfile takes the nodes from the SLURM allocation, but "
                              "SLURM_JOB_NODELIST is not set\n    fix: run deepy.py inside the job (sbatch script or "
                              "salloc), or set hostfile (docs/multinode.md)")
        return None
    slots = cfg.num_gpus or _int(environ.get("SLURM_GPUS_ON_NODE")) or gpus or 1
    path = run_dir / "hostfile"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{host} slots={slots}\n" for host in expand_hostlist(nodelist)))
    return str(path)


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def launcher_name(cfg: NeoXConfig) -> str:
    return "slurm" if cfg.deepspeed_slurm else cfg.launcher  # GPT-NeoX's deepspeed_slurm means srun


def plan_launch(cfg: NeoXConfig, script: str, config_path: Path, run_dir: Path, gpus: int, root: str,
                environ: Optional[Mapping[str, str]] = None, dry_run: bool = False) -> Launch:
    """The DeepSpeed runner command and its environment. Every flag is one of `deepspeed.launcher.runner`'s own
    (tests/test_launchers.py parses each command with its parser)."""
    environ = dict(os.environ if environ is None else environ)
    hostfile = resolve_hostfile(cfg, run_dir, environ, gpus, dry_run)
    launcher = launcher_name(cfg)
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    notes: list[str] = []
    if hostfile and not Path(hostfile).is_file() and launcher == "slurm" and not cfg.hostfile:
        notes.append(f"not inside a SLURM job: in the job, {hostfile} is written from SLURM_JOB_NODELIST and the "
                     "first node is the rendezvous (master_addr)")
    hosts = _hostfile_hosts(hostfile) if hostfile and Path(hostfile).is_file() else []
    if hostfile:
        cmd += ["--hostfile", hostfile, "--launcher", launcher]
        if launcher in MPI_LAUNCHERS:
            notes.append(f"{launcher}: nodes and slots come from the hostfile (DeepSpeed's MPI runners take no "
                         "--num_nodes/--num_gpus)")
        elif cfg.num_nodes > 0:
            cmd += ["--num_nodes", str(cfg.num_nodes)]
        if cfg.no_ssh_check or launcher != "pdsh":
            cmd += ["--no_ssh_check"]  # only pdsh reaches the nodes over ssh; srun and mpirun start them themselves
        if cfg.force_multi:
            cmd += ["--force_multi"]
    else:
        cmd += ["--hostfile", os.devnull]  # one node: DeepSpeed would otherwise look for /job/hostfile
    if launcher not in MPI_LAUNCHERS or not hostfile:
        if cfg.num_gpus or not gpus:
            cmd += ["--num_gpus", str(cfg.num_gpus or 1)]
    if cfg.include:
        cmd += ["--include", cfg.include]
    if cfg.exclude:
        cmd += ["--exclude", cfg.exclude]
    master_addr = cfg.master_addr or environ.get("MASTER_ADDR")
    if not master_addr and hostfile and launcher != "pdsh" and hosts:
        master_addr = hosts[0]  # rank 0 runs on the first host; DeepSpeed would ssh there to ask (pdsh only)
    if master_addr and hostfile:
        cmd += ["--master_addr", master_addr]
    if cfg.comment:
        cmd += ["--launcher_args", shlex.join([f"--comment={cfg.comment}"])]  # srun's own flag
    cmd += ["--master_port", str(cfg.master_port)]
    cmd += [script, "--config", str(config_path), "--run-dir", str(run_dir)]

    env = dict(environ)
    env.setdefault("WANDB_MODE", "offline")
    if not gpus:
        # CPU ranks share the cores: without this each rank starts one thread per core and they thrash.
        per_node = cfg.num_gpus or 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // per_node)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if hostfile:
        env["MASTER_PORT"] = str(cfg.master_port)
        if master_addr:
            env["MASTER_ADDR"] = master_addr
        env["DS_ENV_FILE"] = str(write_worker_env(run_dir, env))
    return Launch(cmd=cmd, env=env, launcher=launcher if hostfile else "local", hosts=hosts, notes=notes)


def write_worker_env(run_dir: Path, env: Mapping[str, str]) -> Path:
    """RUN_DIR/deepspeed_env: DeepSpeed's `.deepspeed_env` format (KEY=VALUE lines), read by its runner through
    DS_ENV_FILE and exported to every node. A user's own ~/.deepspeed_env or ./.deepspeed_env is kept (first)."""
    lines = []
    for base in (Path.home(), Path(".")):
        own = base / ".deepspeed_env"
        if own.is_file():
            lines += [line for line in own.read_text().splitlines() if "=" in line]
    lines += [f"{k}={env[k]}" for k in WORKER_ENV if env.get(k)]
    lines += [f"{k}={v}" for k, v in env.items() if k.startswith("NEOX_")]  # this project's own switches
    path = (run_dir / "deepspeed_env").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _worker_pattern(script: str, config_path: str) -> str:
    """Matches the workers' command lines only (python -u .../train.py ... --config PATH), not the shells, ssh or
    DeepSpeed's per-node launch process around them (SIGUSR1 would kill those)."""
    return rf"^\S*python\S* -u \S*{re.escape(Path(script).name)} .*--config {re.escape(config_path)}( |$)"


def stop_commands(launch: Launch, script: str, config_path: str) -> list[list[str]]:
    """Commands that deliver SIGUSR1 to the workers on the other nodes: with pdsh, a pkill on every host (pdsh does
    not forward signals). srun and mpirun forward SIGUSR1 to every task themselves."""
    if launch.launcher != "pdsh" or not launch.hosts:
        return []
    return [["pdsh", "-S", "-w", ",".join(launch.hosts), "pkill", "-USR1", "-f",
             shlex.quote(_worker_pattern(script, config_path))]]


def forward_stop_signals(proc: subprocess.Popen, launch: Launch, script: str, config_path: str) -> None:
    """SIGTERM/SIGUSR1 to deepy.py reach every worker as SIGUSR1: they agree on the step, save once and exit 0.

    DeepSpeed's runner and launch would kill their children on SIGTERM, losing the work since the last save. The
    workers themselves handle both signals and all-reduce the stop flag (megatron/guards.py), so one rank told is
    enough; still every rank is told, in case a node is slow to reach the next step."""
    pattern = re.compile(_worker_pattern(script, config_path))
    # srun and OpenMPI's mpirun pass SIGUSR1 on to every task. MPICH's mpirun would pass it to DeepSpeed's
    # launcher_helper, which it kills: there only this node's workers are told (the stop flag is all-reduced).
    tools = {"slurm": {"srun"}, "openmpi": {"mpirun", "mpiexec", "orterun", "prterun"}}.get(launch.launcher, set())

    def forward(signum, frame):
        import psutil  # a DeepSpeed dependency

        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                cmdline = child.cmdline()
                tool = any(Path(part).name in tools for part in cmdline[:2])  # a binary, or a script's interpreter
                if pattern.search(" ".join(cmdline)) or tool:
                    child.send_signal(signal.SIGUSR1)  # srun / mpirun pass it on to every task
            except (psutil.Error, IndexError):
                pass
        for cmd in stop_commands(launch, script, config_path):
            # ssh, as DeepSpeed's own pdsh call uses (pdsh's default remote shell may be rsh)
            subprocess.run(cmd, env={**launch.env, "PDSH_RCMD_TYPE": "ssh"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
        print(f"deepy: forwarded {signal.Signals(signum).name} to the workers; they save and exit", flush=True)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
