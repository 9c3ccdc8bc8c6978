"""The one object that owns the parallel layout.

It is the only caller of `megatron.core.parallel_state` and of DeepSpeed's topology, and it checks that the two
agree on which rank holds which (pipe, data, tensor) coordinate. Everything else asks it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

# Groups this module creates beyond megatron-core's: {"kv": this rank's group of TP ranks sharing a kv head}.
_GROUPS: dict[str, object] = {}


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

    def initialize(self, backend: str, seed: int, timeout_minutes: int = 30, num_kv_heads: Optional[int] = None,
                   verbose: bool = False) -> None:
        """Start torch.distributed (via DeepSpeed) and megatron-core's groups, then prove the layouts agree.

        With `num_kv_heads` < TP, also create the groups of TP ranks that share one kv head (see kv_group_ranks).
        """
        import deepspeed
        from megatron.core import parallel_state, tensor_parallel

        if not dist.is_initialized():
            _skip_cpu_inference_allreduce_op()
            deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp
            )
        self.check_all_ranks_agree(verbose)
        self._create_kv_groups(num_kv_heads)
        # Dropout inside TP regions must differ across TP ranks and agree across DP ranks: megatron-core's tracker.
        if torch.cuda.is_available():
            tensor_parallel.model_parallel_cuda_manual_seed(seed)

    def check_all_ranks_agree(self, verbose: bool = False) -> None:
        """Every rank checks its own coordinates, then all ranks see every verdict (so all fail together)."""
        try:
            self.check_agrees_with_megatron()
            verdict = None
        except RuntimeError as err:
            verdict = str(err)
        verdicts = [None] * self.world_size
        dist.all_gather_object(verdicts, (verdict, (self.tp_rank, self.pp_rank, self.dp_rank)))
        bad = [v for v, _ in verdicts if v]
        if len({coord for _, coord in verdicts}) != self.world_size:
            bad.append(f"coordinates are not a bijection of the ranks: {[c for _, c in verdicts]}")
        if bad:
            raise RuntimeError("; ".join(bad))
        if verbose and self.rank == 0:
            print(f"layout {self.describe()}: megatron-core and DeepSpeed agree on the (tp, pp, dp) coordinates "
                  f"of all {self.world_size} ranks", flush=True)

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

    # ---- GQA: kv heads replicated when TP > num_kv_heads ----
    def kv_group_ranks(self, num_kv_heads: int) -> list[list[int]]:
        """Every group of global ranks that share one kv head: TP/num_kv_heads consecutive TP ranks of one
        (pipe, data) slice. Empty when TP <= num_kv_heads (each rank then owns whole kv heads).

        The model splits each shared kv head's k/v rows over its group and all-gathers them in the forward pass,
        so the backward pass sums the gradient contributions of the ranks sharing the head (see
        megatron.model.layers.Attention) and every k/v weight element lives on exactly one TP rank."""
        if self.tp <= num_kv_heads:
            return []
        r = self.tp // num_kv_heads
        groups = []
        for pp in range(self.pp):
            for dp in range(self.dp):
                base = (pp * self.dp + dp) * self.tp
                groups += [[base + h * r + i for i in range(r)] for h in range(num_kv_heads)]
        return groups

    def _create_kv_groups(self, num_kv_heads: Optional[int]) -> None:
        _GROUPS.pop("kv", None)
        for ranks in self.kv_group_ranks(num_kv_heads or self.tp):
            group = dist.new_group(ranks)  # collective: every rank creates every group, in the same order
            if self.rank in ranks:
                _GROUPS["kv"] = group

    # ---- the `mpu` object DeepSpeed's activation checkpointing wants ----
    def mpu(self):
        """megatron-core's parallel_state answers DeepSpeed's mpu questions (model parallel = TP here)."""
        from megatron.core import parallel_state as ps

        class _Mpu:
            get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
            get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
            get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
            get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
            get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
            get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
            get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
            get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
            get_data_parallel_group = staticmethod(ps.get_data_parallel_group)

        return _Mpu()

    @staticmethod
    def destroy() -> None:
        from megatron.core import parallel_state

        _GROUPS.clear()
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def kv_group():
    """This rank's group of TP ranks sharing a kv head, or None when kv heads are not shared."""
    return _GROUPS.get("kv")


def _skip_cpu_inference_allreduce_op() -> None:
    """Keep DeepSpeed's CPU backend from building its shared-memory all-reduce op.

    On CPU, `deepspeed.init_distributed` JIT-compiles a C++ op (about a minute on 2 cores, the first time on each
    machine, and only where a C++ compiler exists) and maps a 66 MiB /dev/shm buffer per rank that it never removes.
    The op serves DeepSpeed's inference all-reduce alone; training reduces through torch.distributed (gloo), so the
    build buys nothing here. DeepSpeed has no switch for it, hence the patch of its builder (pinned 0.19.x;
    tests/test_imports.py fails if the function moves, rather than the compile silently coming back)."""
    if torch.cuda.is_available():
        return
    # By module name: the package attribute `deepspeed.comm.torch` is torch itself, not this module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


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
