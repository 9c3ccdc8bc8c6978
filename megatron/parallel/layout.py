"""The one object that owns the parallel layout.

It is the only caller of `megatron.core.parallel_state` and of DeepSpeed's topology, and it checks that the two
agree on which rank holds which (pipe, data, tensor) coordinate. Everything else asks it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    tp: int
    pp: int
    dp: int
    rank: int

    # ---- construction ----
    @classmethod
    def from_world(cls, tp: int, pp: int, world_size: int, rank: int) -> "ParallelLayout":
        if tp < 1 or pp < 1 or world_size % (tp * pp):
            raise ValueError(f"world size {world_size} is not a multiple of TP {tp} x PP {pp}")
        return cls(tp=tp, pp=pp, dp=world_size // (tp * pp), rank=rank)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    # ---- coordinates (DeepSpeed's [pipe, data, model] order, model fastest) ----
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return f"TP {self.tp} x PP {self.pp} x DP {self.dp} = {self.world_size} ranks"

    # ---- process groups ----
    def ds_topology(self):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)

    def initialize(self, backend: str, seed: int, timeout_minutes: int = 30) -> None:
        """Start torch.distributed (via DeepSpeed) and megatron-core's groups, then prove the layouts agree."""
        import deepspeed
        from megatron.core import parallel_state, tensor_parallel

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp
            )
        self.check_agrees_with_megatron()
        # Dropout inside TP regions must differ across TP ranks and agree across DP ranks: megatron-core's tracker.
        if torch.cuda.is_available():
            tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def check_agrees_with_megatron(self) -> None:
        from megatron.core import parallel_state as ps

        ours = (self.tp_rank, self.pp_rank, self.dp_rank)
        theirs = (
            ps.get_tensor_model_parallel_rank(),
            ps.get_pipeline_model_parallel_rank(),
            ps.get_data_parallel_rank(),
        )
        topo = self.ds_topology().get_coord(self.rank)
        deepspeed_coord = (topo.model, topo.pipe, topo.data)
        if not (ours == theirs == deepspeed_coord):
            raise RuntimeError(
                f"rank {self.rank}: layout disagreement (tp, pp, dp): ours {ours}, megatron-core {theirs}, "
                f"DeepSpeed {deepspeed_coord}"
            )

    @staticmethod
    def destroy() -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def single_process_layout(backend: str = "gloo", seed: int = 1234, port: Optional[int] = None) -> ParallelLayout:
    """A 1-rank world, for tests and tools that build the model outside a launcher."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port or 29511))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    layout = ParallelLayout(tp=1, pp=1, dp=1, rank=0)
    layout.initialize(backend=backend, seed=seed)
    return layout
