"""Stop conditions and bad-step accounting, unit level (the multi-process behaviour is in
tests/distributed/test_checkpoints.py)."""

import os
import signal
import time

import torch

from megatron.guards import BadStepGuard, ExitConditions


def test_exit_duration_interval_and_signal():
    cpu = torch.device("cpu")
    assert ExitConditions(None, None, False, cpu).check(5) is None
    assert ExitConditions(3, None, False, cpu).check(6) == "exit_interval 3 reached"
    timed = ExitConditions(None, 1e-4, False, cpu)  # 6 ms
    time.sleep(0.02)
    assert timed.check(1) == "exit_duration_in_mins reached"
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        waiting = ExitConditions(None, None, True, cpu)
        assert waiting.check(1) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert waiting.check(2) == "received SIGUSR1 (on at least one rank)"
    finally:
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_bad_steps_are_counted_and_consecutive_ones_stop():
    g = BadStepGuard(max_bad_steps=2, spike_factor=3.0)
    assert g.observe(1, 2.0, 1.0) == []
    assert "update skipped (1 in a row, 1 in total)" in g.observe(2, float("nan"), None)[0]
    assert not g.should_stop
    assert g.observe(3, 1.9, 0.5) == [] and g.consecutive == 0  # a good step resets the run of bad ones
    g.observe(4, 1.8, float("inf"))
    g.observe(5, float("inf"), 1.0)
    assert g.should_stop and g.first_bad_step == 4 and g.total_skipped == 3


def test_loss_spikes_are_reported_against_the_recent_maximum():
    g = BadStepGuard(max_bad_steps=5, spike_factor=2.0, window=3)
    for step, loss in enumerate([3.0, 2.0, 1.5, 1.2], start=1):
        assert g.observe(step, loss, 1.0) == []
    # The window now holds 2.0, 1.5, 1.2: 4.5 > 2 x 2.0 is a spike, 3.9 is not.
    assert g.observe(5, 3.9, 1.0) == []
    spike = g.observe(6, 8.0, 1.0)
    assert spike and "loss spike at step 6" in spike[0]
