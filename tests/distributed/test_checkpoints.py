"""Checkpoints you can trust, each checked through deepy.py on real gloo ranks (tiny fp32 model, CPU).

The reference for every resume is an uninterrupted run of the same config: same losses (bitwise where the layout
is unchanged, 1e-5 after resharding), read from metrics.jsonl (JSON keeps a float's exact value).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from megatron.data.indexed_dataset import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 256
STEPS = 8

pytestmark = pytest.mark.distributed


def _corpus(prefix: Path, seed: int, n_docs: int = 150) -> str:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), np.int32) as w:
        for _ in range(n_docs):
            start, step, length = rng.integers(0, VOCAB), rng.integers(1, 5), rng.integers(30, 160)
            w.add_document((start + step * np.arange(length)) % VOCAB)
        w.finalize()
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("ckpt_data")
    # Two sources blended 70/30: resume must continue the blend where it stopped.
    return {"train_data_paths": [_corpus(d / "a_text_document", 1), _corpus(d / "b_text_document", 2)],
            "train_data_weights": [0.7, 0.3], "data_cache_dir": str(d / "cache")}


def _config(tmp: Path, data: dict, layout: tuple[int, int, int], **overrides) -> Path:
    tp, pp, dp = layout
    base = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    global_batch = 8
    cfg = {**base, **data, "vocab_size": VOCAB, "seq_length": 32, "train_micro_batch_size_per_gpu": 2,
           "gradient_accumulation_steps": global_batch // (2 * dp), "model_parallel_size": tp,
           "pipe_parallel_size": pp, "num_gpus": tp * pp * dp, "train_iters": STEPS, "log_interval": 1,
           "eval_iters": 0, "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}}, "warmup": 0.25,
           "min_lr": 3.0e-4, "run_dir": str(tmp / "run"), "save": str(tmp / "ckpt"), "checkpoint_factor": 2,
           "master_port": 29700 + (os.getpid() + hash(str(tmp))) % 250, **overrides}
    path = tmp / "config.yml"
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def _deepy(config: Path, timeout: int = 400, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(config)], cwd=ROOT,
                          env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _losses(tmp: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def _ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def straight_112(tmp_path_factory, data) -> Path:
    """An uninterrupted 8-step run at (1,1,2) saving every 2 steps: the reference of several tests (saving does not
    change the losses)."""
    run = tmp_path_factory.mktemp("straight_112")
    _ok(_deepy(_config(run, data, (1, 1, 2))))
    return run


@pytest.fixture(scope="module")
def small_1rank(tmp_path_factory, data) -> Path:
    """A 4-step one-rank run saving at steps 2 and 4."""
    run = tmp_path_factory.mktemp("small_1rank")
    _ok(_deepy(_config(run, data, (1, 1, 1), train_iters=4)))
    return run


@pytest.mark.parametrize("layout", [(1, 1, 2), (2, 2, 2)], ids=["tp1-pp1-dp2", "tp2-pp2-dp2"])
def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path, data, layout, request):
    if layout == (1, 1, 2):
        src = request.getfixturevalue("straight_112")
    else:
        src = tmp_path / "straight"
        _ok(_deepy(_config(src, data, layout)))
    out = _ok(_deepy(_config(tmp_path / "resumed", data, layout, load=str(src / "ckpt"), load_iteration=4)))
    straight, resumed = _losses(src), _losses(tmp_path / "resumed")
    assert "loaded" in out and "step 4" in out
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]  # bitwise, not approx

    meta = json.loads((src / "ckpt" / "global_step4" / "neox_meta.json").read_text())
    assert meta["iteration"] == 4 and meta["consumed_samples"] == 32 and meta["tokens_seen"] == 32 * 32
    assert meta["layout"] == dict(zip(("tp", "pp", "dp"), layout)) and meta["has_optimizer"]
    assert {"torch", "deepspeed", "megatron-core", "python"} <= set(meta["versions"])
    world = layout[0] * layout[1] * layout[2]
    assert len(list((src / "ckpt" / "global_step4").glob("rng_state_*.pt"))) == world


def straight_221(tmp_path_factory, data) -> Path:
    """An uninterrupted STEPS-step run at (2,2,1) saving every 2 steps, launched once per session: the source of the
    resharding tests below and the reference of test_integrity's kill test at TP 2 x PP 2 (the data fixtures of
    both modules write the same corpora)."""
    src = tmp_path_factory.getbasetemp() / "straight_221"
    if not (src / "ckpt" / f"global_step{STEPS}" / "neox_meta.json").exists():
        _ok(_deepy(_config(src, data, (2, 2, 1))))
    return src


@pytest.mark.parametrize("target", [(1, 1, 2), (1, 2, 2)], ids=["to-tp1-pp1-dp2", "to-tp1-pp2-dp2"])
def test_resume_under_another_layout_matches(tmp_path_factory, data, target):
    # The (2,2,1) source's straight continuation is the unchanged-layout resume (bitwise equal to it, as the test
    # above shows).
    src = straight_221(tmp_path_factory, data)
    tmp = tmp_path_factory.mktemp("reshard")
    out = _ok(_deepy(_config(tmp / "resumed", data, target, load=str(src / "ckpt"), load_iteration=4)))
    assert "resharding" in out and "weights and optimizer state" in out
    straight, resumed = _losses(src), _losses(tmp / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    for s in range(5, 9):
        assert resumed[s] == pytest.approx(straight[s], abs=1e-5), (s, resumed[s], straight[s])


def _spawn(config: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "deepy.py"), "train.py", str(config)], cwd=ROOT,
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(proc: subprocess.Popen, needle: str, timeout: float = 300) -> str:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {needle!r}:\n" + "".join(seen)[-4000:])


def test_sigkill_during_save_resumes_from_previous_checkpoint(tmp_path, data, straight_112):
    layout = (1, 1, 2)
    run = tmp_path / "killed"
    proc = _spawn(_config(run, data, layout), NEOX_FAULT_PAUSE_IN_SAVE="6:120")
    _wait_for(proc, "pausing")  # rank 0 sits inside the save of step 6: every file written, marker not yet
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "ckpt" / "global_step6").is_dir() and not (run / "ckpt" / "global_step6" / "neox_meta.json").exists()
    assert (run / "ckpt" / "latest").read_text() == "global_step4"

    (run / "run" / "metrics.jsonl").unlink()
    out = _ok(_deepy(_config(run, data, layout, load=str(run / "ckpt"))))
    assert "skipping incomplete checkpoint" in out and "global_step4" in out
    straight, resumed = _losses(straight_112), _losses(run)
    assert sorted(resumed) == [5, 6, 7, 8] and [resumed[s] for s in range(5, 9)] == [straight[s] for s in range(5, 9)]


def test_sigterm_saves_exits_zero_and_resume_continues_exactly(tmp_path, data, straight_112):
    layout = (1, 1, 2)
    run = tmp_path / "interrupted"
    proc = _spawn(_config(run, data, layout, checkpoint_factor=None), NEOX_FAULT_STEP_SLEEP="1.0")
    _wait_for(proc, "step      2/")
    os.kill(proc.pid, signal.SIGTERM)  # to deepy.py, as a scheduler would: it forwards to the workers
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    assert "received SIGUSR1" in out and "exiting cleanly" in out
    stopped = int((run / "ckpt" / "latest").read_text().removeprefix("global_step"))
    assert 2 <= stopped < STEPS

    (run / "run" / "metrics.jsonl").unlink()
    _ok(_deepy(_config(run, data, layout, checkpoint_factor=None, load=str(run / "ckpt"))))
    straight, resumed = _losses(straight_112), _losses(run)
    assert sorted(resumed) == list(range(stopped + 1, STEPS + 1))
    assert [resumed[s] for s in resumed] == [straight[s] for s in resumed]


def test_nan_steps_are_skipped_then_stop_the_run_with_a_checkpoint(tmp_path, data):
    # Step 3 alone is skipped and counted; steps 6, 7 and 8 in a row reach max_bad_steps and stop the run.
    proc = _deepy(_config(tmp_path, data, (1, 1, 1), train_iters=12, max_bad_steps=3, checkpoint_factor=None),
                  NEOX_INJECT_NAN_STEPS="3,6,7,8")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-4000:]
    assert "step 3: non-finite loss nan" in out and "update skipped (1 in a row, 1 in total)" in out
    assert "stopping: 3 consecutive steps (6..8) had a non-finite loss" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert 3 not in losses and losses[4] == losses[4] and 6 not in losses  # bad steps are not averaged in
    assert records[-1]["train/skipped_steps"] >= 1
    meta = json.loads((tmp_path / "ckpt" / "global_step8" / "neox_meta.json").read_text())
    assert meta["iteration"] == 8 and meta["skipped_steps"] == 4  # DeepSpeed skipped all four updates
    # The lr follows the step count through skipped updates, as a resume sets it (DeepSpeed alone would lag);
    # each step logs the lr its update used, the schedule's value after the step before.
    from megatron.config.loader import load_resolved
    from megatron.optim import lr_at

    cfg = load_resolved(tmp_path / "run" / "config.yml")
    lrs = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
    assert sorted(lrs) == list(range(1, 8)) and all(  # step 8 stops the run before its log line
        lrs[s] == pytest.approx(lr_at(s - 1, cfg), rel=1e-9) for s in lrs)


def test_loading_a_checkpoint_of_another_shape_is_refused_before_launch(tmp_path, data, small_1rank):
    proc = _deepy(_config(tmp_path / "wide", data, (1, 1, 1), hidden_size=128, num_attention_heads=4,
                          load=str(small_1rank / "ckpt")))
    assert proc.returncode == 2 and "launch:" not in proc.stdout
    err = proc.stderr
    assert "nothing was launched" in err and "hidden_size = 128: " in err, err
    assert "holds a model with hidden_size = 64; the config builds one with 128" in err
    assert "fix: set hidden_size: 64" in err and "Traceback" not in err


def test_inspect_checkpoint_reports_layout_progress_and_config_diff(tmp_path, data, small_1rank, capsys):
    sys.path.insert(0, str(ROOT / "tools" / "ckpts"))
    import inspect_checkpoint

    root = tmp_path / "ckpt"
    shutil.copytree(small_1rank / "ckpt", root)
    (root / "global_step5").mkdir()  # a save that was interrupted: files but no marker
    (root / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    other = _config(tmp_path / "other", data, (1, 1, 1), train_iters=4, hidden_size=128)
    assert inspect_checkpoint.main([str(root), "--config", str(other)]) == 0
    out = capsys.readouterr().out
    assert "global_step4" in out and "global_step5" in out and "INCOMPLETE" in out
    assert "latest -> global_step4" in out and "\nglobal_step4 (saved" in out
    assert "TP 1 x PP 1 x DP 1 = 1 ranks" in out and "iteration       4" in out
    assert "samples         32  (1,024 tokens seen)" in out
    assert "hidden_size: 64 -> 128" in out and "torch" in out
    assert inspect_checkpoint.main([str(tmp_path / "other")]) == 2  # no checkpoint there


def test_finetune_override_lr_scheduler_and_exit_interval(tmp_path, data, small_1rank):
    from megatron.config.loader import load_config
    from megatron.optim import lr_at

    one = (1, 1, 1)
    ckpt = str(small_1rank / "ckpt")

    # A changed schedule on resume is refused, naming the keys, unless override_lr_scheduler says so.
    changed = dict(train_iters=8, optimizer={"type": "Adam", "params": {"lr": 1.0e-3}})
    refused = _deepy(_config(tmp_path / "refused", data, one, load=ckpt, **changed))
    assert refused.returncode == 2 and "lr 0.003 -> 0.001" in refused.stderr and "override_lr_scheduler" in refused.stderr

    # With the override the run continues at step 5 on the new schedule; exit_interval stops it at step 6, exit 0.
    cfg_path = _config(tmp_path / "override", data, one, load=ckpt, override_lr_scheduler=True, exit_interval=6,
                       **changed)
    out = _ok(_deepy(cfg_path))
    assert "exit_interval 6 reached" in out
    records = [json.loads(line) for line in (tmp_path / "override" / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
    assert sorted(lrs) == [5, 6]
    new_cfg = load_config([str(cfg_path)]).config
    for step, lr in lrs.items():
        assert lr == pytest.approx(lr_at(step - 1, new_cfg), rel=1e-9)  # the lr step `step` trained with
    assert json.loads((tmp_path / "override" / "ckpt" / "global_step6" / "neox_meta.json").read_text())["iteration"] == 6

    # finetune: weights only, a new run from step 1 with a fresh optimizer and schedule; stopped at step 2.
    sft = _config(tmp_path / "sft", data, one, load=ckpt, finetune=True, train_iters=4, exit_interval=2)
    out = _ok(_deepy(sft))
    assert "weights only, new run at step 0" in out
    records = [json.loads(line) for line in (tmp_path / "sft" / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    base = {r["step"]: r["train/loss"] for r in (json.loads(x) for x in
            (small_1rank / "run" / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r}
    first = next(r["train/loss"] for r in records if "train/loss" in r)
    assert steps == [1, 2] and first < base[1]  # it starts from the trained weights, not from scratch

    # The same job restarted with the same config continues from its own save (finetune: true describes how it
    # started), not from the finetune source at step 0 again.
    out = _ok(_deepy(_config(tmp_path / "sft", data, one, load=ckpt, finetune=True, train_iters=4)))
    assert "continuing this run from its own latest save" in out and "step 2, 16 samples consumed" in out
    records = [json.loads(line) for line in (tmp_path / "sft" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]

    # Another run (another starting point) saving into that directory is refused before it trains.
    from types import SimpleNamespace

    from megatron.checkpoint.manager import CheckpointManager, CheckpointMismatchError

    other = SimpleNamespace(cfg=SimpleNamespace(save=str(tmp_path / "sft" / "ckpt"), load=None, load_iteration=None),
                            log=print)
    with pytest.raises(CheckpointMismatchError, match="holds checkpoints of another run .*started from load: "):
        CheckpointManager._own_latest(other)
    same = SimpleNamespace(cfg=SimpleNamespace(save=str(tmp_path / "sft" / "ckpt"), load=ckpt, load_iteration=None),
                           log=print)
    assert CheckpointManager._own_latest(same) == "global_step4"
