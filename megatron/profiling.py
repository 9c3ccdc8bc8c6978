"""Profiling runs: a torch.profiler window over chosen steps (Chrome trace + top-kernels table), a CUDA memory
snapshot, and a per-phase wall-clock breakdown from DeepSpeed's engine timers.

Outputs land in RUN_DIR/profile/: trace_rank{R}.json (chrome://tracing or ui.perfetto.dev),
top_kernels_rank{R}.txt, memory_snapshot_rank{R}.pickle (drag into pytorch.org/memory_viz).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

# DeepSpeed's engine timer names -> the phase names this project logs.
# (The pipeline engine times no forward pass itself: ForwardTimer below does.)
PHASES = {
    "batch_input": "data", "forward": "forward", "bwd": "backward", "bwd_allreduce": "grad_allreduce",
    "step": "optimizer", "pipe_send_output": "pipe_send_output", "pipe_recv_input": "pipe_recv_input",
    "pipe_send_grad": "pipe_send_grad", "pipe_recv_grad": "pipe_recv_grad",
}


def install_phase_timers(engine) -> None:
    """Time the module's forward passes into the engine's timer set (as DeepSpeed's own timers do, synchronised),
    and keep DeepSpeed from starting its backward timers twice on pipeline stages before the last.

    There (DeepSpeed 0.19) the pipeline engine starts the backward timers itself, then calls `tensor.backward`,
    whose engine hook starts the same timers again and fails ("timer has already been started"). The pipeline
    engine's own start/stop spans the whole backward, so the hook's are dropped on those stages."""
    timer = engine.timers("forward")
    engine.module.register_forward_pre_hook(lambda module, args: timer.start())
    engine.module.register_forward_hook(lambda module, args, output: timer.stop())
    if hasattr(engine, "is_last_stage") and not engine.is_last_stage():
        engine.engine_timers.backward_timers = []
        engine.engine_timers.backward_inner_timers = []


class StepProfiler:
    def __init__(self, cfg, run_dir: str, rank: int, log: Callable[[str], None]):
        self.enabled = cfg.profile
        self.start, self.stop = cfg.profile_step_start, cfg.profile_step_stop
        self.memory = cfg.profile_memory_snapshot and torch.cuda.is_available()
        self.dir = Path(run_dir) / "profile"
        self.rank, self.log = rank, log
        self.prof = None

    def before_step(self, step: int) -> None:
        """`step` is the 1-based number of the step about to run."""
        if not self.enabled or step != self.start:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.start()

    def after_step(self, step: int) -> None:
        if self.prof is None or step < self.stop:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.stop()
        trace = self.dir / f"trace_rank{self.rank}.json"
        self.prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
        (self.dir / f"top_kernels_rank{self.rank}.txt").write_text(table)
        if self.memory:
            torch.cuda.memory._dump_snapshot(str(self.dir / f"memory_snapshot_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        self.log(f"profiled steps {self.start}..{self.stop}: {trace}\n{table}")
        self.prof = None


def phase_times_ms(engine, steps: int) -> dict:
    """Mean milliseconds per step of each phase since the last call (DeepSpeed's wall_clock_breakdown timers).

    `other` is the train_batch time not covered by a phase: pipeline bubbles and waits, mostly."""
    timers = getattr(engine, "timers", None)
    known = timers.get_timers() if timers is not None and hasattr(timers, "get_timers") else {}
    out = {}
    for name, phase in PHASES.items():
        if name in known:
            out[f"{phase}_ms"] = known[name].elapsed(reset=True) / max(1, steps)
    if "train_batch" in known:
        total = known["train_batch"].elapsed(reset=True) / max(1, steps)
        covered = sum(v for k, v in out.items() if k != "grad_allreduce_ms")  # that one is inside backward
        out["step_ms"] = total
        out["other_ms"] = max(0.0, total - covered)
    return out
