"""The whole path on CPU: deepy.py → DeepSpeed runner → 2 gloo ranks → train.py → trainer → checkpoint + logs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron.data.indexed_dataset import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256


def synthetic_corpus(prefix: str, n_docs: int = 200, seed: int = 0) -> None:
    """Documents that are arithmetic progressions mod VOCAB: learnable, so the loss must fall quickly."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(n_docs):
            start, step, length = rng.integers(0, VOCAB), rng.integers(1, 4), rng.integers(40, 200)
            w.add_document((start + step * np.arange(length)) % VOCAB)
        w.finalize()


def run_deepy(tmp_path: Path, overrides: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    base = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    cfg = {**base, "vocab_size": VOCAB, "seq_length": 64, "train_micro_batch_size_per_gpu": 4,
           "gradient_accumulation_steps": 2, "train_iters": 30, "log_interval": 5, "eval_interval": 15,
           "eval_iters": 2, "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}}, "warmup": 0.1,
           "min_lr": 3.0e-4, "run_dir": str(tmp_path / "run"), "tensorboard_dir": str(tmp_path / "tb"),
           "use_wandb": True, "save": str(tmp_path / "ckpt"), "master_port": 29600 + os.getpid() % 300,
           **overrides}
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.distributed
def test_two_rank_pipeline_run_trains_logs_and_saves(tmp_path):
    prefix = str(tmp_path / "synthetic_text_document")
    synthetic_corpus(prefix)
    proc = run_deepy(tmp_path, {"num_gpus": 2, "pipe_parallel_size": 2, "data_path": prefix, "split": "90,10,0",
                                "log_phase_times": True})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "TP 1 x PP 2 x DP 1 = 2 ranks" in out
    for word in ("loss", "lr", "grad norm", "tok/s", "TFLOP/s/GPU", "mem"):
        assert word in out

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    valid = [r for r in records if "valid/loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert train[-1]["train/loss"] < 0.7 * train[0]["train/loss"]
    assert [r["step"] for r in valid] == [15, 30] and valid[-1]["valid/loss"] < valid[0]["valid/loss"]
    assert all(r["train/grad_norm"] > 0 and r["train/tokens_per_s"] > 0 for r in train)
    # The lr each logged step trained with: warmup 3 steps, then cosine from 3e-3 to min_lr over 27 steps.
    lr_used = [3.0e-4 + 2.7e-3 * 0.5 * (1 + math.cos(math.pi * (step - 1 - 3) / 27)) for step in range(5, 31, 5)]
    assert [r["train/lr"] for r in train] == pytest.approx(lr_used, rel=1e-6)
    # log_phase_times: each stage's phases, logged by rank 0 (DeepSpeed's timers plus the forward, loss and
    # gradient-reduction timers); the loss is the last stage's, the wait for gradients the first's.
    for stage in (0, 1):
        phases = [{k.split("/")[-1]: v for k, v in r.items() if k != "step"}
                  for r in records if f"phase/stage{stage}/backward_ms" in r]
        assert len(phases) == 6 and f"stage {stage} phases (ms/step): data" in out
        for p in phases:
            assert p["forward_ms"] > 0 and p["backward_ms"] > 0 and p["optimizer_ms"] > 0
            assert p["grad_allreduce_ms"] > 0
            assert p["step_ms"] >= p["forward_ms"] + p["backward_ms"] + p.get("loss_ms", 0.0)
            if stage == 0:
                assert p["pipe_send_output_ms"] > 0 and p["pipe_recv_grad_ms"] > 0 and "loss_ms" not in p
            else:
                assert p["pipe_recv_input_ms"] > 0 and p["pipe_send_grad_ms"] > 0 and p["loss_ms"] > 0
    assert "optimizer_allgather" not in out  # DeepSpeed's own per-step timer print stays off

    # The resolved config lives beside the run and inside the checkpoint; the plot and TB events exist.
    saved = yaml.safe_load((tmp_path / "ckpt" / "global_step30" / "config.yml").read_text())
    assert saved["pipe_parallel_size"] == 2 and saved["vocab_size"] == VOCAB
    assert (tmp_path / "run" / "config.yml").exists() and (tmp_path / "run" / "curves.png").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def sft_corpus(prefix: str, n_docs: int = 200, seed: int = 0) -> tuple[str, str]:
    """Conversations whose prompt is random tokens (no loss: label -100) and whose answer repeats one token (the
    targets): trained on the answers alone the loss falls near zero; counting the prompts it could not."""
    rng = np.random.default_rng(seed)
    text, labels = prefix + "_messages_document", prefix + "_messages_label_document"
    with IndexedDatasetWriter(text, np.int32) as t, IndexedDatasetWriter(labels, np.int32) as lab:
        for _ in range(n_docs):
            prompt, answer = rng.integers(0, VOCAB, size=24), np.full(24, 7)
            t.add_document(np.concatenate([prompt, answer]))
            lab.add_document(np.concatenate([np.full(24, -100), answer]))
        t.finalize()
        lab.finalize()
    return text, labels


@pytest.mark.distributed
def test_sft_run_takes_the_loss_on_labelled_tokens_only(tmp_path):
    train, train_labels = sft_corpus(str(tmp_path / "train"))
    valid, valid_labels = sft_corpus(str(tmp_path / "valid"), n_docs=20, seed=1)
    proc = run_deepy(tmp_path, {"num_gpus": 2, "pipe_parallel_size": 2, "train_data_paths": [train],
                                "train_label_data_paths": [train_labels], "valid_data_paths": [valid],
                                "valid_label_data_paths": [valid_labels], "train_iters": 30, "log_interval": 10,
                                "eval_interval": 30, "save": None,
                                # vocab 256 has no room for the Llama-3 EOD that whole-conversation packing pads
                                # with (tests/test_sft_training.py trains that way, with the real vocabulary)
                                "pack_impl": "packed"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["train/loss"] for r in records if "train/loss" in r]
    valid_loss = [r["valid/loss"] for r in records if "valid/loss" in r]
    # Half of every conversation is random tokens (ln 256 = 5.5 nats each): a loss over all tokens stays above 2.7.
    assert train_loss[0] > 3.0 and train_loss[-1] < 1.0 and valid_loss[-1] < 1.0, (train_loss, valid_loss)
