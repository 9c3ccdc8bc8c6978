"""Per-epoch replay through the whole trainer: train_iters derived from train_epochs, epoch-boundary log lines,
and domain and replay (general-text) validation losses reported separately at every evaluation."""

import json
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


def _corpus(prefix: Path, seed: int, n_docs: int, offset: int) -> str:
    """Arithmetic progressions; the general pool uses other steps than the domain, so the two losses differ."""
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(str(prefix), np.int32) as w:
        for _ in range(n_docs):
            start, length = rng.integers(0, VOCAB), rng.integers(30, 120)
            step = offset + rng.integers(0, 2)
            w.add_document((start + step * np.arange(length)) % VOCAB)
        w.finalize()
    return str(prefix)


@pytest.mark.distributed
def test_replay_run_reports_epochs_and_both_validation_losses(tmp_path):
    d = tmp_path
    base = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    cfg = {**base, "vocab_size": VOCAB, "seq_length": 32, "train_micro_batch_size_per_gpu": 2,
           "gradient_accumulation_steps": 2, "num_gpus": 2, "pipe_parallel_size": 2,
           "train_data_paths": [_corpus(d / "domain_text_document", 1, 60, 1)],
           "valid_data_paths": [_corpus(d / "domain_valid_text_document", 2, 20, 1)],
           "train_epochs": 2.5,
           "replay": {"data_paths": [_corpus(d / "general_text_document", 3, 60, 5)], "fraction": 0.2,
                      "valid_data_paths": [_corpus(d / "general_valid_text_document", 4, 20, 5)]},
           "optimizer": {"type": "Adam", "params": {"lr": 3.0e-3}}, "log_interval": 5, "eval_interval": 20,
           "eval_iters": 2, "run_dir": str(d / "run"), "save": str(d / "ckpt"), "data_cache_dir": str(d / "cache"),
           "master_port": 29500 + os.getpid() % 200}
    path = d / "run.yml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]

    records = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "train/loss" in r]
    valid = {r["step"]: r["valid/loss"] for r in records if "valid/loss" in r}
    replay = {r["step"]: r["valid_replay/loss"] for r in records if "valid_replay/loss" in r}
    last = train_steps[-1]
    assert last > 20  # train_iters came from train_epochs
    assert sorted(valid) == sorted(replay) and set(valid) >= {20, last}  # both reported at every evaluation
    assert all(valid[s] != replay[s] for s in valid)
    epochs = [r for r in records if any(k.startswith("epoch/") for k in r)]
    assert len(epochs) == 3  # two full epochs and the half one, each logged when it completes
    assert "replay (general-text) validation at step" in out
    # The saved config is the user's: train_epochs, not a derived train_iters (which would fail to reload).
    saved = yaml.safe_load((d / "ckpt" / f"global_step{last}" / "config.yml").read_text())
    assert saved["train_epochs"] == 2.5 and saved["train_iters"] is None
