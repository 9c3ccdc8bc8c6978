"""SFT the way `make demo-sft` runs it: synthetic chat rows in three shapes -> build_sft_mix.py -> deepy.py with
train_epochs, label datasets and whole-conversation packing (the default). The tiny model learns the assistant
replies (loss near zero) while no user or system token is ever trained, and the loss tokens the log reports are
exactly the assistant tokens of the samples served."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools" / "datasets"
EPOCHS = 2.0


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    py = [sys.executable]
    subprocess.run(py + [str(TOOLS / "build_demo_chat.py"), "--output-dir", str(d), "--rows", "40", "--facts", "1"], check=True,
                   capture_output=True)
    subprocess.run(py + [str(TOOLS / "build_sft_mix.py"), "--output-prefix", str(d / "mix"), "--seq-length", "64",
                         "--valid-fraction", "0.05", "--source", str(d / "astro_qa.jsonl"), "share=0.3",
                         "--source", str(d / "hermes.jsonl"), "--source", str(d / "nemotron.jsonl"),
                         "--no-progress"], check=True, capture_output=True)
    cfg = {**yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text()),
           **yaml.safe_load((ROOT / "configs" / "demo_sft.yml").read_text())}
    prefix = str(d / "mix")
    cfg.update({"train_data_paths": [f"{prefix}_train_messages_document"],
                "train_label_data_paths": [f"{prefix}_train_messages_label_document"],
                "valid_data_paths": [f"{prefix}_valid_messages_document"],
                "valid_label_data_paths": [f"{prefix}_valid_messages_label_document"],
                "seq_length": 64, "num_layers": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                "train_epochs": EPOCHS, "log_interval": 10, "eval_interval": 10_000, "eval_iters": 2,
                "optimizer": {"type": "Adam", "params": {"lr": 1.0e-2, "betas": [0.9, 0.95]}}, "warmup": 0.0,
                "min_lr": 1.0e-3,
                "run_dir": str(d / "run"), "tensorboard_dir": None, "save": None, "data_cache_dir": str(d / "cache"),
                "master_port": 29100 + os.getpid() % 200})
    (d / "run.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(py + [str(ROOT / "deepy.py"), "train.py", str(d / "run.yml")], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    records = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    return cfg, out, records


def test_train_epochs_with_label_datasets(sft_run):
    cfg, out, records = sft_run
    match = re.search(r"train_epochs 2: (\d+) packed samples per epoch, global batch 2 -> train_iters (\d+)", out)
    assert match, out[-3000:]
    per_epoch, iters = int(match.group(1)), int(match.group(2))
    assert iters == math.ceil(EPOCHS * per_epoch / 2)
    assert [r["step"] for r in records if "train/loss" in r][-1] == iters
    assert re.search(r"best_fit packing of [\d,]+ documents into [\d,]+ samples per epoch of 65 tokens", out)
    assert "loss tokens" in out and "/step (" in out


def test_learns_the_replies_and_trains_no_prompt_token(sft_run):
    cfg, out, records = sft_run
    from megatron.data.indexed_dataset import IndexedDataset
    from megatron.data.packing import PackedDocumentsDataset
    from megatron.data.tokenizer import build_tokenizer

    llama3 = build_tokenizer("Llama3Tokenizer")
    train = [r for r in records if "train/loss" in r]
    valid = [r["valid/loss"] for r in records if "valid/loss" in r]
    assert train[0]["train/loss"] > 5.0 and train[-1]["train/loss"] < 0.3, [r["train/loss"] for r in train]
    assert valid[-1] < 0.3

    # The samples served: the first train_iters x 2 of the packed dataset the trainer built (same arguments).
    served = train[-1]["step"] * 2
    ds = PackedDocumentsDataset(IndexedDataset(cfg["train_data_paths"][0]), "check", served, 64, cfg["seed"],
                                "best_fit", llama3.eod_id, labels=IndexedDataset(cfg["train_label_data_paths"][0]),
                                boundary_id=llama3.eot_id)
    start, end = llama3.token_to_id("<|start_header_id|>"), llama3.token_to_id("<|end_header_id|>")
    trained_by_role: dict[str, int] = {}
    for i in range(served):
        tokens, labels = ds[i]["tokens"], ds[i]["labels"]
        role, in_header = None, False
        for position, (token, label) in enumerate(zip(tokens.tolist(), labels.tolist())):
            if token == start:
                in_header, role = True, []
            elif token == end:
                in_header, role = False, llama3.decode(role)
            elif in_header:
                role.append(token)
            if label != -100 and position > 0:  # position 0 is never a target (the labels shift by one)
                key = "header" if in_header or token in (start, end) else role
                trained_by_role[key] = trained_by_role.get(key, 0) + 1
    assert set(trained_by_role) == {"assistant"}
    # The log's loss tokens per step, summed over its windows, are exactly those assistant tokens.
    steps = np.diff([0] + [r["step"] for r in train])
    assert round(sum(r["train/loss_tokens"] * n for r, n in zip(train, steps))) == trained_by_role["assistant"]
