"""A pretend cluster on one machine: what `srun`, `pdsh` and `mpirun` do, minus the network.

tests/launchers/bin/{srun,pdsh,mpirun} call `main(tool)`. Each "node" is a name from the job's node list or hostfile;
its tasks run here as local processes with exactly the environment the real tool gives them (below), so a worker
that relies on anything else fails here as it would on a cluster. Every call is appended, as JSON, to
$FAKECLUSTER_LOG (argv and the per-task environment the tool added) for the tests to inspect.

srun (SLURM 23.x, inside an allocation: SLURM_JOB_NODELIST, SLURM_JOB_ID set by the test)
  -n N tasks over the allocation's nodes (or --nodes M / --nodelist), block distribution (N/M per node).
  Environment: with --export=ALL[,K=V...] the caller's environment plus K=V (--export=NONE,K=V: only K=V), and
  SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_NPROCS, SLURM_NNODES, SLURM_STEP_NUM_TASKS,
  SLURM_STEP_NUM_NODES, SLURM_STEP_NODELIST, SLURM_TASKS_PER_NODE, SLURMD_NODENAME, SLURM_STEP_ID,
  SLURM_LAUNCH_NODE_IPADDR. SIGUSR1, SIGUSR2, SIGTERM, SIGINT received are forwarded to every task.
  --comment, --gpus-per-node are recorded and otherwise ignored.
pdsh -S -f FANOUT -w h1,h2 CMD...
  Runs `bash -c "CMD"` once per host with %n replaced by the host's index and %h by its name, in the environment of
  a fresh ssh login (HOME, USER, LOGNAME, SHELL, PATH, LANG only): nothing of the caller's environment. Output lines
  are prefixed `host: ` like pdsh's. Signals are not forwarded (pdsh does not). -S: exit with the largest status.
mpirun, OpenMPI flavour (-hostfile F, -x K=V, --mca A B)
  -n N ranks filling each hostfile host's `slots=` in order. Environment: a fresh login environment (orted on a
  remote node) plus each -x variable and OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK,
  OMPI_COMM_WORLD_LOCAL_SIZE, OMPI_COMM_WORLD_NODE_RANK, OMPI_UNIVERSE_SIZE. SIGUSR1/SIGUSR2 are forwarded to
  every rank (OpenMPI documents this); SIGTERM/SIGINT too, which ends them.
mpirun, MPICH/Hydra flavour (-ppn P, -genv K V or -genv K=V, -hosts h1,h2)
  -n N ranks, P per host. Environment: the caller's whole environment (Hydra's default -genvall) plus -genv and
  PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS. SIGUSR1 is forwarded to each rank's direct process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

LOGIN_ENV = ("HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG")


def login_env() -> dict:
    return {k: os.environ[k] for k in LOGIN_ENV if k in os.environ}


def hostlist(spec: str) -> list[str]:
    out = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", spec):
        m = re.match(r"^(.*)\[(\d+)-(\d+)\]$", item)
        out += [f"{m[1]}{i:0{len(m[2])}d}" for i in range(int(m[2]), int(m[3]) + 1)] if m else [item]
    return out


def log(tool: str, argv: list[str], tasks: list[dict]) -> None:
    path = os.environ.get("FAKECLUSTER_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"tool": tool, "argv": argv, "tasks": tasks}) + "\n")


def run_tasks(tool: str, argv: list[str], tasks: list[tuple[list[str], dict, str]], forward: tuple,
              prefix: bool = False) -> int:
    """Start every task (cmd, env, host), forward `forward` signals to all, wait, return the largest status."""
    log(tool, argv, [{"host": h, "cmd": c, "added": {k: v for k, v in e.items() if os.environ.get(k) != v}}
                     for c, e, h in tasks])
    procs = []
    for cmd, env, host in tasks:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if prefix else None,
                             stderr=subprocess.STDOUT if prefix else None, text=prefix)
        procs.append(p)
        if prefix:
            def pump(stream=p.stdout, host=host):
                for line in stream:
                    sys.stdout.write(f"{host}: {line}")
                    sys.stdout.flush()
            threading.Thread(target=pump, daemon=True).start()

    def relay(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in forward:
        signal.signal(sig, relay)
    codes = [p.wait() for p in procs]
    return max((c if c >= 0 else 128 - c) for c in codes) if codes else 0


def srun(argv: list[str]) -> int:
    n, nodes, nodelist, export, i = None, None, None, "ALL", 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        key, _, val = a.partition("=")
        if key in ("-n", "--ntasks", "-N", "--nodes", "--nodelist", "-w", "--comment", "--gpus-per-node") and not val:
            i += 1
            val = argv[i]
        if key in ("-n", "--ntasks"):
            n = int(val)
        elif key in ("-N", "--nodes"):
            nodes = int(val)
        elif key in ("--nodelist", "-w"):
            nodelist = hostlist(val)
        elif key == "--export":
            export = val
        i += 1
    cmd = argv[i:]
    hosts = nodelist or hostlist(os.environ["SLURM_JOB_NODELIST"])
    hosts = hosts[: nodes or len(hosts)]
    n = n or len(hosts)
    per = -(-n // len(hosts))
    parts = export.split(",")
    base = dict(os.environ) if parts[0] == "ALL" else {}
    base.update(dict(p.split("=", 1) for p in parts[1:] if "=" in p))
    counts = [min(per, n - k * per) for k in range(len(hosts))]
    used = [(h, c) for h, c in zip(hosts, counts) if c > 0]
    tasks = []
    for rank in range(n):
        node = rank // per
        env = dict(base)
        env.update({
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per), "SLURM_NODEID": str(node),
            "SLURM_NTASKS": str(n), "SLURM_NPROCS": str(n), "SLURM_NNODES": str(len(used)),
            "SLURM_STEP_NUM_TASKS": str(n), "SLURM_STEP_NUM_NODES": str(len(used)),
            "SLURM_STEP_NODELIST": ",".join(h for h, _ in used), "SLURMD_NODENAME": hosts[node],
            "SLURM_TASKS_PER_NODE": ",".join(str(c) for _, c in used), "SLURM_STEP_ID": "0",
            "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
        })
        tasks.append((cmd, env, hosts[node]))
    return run_tasks("srun", argv, tasks, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT))


def pdsh(argv: list[str]) -> int:
    hosts, i = [], 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in ("-w", "-f", "-R"):
            if argv[i] == "-w":
                hosts = argv[i + 1].split(",")
            i += 2
        else:
            i += 1
    command = " ".join(argv[i:])
    tasks = [(["bash", "-c", command.replace("%n", str(k)).replace("%h", h)], login_env(), h)
             for k, h in enumerate(hosts)]
    return run_tasks("pdsh", argv, tasks, (), prefix=True)


def mpirun(argv: list[str]) -> int:
    hydra = "-ppn" in argv or "-genv" in argv
    n, ppn, hostfile, hosts, extra, i = None, None, None, [], {}, 0
    while i < len(argv) and argv[i].startswith("-"):
        a = argv[i]
        if a in ("-n", "-np"):
            n, i = int(argv[i + 1]), i + 2
        elif a == "-ppn":
            ppn, i = int(argv[i + 1]), i + 2
        elif a in ("-hostfile", "--hostfile"):
            hostfile, i = argv[i + 1], i + 2
        elif a == "-hosts":
            hosts, i = argv[i + 1].split(","), i + 2
        elif a in ("--mca", "-mca"):
            i += 3
        elif a == "-x":
            k, _, v = argv[i + 1].partition("=")
            extra[k] = v if _ else os.environ.get(k, "")
            i += 2
        elif a == "-genv":
            if "=" in argv[i + 1]:
                k, v = argv[i + 1].split("=", 1)
                i += 2
            else:
                k, v = argv[i + 1], argv[i + 2]
                i += 3
            extra[k] = v
        else:
            i += 1
    cmd = argv[i:]
    if hydra:
        slots = [(h, ppn) for h in hosts]
    else:
        slots = []
        for line in open(hostfile):
            line = line.split("#")[0].split()
            if line:
                count = [int(p.split("=")[1]) for p in line[1:] if p.startswith("slots=")]
                slots.append((line[0], count[0] if count else 1))
    placement = [(h, local, node) for node, (h, c) in enumerate(slots) for local in range(c)][:n]
    tasks = []
    for rank, (host, local, node) in enumerate(placement):
        on_node = sum(1 for p in placement if p[0] == host)
        if hydra:
            env = dict(os.environ)
            env.update(extra)
            env.update({"PMI_RANK": str(rank), "PMI_SIZE": str(n), "MPI_LOCALRANKID": str(local),
                        "MPI_LOCALNRANKS": str(on_node)})
        else:
            env = login_env()
            env.update(extra)
            env.update({"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": str(n),
                        "OMPI_COMM_WORLD_LOCAL_RANK": str(local), "OMPI_COMM_WORLD_LOCAL_SIZE": str(on_node),
                        "OMPI_COMM_WORLD_NODE_RANK": str(node), "OMPI_UNIVERSE_SIZE": str(n)})
        env["FAKECLUSTER_HOST"] = host  # lets a test signal one "node" (no real tool sets this)
        tasks.append((cmd, env, host))
    forward = (signal.SIGUSR1,) if hydra else (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
    return run_tasks("mpirun", argv, tasks, forward)


def main(tool: str) -> None:
    sys.exit({"srun": srun, "pdsh": pdsh, "mpirun": mpirun}[tool](sys.argv[1:]))
