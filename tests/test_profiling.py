"""Profiling and metric bookkeeping in process: the profiler window, the phase-time window, the metric history a
resumed run continues (the 2-stage end-to-end test runs the phase timers inside a real pipeline)."""

import json
import types

import pytest
import torch
from deepspeed.utils.timer import SynchronizedWallClockTimer

from megatron.metrics import MetricSinks
from megatron.profiling import PhaseTimes, StepProfiler


def profiler_cfg(start, stop):
    return types.SimpleNamespace(profile=True, profile_step_start=start, profile_step_stop=stop,
                                 profile_memory_snapshot=True)


def run_steps(profiler, steps):
    for step in steps:
        profiler.before_step(step)
        torch.ones(64, 64).matmul(torch.ones(64, 64))  # something to trace
        profiler.after_step(step)


def test_profiler_window_cut_short_by_the_end_of_the_run_is_still_written(tmp_path):
    logs = []
    profiler = StepProfiler(profiler_cfg(3, 9), str(tmp_path), rank=0, log=logs.append)
    assert "profile_memory_snapshot: skipped, there is no CUDA device" in logs[0]  # said, not silently dropped
    run_steps(profiler, range(1, 5))  # the run ends at step 4, inside the window 3..9
    assert not (tmp_path / "profile" / "trace_rank0.json").exists()
    profiler.finish()
    assert json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())["traceEvents"]
    assert (tmp_path / "profile" / "top_kernels_rank0.txt").read_text().strip()
    assert "profiled steps 3..4 (the run ended before profile_step_stop 9)" in logs[-1]
    profiler.finish()  # nothing left to stop
    assert len(logs) == 2


def test_profiler_window_closes_at_its_last_step_and_resumes_inside_it(tmp_path):
    logs = []
    profiler = StepProfiler(profiler_cfg(2, 3), str(tmp_path / "a"), rank=1, log=logs.append)
    run_steps(profiler, range(1, 6))
    assert logs[-1].startswith("profiled steps 2..3:") and profiler.prof is None
    assert (tmp_path / "a" / "profile" / "trace_rank1.json").exists()
    run_steps(profiler, range(2, 4))  # the window is profiled once
    assert len(logs) == 2

    resumed = StepProfiler(profiler_cfg(2, 5), str(tmp_path / "b"), rank=0, log=logs.append)
    run_steps(resumed, range(4, 7))  # resumed from a checkpoint at step 3: steps 4..5 are left of the window
    assert logs[-1].startswith("profiled steps 4..5:")


def add(timers, name, seconds):
    """A finished timing of `seconds` in DeepSpeed's host-timer form (what its timers hold on CPU)."""
    timers(name).event_timers.append(seconds)


def test_phase_times_leave_validation_out_and_say_what_no_phase_covers():
    timers = SynchronizedWallClockTimer()
    phases = PhaseTimes(types.SimpleNamespace(timers=timers))
    for _ in range(2):  # two training steps
        add(timers, "train_batch", 0.100)
        add(timers, "forward", 0.020)
        add(timers, "loss", 0.010)
        add(timers, "bwd", 0.050)
        add(timers, "reduce_grads", 0.005)
        add(timers, "step", 0.008)
    phases.collect()
    add(timers, "forward", 0.500)  # evaluation: its forward passes, loss and data run the same timers
    add(timers, "loss", 0.300)
    add(timers, "batch_input", 0.200)
    phases.discard()
    add(timers, "train_batch", 0.100)  # a third training step after the evaluation
    add(timers, "forward", 0.020)
    add(timers, "loss", 0.010)
    add(timers, "bwd", 0.050)
    add(timers, "reduce_grads", 0.005)
    add(timers, "step", 0.008)
    out = phases.report(steps=3)
    assert out == pytest.approx({"data_ms": 0.0, "forward_ms": 20.0, "loss_ms": 10.0, "backward_ms": 50.0,
                                 "grad_allreduce_ms": 5.0, "optimizer_ms": 8.0, "step_ms": 100.0, "other_ms": 7.0})
    assert set(phases.report(steps=1).values()) == {0.0}  # a new window starts empty


def write_records(path, steps):
    with open(path, "w") as f:
        for step, prefix in steps:
            f.write(json.dumps({"step": step, f"{prefix}/loss": float(step), f"{prefix}/lr": 1e-3}) + "\n")
        f.write('{"step": 9')  # a line cut short by a crash


def test_a_resumed_run_continues_the_history_it_resumed_from(tmp_path):
    # Steps 1..6 logged, then a run rolled back to step 2's checkpoint logged 3..4 (the older 3..6 are void),
    # with a validation record at step 4; now resuming from step 3's checkpoint.
    write_records(tmp_path / "metrics.jsonl", [(1, "train"), (2, "train"), (3, "train"), (4, "train"),
                                               (5, "train"), (6, "train"), (3, "train"), (4, "train"), (4, "valid")])
    sinks = MetricSinks(True, str(tmp_path), None, False, {}, {})
    sinks.resume_history(3)
    assert [(r["step"], list(r)[1]) for r in sinks.history] == [(1, "train/loss"), (2, "train/loss"),
                                                                (3, "train/loss")]
    sinks.log(4, {"loss": 0.5, "lr": 1e-4})
    assert [r["step"] for r in sinks.history] == [1, 2, 3, 4]
    assert sinks.plot().exists()
    sinks.close()


def test_history_steps_written_as_strings_are_read_as_numbers(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": "2"}\n{"step": 1}\n')  # a foreign or edited file
    sinks = MetricSinks(True, str(tmp_path), None, False, {}, {})
    sinks.resume_history(5)
    assert [r["step"] for r in sinks.history] == [1]  # the second run from step 1 supersedes steps 1..2
    sinks.close()
