"""Multi-node launches on one machine: deepy.py -> DeepSpeed's runner -> fake srun / pdsh / mpirun -> 2 "nodes" x 2
gloo ranks each (tests/launchers/fakecluster.py documents the environment each fake tool gives its tasks).

One 4-rank local run is the reference. The multi-node runs chain through one checkpoint directory so that together
they cover the same 5 steps: pdsh trains from scratch until deepy.py is sent SIGTERM (forwarded with a pdsh pkill
to every node); srun resumes and stops when one node's ranks get SIGUSR1 (as `scancel --signal=USR1` would deliver);
OpenMPI's mpirun and, from a copy of the same checkpoint, MPICH's mpirun each finish the run. Every logged loss must
equal the reference's at the same step (1e-5); each signal must give exactly one new checkpoint and exit status 0
from every rank (the runner returns the largest status of its tool, which returns the largest of its tasks).
Cost: 5 launches of 4 ranks in 3 rounds, about 3 minutes of CPU time.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.test_train_e2e import ROOT, VOCAB, synthetic_corpus

pytestmark = pytest.mark.distributed
BIN = Path(__file__).resolve().parent / "launchers" / "bin"
STEPS = 5


def base_config(tmp: Path, prefix: str, port: int) -> dict:
    tiny = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    return {**tiny, "num_layers": 2, "vocab_size": VOCAB, "seq_length": 32, "max_position_embeddings": 64,
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_iters": STEPS,
            "log_interval": 1, "eval_iters": 0, "eval_interval": 1000, "data_path": prefix, "split": "100,0,0",
            "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}}, "lr_decay_style": "constant", "warmup": 0.0,
            "num_gpus": 2, "master_port": port}


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


class Cluster:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.log = tmp / "fakecluster.jsonl"
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FAKECLUSTER_LOG": str(self.log),
                    "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "DLTS_HOSTFILE"):
            self.env.pop(k, None)
        self.hostfile = tmp / "hostfile"
        self.hostfile.write_text("node0 slots=2\nnode1 slots=2\n")

    def start(self, name: str, cfg: dict, env: dict | None = None) -> subprocess.Popen:
        path = self.tmp / f"{name}.yml"
        path.write_text(yaml.safe_dump({**cfg, "run_dir": str(self.tmp / name)}))
        out = open(self.tmp / f"{name}.out", "w")
        return subprocess.Popen([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], cwd=ROOT,
                                env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)

    def output(self, name: str) -> str:
        return (self.tmp / f"{name}.out").read_text()

    def wait_for_new_step(self, name: str, proc: subprocess.Popen, after: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(s > after for s in losses(self.tmp / name)):
            assert proc.poll() is None, self.output(name)[-4000:]
            assert time.monotonic() < deadline, self.output(name)[-4000:]
            time.sleep(0.05)

    def calls(self, tool: str) -> list[dict]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [c for c in map(json.loads, lines) if c["tool"] == tool]


def workers_on(node_var: str, node: str, config_marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "train.py" in cmd and config_marker in cmd and " -m " not in cmd and "launcher_helper" not in cmd:
                if p.environ().get(node_var) == node:
                    found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launchers")
    prefix = str(tmp / "synthetic_text_document")
    synthetic_corpus(prefix)
    port = 29100 + os.getpid() % 400
    cluster = Cluster(tmp)
    base = base_config(tmp, prefix, port)
    ckpt = str(tmp / "ckpt")
    out = {"cluster": cluster}

    # The reference, 4 ranks on this node (DeepSpeed's local launch), alongside pdsh: 2 "nodes" reached without
    # ssh (no_ssh_check), stopped by SIGTERM to deepy.py once a step is logged (steps slowed so it lands mid-run).
    slow = {"NEOX_FAULT_STEP_SLEEP": "0.5"}
    ref = cluster.start("local", {**base, "num_gpus": 4})
    pdsh = cluster.start("pdsh", {**base, "hostfile": str(cluster.hostfile), "launcher": "pdsh", "no_ssh_check": True,
                                  "master_addr": "127.0.0.1", "master_port": port + 1, "save": ckpt, "load": ckpt},
                         env=slow)
    cluster.wait_for_new_step("pdsh", pdsh, 0)
    pdsh.send_signal(signal.SIGTERM)
    out["pdsh_rc"], out["local_rc"] = pdsh.wait(timeout=300), ref.wait(timeout=300)
    out["after_pdsh"] = sorted(p.name for p in Path(ckpt).glob("global_step*"))

    # srun inside a pretend 2-node allocation, no hostfile (taken from SLURM_JOB_NODELIST); SIGUSR1 to node1 only.
    slurm_env = {**slow, "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_ID": "4242", "MASTER_ADDR": "127.0.0.1"}
    srun = cluster.start("slurm", {**base, "launcher": "slurm", "deepspeed_slurm": True, "num_nodes": 2,
                                   "comment": "astro run 7", "master_port": port + 2, "save": ckpt, "load": ckpt},
                         env=slurm_env)
    resumed_at = max(int(n.removeprefix("global_step")) for n in out["after_pdsh"]) if out["after_pdsh"] else 0
    cluster.wait_for_new_step("slurm", srun, resumed_at)
    config_marker = str((tmp / "slurm" / "config.yml").resolve())
    targets = workers_on("SLURMD_NODENAME", "node1", config_marker)
    out["signalled"] = len(targets)
    for p in targets:
        p.send_signal(signal.SIGUSR1)
    out["slurm_rc"] = srun.wait(timeout=300)
    out["after_slurm"] = sorted(p.name for p in Path(ckpt).glob("global_step*"))

    # OpenMPI's and MPICH's mpirun each finish the run from that save (MPICH from a copy of it), side by side.
    shutil.copytree(ckpt, ckpt + "_mpich")
    mpi = {**base, "hostfile": str(cluster.hostfile), "num_gpus": None, "master_addr": "127.0.0.1"}
    ompi = cluster.start("openmpi", {**mpi, "launcher": "openmpi", "master_port": port + 3, "save": ckpt,
                                     "load": ckpt})
    mpich = cluster.start("mpich", {**mpi, "launcher": "mpich", "master_port": port + 4, "save": ckpt + "_mpich",
                                    "load": ckpt + "_mpich"})
    out["openmpi_rc"], out["mpich_rc"] = ompi.wait(timeout=600), mpich.wait(timeout=600)
    return out


def test_reference_run_exits_0(runs):
    cluster = runs["cluster"]
    assert runs["local_rc"] == 0, cluster.output("local")[-4000:]
    assert sorted(losses(cluster.tmp / "local")) == list(range(1, STEPS + 1))


def test_pdsh_sigterm_saves_once_and_every_rank_exits_0(runs):
    cluster = runs["cluster"]
    assert runs["pdsh_rc"] == 0, cluster.output("pdsh")[-4000:]
    assert len(runs["after_pdsh"]) == 1, runs["after_pdsh"]
    out = cluster.output("pdsh")
    assert "forwarded SIGTERM" in out and "checkpoint saved, exiting cleanly" in out
    launches = [c for c in cluster.calls("pdsh") if "deepspeed.launcher.launch" in " ".join(c["argv"])]
    assert len(launches) == 1 and [t["host"] for t in launches[0]["tasks"]] == ["node0", "node1"]
    stops = [c for c in cluster.calls("pdsh") if "pkill" in c["argv"]]
    assert stops and stops[0]["argv"][stops[0]["argv"].index("-w") + 1] == "node0,node1"


def test_slurm_without_hostfile_uses_the_allocation_and_sigusr1_to_one_node_stops_all(runs):
    cluster = runs["cluster"]
    assert runs["slurm_rc"] == 0, cluster.output("slurm")[-4000:]
    assert runs["signalled"] == 2
    new = set(runs["after_slurm"]) - set(runs["after_pdsh"])
    assert len(new) == 1, (runs["after_pdsh"], runs["after_slurm"])
    (call,) = cluster.calls("srun")
    assert call["argv"][:2] == ["-n", "4"] and "--comment=astro run 7" in call["argv"]
    ranks = sorted((t["added"]["SLURMD_NODENAME"], int(t["added"]["SLURM_PROCID"])) for t in call["tasks"])
    assert ranks == [("node0", 0), ("node0", 1), ("node1", 2), ("node1", 3)]
    hostfile = (cluster.tmp / "slurm" / "hostfile").read_text()
    assert hostfile == "node0 slots=2\nnode1 slots=2\n"
    assert "stopping at step" in cluster.output("slurm")


@pytest.mark.parametrize("last", ["openmpi", "mpich"])
def test_chained_multinode_runs_train_the_reference_losses(runs, last):
    cluster = runs["cluster"]
    assert runs[f"{last}_rc"] == 0, cluster.output(last)[-4000:]
    ref = losses(cluster.tmp / "local")
    chained = {}
    for name in ("pdsh", "slurm", last):
        part = losses(cluster.tmp / name)
        assert part, f"{name} logged no step"
        assert not set(part) & set(chained), (name, part, chained)  # each resumed where the last one saved
        chained.update(part)
    assert sorted(chained) == list(range(1, STEPS + 1))
    for step in chained:
        assert chained[step] == pytest.approx(ref[step], abs=1e-5), (step, chained, ref)
    flavour = "-ppn" if last == "mpich" else "-hostfile"
    (call,) = [c for c in cluster.calls("mpirun") if flavour in c["argv"]]
    assert [t["host"] for t in call["tasks"]] == ["node0", "node0", "node1", "node1"]
    rank_var = "PMI_RANK" if last == "mpich" else "OMPI_COMM_WORLD_RANK"
    assert [t["added"][rank_var] for t in call["tasks"]] == ["0", "1", "2", "3"]
