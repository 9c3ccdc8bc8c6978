"""RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from whatever launcher started this worker.

DeepSpeed's per-node launch (local and pdsh launches) and its MPICH helper set them already. srun and OpenMPI's
mpirun start the workers themselves and only set their own variables; GPT-NeoX maps them in
`configure_distributed_args` (SLURM_*) or asks mpi4py. Without the mapping DeepSpeed falls back to MPI discovery and
dies on a missing mpi4py. Called first thing in train.py, before anything reads the rank.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

# (rank, local rank, world size) as each launcher names them; the first complete set wins.
LAUNCHER_VARS = (
    ("slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("mpich", "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ("mvapich", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_SIZE"),
)


def map_launcher_env(env: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Fill the torch.distributed variables from the launcher's; returns the launcher found (None: nothing to do,
    the variables were set already or this is a single process)."""
    env = os.environ if env is None else env
    if env.get("RANK") is not None and env.get("WORLD_SIZE") is not None:
        return None
    for name, rank, local, size in LAUNCHER_VARS:
        if env.get(rank) is not None and env.get(size) is not None:
            env["RANK"], env["WORLD_SIZE"] = env[rank], env[size]
            env["LOCAL_RANK"] = env.get(local, "0")
            if name == "slurm" and not env.get("MASTER_ADDR"):
                env["MASTER_ADDR"] = first_slurm_host(env)
            env.setdefault("MASTER_PORT", "29500")
            if not env.get("MASTER_ADDR"):
                raise RuntimeError(f"started by {name} without MASTER_ADDR: deepy.py exports it (master_addr, or "
                                   "the hostfile's first host); set master_addr in the config")
            return name
    return None


def first_slurm_host(env: MutableMapping[str, str]) -> str:
    from megatron.launcher import expand_hostlist

    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    hosts = expand_hostlist(nodelist)
    return hosts[0] if hosts else ""
