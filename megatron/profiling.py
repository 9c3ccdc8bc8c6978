"""Profiling runs: a torch.profiler window over chosen steps (Chrome trace + top-kernels table), a CUDA memory
snapshot, and a per-phase wall-clock breakdown from DeepSpeed's engine timers.

Outputs land in RUN_DIR/profile/: trace_rank{R}.json (chrome://tracing or ui.perfetto.dev),
top_kernels_rank{R}.txt, memory_snapshot_rank{R}.pickle (drag into pytorch.org/memory_viz).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Optional

import torch

# Timer names in the engine's timer set -> the phase names this project logs. DeepSpeed's pipeline engine times
# the data, backward, optimizer step and point-to-point transfers itself; install_phase_timers adds the forward
# pass, the loss (computed outside the module's forward on the last stage) and the data-parallel gradient
# reductions (DeepSpeed 0.19's pipeline engine runs them untimed). A stage that waits for its neighbour waits in
# pipe_recv_input (forward) or pipe_recv_grad (backward): the pipeline bubble is inside those two.
PHASES = {
    "batch_input": "data", "forward": "forward", "loss": "loss", "bwd": "backward",
    "reduce_grads": "grad_allreduce", "step": "optimizer",
    "pipe_send_output": "pipe_send_output", "pipe_recv_input": "pipe_recv_input",
    "pipe_send_grad": "pipe_send_grad", "pipe_recv_grad": "pipe_recv_grad",
}
STEP_TIMER = "train_batch"  # the whole train_batch: the phases above plus what no timer covers ("other")


def _timed(timer, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def run(*args, **kwargs):
        timer.start()
        try:
            return fn(*args, **kwargs)
        finally:
            timer.stop()

    return run


def install_phase_timers(engine) -> None:
    """Time the module's forward passes, the loss and the gradient reductions into the engine's timer set (as
    DeepSpeed's own timers do), keep DeepSpeed from starting its backward timers twice on pipeline stages before
    the last, and keep the ZeRO optimizer from printing its timers every step.

    There (DeepSpeed 0.19) the pipeline engine starts the backward timers itself, then calls `tensor.backward`,
    whose engine hook starts the same timers again and fails ("timer has already been started"). The pipeline
    engine's own start/stop spans the whole backward, so the hook's are dropped on those stages."""
    forward = engine.timers("forward")
    engine.module.register_forward_pre_hook(lambda module, args: forward.start())
    engine.module.register_forward_hook(lambda module, args, output: forward.stop())
    last_stage = not hasattr(engine, "is_last_stage") or engine.is_last_stage()
    if last_stage and getattr(engine.module, "loss_fn", None) is not None:
        engine.module.loss_fn = _timed(engine.timers("loss"), engine.module.loss_fn)
    instructions = getattr(type(engine), "_INSTRUCTION_MAP", None)
    if instructions is not None:
        # The schedule runs each instruction as MethodType(self._INSTRUCTION_MAP[type(cmd)], self): an instance
        # copy of the map with timed reductions leaves the class, and every other engine, alone.
        from deepspeed.runtime.pipe import schedule

        timed = dict(instructions)
        timed[schedule.ReduceGrads] = _timed(engine.timers("reduce_grads"), instructions[schedule.ReduceGrads])
        engine._INSTRUCTION_MAP = timed
    if not last_stage:
        engine.engine_timers.backward_timers = []
        engine.engine_timers.backward_inner_timers = []
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "timers", None) is engine.timers:
        # wall_clock_breakdown hands the engine's timers to the ZeRO optimizer, which then prints and resets its
        # own three on every step, whatever log_interval says; the engine's "step" timer already covers them.
        from deepspeed.utils.timer import NoopTimer

        optimizer.timers = NoopTimer()


class PhaseTimes:
    """Sums the engine's phase timers over a log window of training steps; validation is left out.

    The timers run in eval_batch too (data, forward, loss, pipeline transfers), but train_batch's does not, so
    evaluation's share is read off and dropped (`discard`) rather than reported as part of training steps."""

    def __init__(self, engine):
        self.timers = getattr(engine, "timers", None)
        self.sums: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        known = self.timers.get_timers() if self.timers is not None and hasattr(self.timers, "get_timers") else {}
        return {name: known[name].elapsed(reset=True) for name in (*PHASES, STEP_TIMER) if name in known}

    def collect(self) -> None:
        """Add what the timers hold to this window (call before something that must not count)."""
        for name, ms in self._read().items():
            self.sums[name] = self.sums.get(name, 0.0) + ms

    def discard(self) -> None:
        """Drop what the timers hold (call after evaluation)."""
        self._read()

    def report(self, steps: int) -> dict[str, float]:
        """Mean milliseconds per training step of each phase in this window, then start a new window.

        `other` is train_batch's time outside every phase: DeepSpeed's schedule bookkeeping, the loss broadcast
        and the fp32 gradient hand-over; with pipelining, the bubble itself is inside the pipe_recv phases."""
        self.collect()
        sums, self.sums = self.sums, {}
        out = {f"{phase}_ms": sums[name] / max(1, steps) for name, phase in PHASES.items() if name in sums}
        if STEP_TIMER in sums:
            total = sums[STEP_TIMER] / max(1, steps)
            out["step_ms"] = total
            out["other_ms"] = max(0.0, total - sum(out[f"{p}_ms"] for p in PHASES.values() if f"{p}_ms" in out))
        return out


class StepProfiler:
    """torch.profiler over steps profile_step_start..profile_step_stop (inclusive), exported when the window
    closes, or when the run ends first (`finish`): a profiler left running at exit crashes the process."""

    def __init__(self, cfg, run_dir: str, rank: int, log: Callable[[str], None]):
        self.enabled = cfg.profile
        self.start, self.stop = cfg.profile_step_start, cfg.profile_step_stop
        self.memory = cfg.profile_memory_snapshot and torch.cuda.is_available()
        self.dir = Path(run_dir) / "profile"
        self.rank, self.log = rank, log
        self.prof = None
        self.first: Optional[int] = None  # the first step profiled
        self.last: Optional[int] = None  # the last step completed inside the window
        self.done = False
        if self.enabled and cfg.profile_memory_snapshot and not self.memory:
            log("profile_memory_snapshot: skipped, there is no CUDA device (the trace and table are still written)")

    def before_step(self, step: int) -> None:
        """`step` is the 1-based number of the step about to run. A run resumed inside the window profiles the
        rest of it; one resumed past it profiles nothing."""
        if not self.enabled or self.done or self.prof is not None or not self.start <= step <= self.stop:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.start()
        self.first = step

    def after_step(self, step: int) -> None:
        if self.prof is None:
            return
        self.last = step
        if step >= self.stop:
            self._export()

    def finish(self) -> None:
        """The run is ending: export a window it cut short (or stop one it stopped inside a step)."""
        if self.prof is not None:
            self._export()

    def _export(self) -> None:
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
        if self.last is None:
            what = f"profiled part of step {self.first} (the run stopped inside it)"
        else:
            what = f"profiled steps {self.first}..{self.last}"
            if self.last < self.stop:
                what += f" (the run ended before profile_step_stop {self.stop})"
        self.log(f"{what}: {trace}\n{table}")
        self.prof, self.done = None, True


def gather_stage_phases(layout, phases: dict[str, float]) -> Optional[list[dict[str, float]]]:
    """On global rank 0: every pipeline stage's phases, from each stage's first TP/DP rank; None elsewhere.

    Called on every rank at the same step; only the first TP/DP rank of each stage takes part (those ranks are
    one of the pipeline groups, the one holding rank 0, in DeepSpeed's and megatron-core's shared ordering)."""
    if layout.pp == 1:
        return [phases] if layout.rank == 0 else None
    if layout.tp_rank != 0 or layout.dp_rank != 0:
        return None
    from megatron.core import parallel_state

    gathered = [None] * layout.pp if layout.rank == 0 else None
    torch.distributed.gather_object(phases, gathered, dst=0,
                                    group=parallel_state.get_pipeline_model_parallel_group())
    return gathered
