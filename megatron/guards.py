"""What stops a run early: signals and time limits (save and exit 0), and bad steps (skip, then stop).

Ranks must agree on stopping, or some would wait forever in a collective the others never enter: the stop flag is
all-reduced (MAX) over the world every step, which costs one tiny collective.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import deque
from typing import Optional

import torch


class ExitConditions:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit), exit_duration_in_mins and exit_interval."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, exit_interval: Optional[int], exit_duration_in_mins: Optional[float], handle_signals: bool,
                 device: torch.device):
        self.exit_interval = exit_interval
        self.deadline = time.monotonic() + 60 * exit_duration_in_mins if exit_duration_in_mins else None
        self.device = device
        self.received: Optional[int] = None
        if handle_signals:
            for sig in self.SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = signum  # acted on at the end of the current step, so the step's state is consistent

    def check(self, iteration: int) -> Optional[str]:
        """The reason to stop after `iteration`, agreed by all ranks, or None."""
        local = 0
        if self.received is not None:
            local = 1
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            local = 2
        flag = torch.tensor([local], dtype=torch.int32, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        reason = int(flag.item())
        if reason == 1:
            name = signal.Signals(self.received).name if self.received else "a signal"
            return f"received {name} (on at least one rank)"
        if reason == 2:
            return "exit_duration_in_mins reached"
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"exit_interval {self.exit_interval} reached"
        return None


class BadStepGuard:
    """Counts steps whose loss or gradient norm is NaN/Inf (their update was skipped) and watches for loss spikes."""

    def __init__(self, max_bad_steps: int, spike_factor: float, window: int = 100):
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.recent = deque(maxlen=window)
        self.consecutive = 0
        self.total_skipped = 0
        self.first_bad_step: Optional[int] = None

    def observe(self, step: int, loss: float, grad_norm: Optional[float]) -> list[str]:
        """Messages to log for this step; `should_stop` tells whether the run must end."""
        bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        if bad:
            self.consecutive += 1
            self.total_skipped += 1
            self.first_bad_step = self.first_bad_step or step
            return [f"step {step}: non-finite loss {loss} / grad norm {grad_norm}: update skipped "
                    f"({self.consecutive} in a row, {self.total_skipped} in total)"]
        self.consecutive, self.first_bad_step = 0, None
        messages = []
        if self.recent and loss > self.spike_factor * max(self.recent):
            messages.append(f"loss spike at step {step}: {loss:.4f} > {self.spike_factor:g} x {max(self.recent):.4f} "
                            f"(the highest of the last {len(self.recent)} steps)")
        self.recent.append(loss)
        return messages

    @property
    def should_stop(self) -> bool:
        return self.consecutive >= self.max_bad_steps


def injected_nan_steps() -> set[int]:
    """Fault injection for tests: NEOX_INJECT_NAN_STEPS=5,6 makes the loss NaN at those (1-based) steps."""
    raw = os.environ.get("NEOX_INJECT_NAN_STEPS", "")
    return {int(s) for s in raw.split(",") if s.strip()}


def injected_step_delay() -> float:
    """Fault injection for tests: NEOX_FAULT_STEP_SLEEP=seconds slows every step, so a signal lands mid-run."""
    return float(os.environ.get("NEOX_FAULT_STEP_SLEEP", "0") or 0)
