"""Per-token loss over the global batch (megatron/data/lm_batches.py), through deepy.py in real processes.

One global batch of 8 SFT samples whose loss tokens differ widely (from none to nearly all 64 positions) is
trained for one step split three ways: 1 micro-batch of 8, 8 micro-batches of 1, and DP 2 x 4 micro-batches of 1.
The step's loss and the weights after it must agree to 1e-6: the loss is the mean over every loss token of the
global batch, however it is split.

The code before this change (each micro-batch's mean, averaged over micro-batches and DP ranks) fails this test:
on the same data it logged loss 5.5656 (1x8), 4.8223 (8x1) and 4.8223 (DP 2), and the weights after the step
differed by up to 0.135 between 1x8 and 8x1 (with it: the same losses, weights within 6e-8).

Validation after the step is per token as well (2 evaluations of 16 held-out samples): the old mean of micro-batch
means read 5.5589 (1x8) against 4.5324 (8x1) there.

Pretraining, where every label counts, stays bit-identical to that per-micro-batch mean (the unit test below).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from megatron.data.indexed_dataset import IndexedDatasetWriter

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
SEQ = 64


def sft_corpus(prefix: str, n_docs: int = 24, seed: int = 0) -> tuple[str, str]:
    """Documents of 65 tokens (one per sample) whose labelled share ranges from 0 to all: the samples' loss
    tokens differ widely, which is what separates a per-token mean from a mean of micro-batch means."""
    rng = np.random.default_rng(seed)
    text, labels = prefix + "_messages_document", prefix + "_messages_label_document"
    with IndexedDatasetWriter(text, np.int32) as t, IndexedDatasetWriter(labels, np.int32) as lab:
        for i in range(n_docs):
            tokens = rng.integers(0, VOCAB, size=SEQ)
            trained = [0, 2, 60, 5, 64, 1, 30, 12][i % 8]
            t.add_document(tokens)
            lab.add_document(np.where(np.arange(SEQ) >= SEQ - trained, tokens, -100))
        t.finalize()
        lab.finalize()
    return text, labels


def run(tmp_path: Path, name: str, micro: int, gas: int, gpus: int, data) -> tuple[float, dict]:
    base = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    d = tmp_path / name
    cfg = {**base, "vocab_size": VOCAB, "seq_length": SEQ, "num_layers": 2, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": gas, "num_gpus": gpus, "train_iters": 1, "log_interval": 1,
           "train_data_paths": [data[0]], "train_label_data_paths": [data[1]],
           # validation after the step: 2 evaluations of the same 16 samples, whatever the split
           "eval_iters": 2, "eval_interval": 1, "valid_data_paths": [data[2]], "valid_label_data_paths": [data[3]],
           "pack_impl": "packed",  # the token stream: vocab 256 has no room for the Llama-3 EOD that pads
           # Adam's first step is lr * g / (|g| + eps): with eps 1 the update follows the gradient, not its sign.
           "optimizer": {"type": "Adam", "params": {"lr": 1.0, "eps": 1.0}}, "weight_decay": 0.0, "warmup": 0.0,
           "lr_decay_style": "constant", "run_dir": str(d / "run"), "save": str(d / "ckpt"),
           "data_cache_dir": str(tmp_path / "cache"), "master_port": 29300 + os.getpid() % 200}
    d.mkdir()
    (d / "run.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(d / "run.yml")], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = next(r for r in records if "train/loss" in r)
    loss["valid/loss"] = next(r["valid/loss"] for r in records if "valid/loss" in r)
    weights = {}
    for f in sorted((d / "ckpt" / "global_step1").glob("layer_*-model_00-model_states.pt")):
        weights.update({f"{f.name}:{k}": v.float() for k, v in torch.load(f, map_location="cpu").items()
                        if torch.is_tensor(v)})
    return loss, weights


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("per_token_loss")
    data = sft_corpus(str(tmp_path / "sft")) + sft_corpus(str(tmp_path / "sft_valid"), seed=1)
    return {name: run(tmp_path, name, micro, gas, gpus, data)
            for name, micro, gas, gpus in (("1x8", 8, 1, 1), ("8x1", 1, 8, 1), ("dp2", 1, 4, 2))}


@pytest.mark.distributed
def test_same_loss_and_weights_however_the_global_batch_is_split(three_splits):
    (loss_a, w_a), (loss_b, w_b), (loss_c, w_c) = three_splits["1x8"], three_splits["8x1"], three_splits["dp2"]
    assert loss_a["train/loss"] == pytest.approx(loss_b["train/loss"], abs=1e-6, rel=1e-6)
    assert loss_a["train/loss"] == pytest.approx(loss_c["train/loss"], abs=1e-6, rel=1e-6)
    # The log counts the step's loss tokens: 122 of the 8 x 64 label positions (the labels shift by one).
    for record in (loss_a, loss_b, loss_c):
        assert record["train/loss_tokens"] == 122 and record["train/loss_token_share"] == pytest.approx(122 / 512)
    # Validation is per token too (each evaluation's mean over its loss tokens, weighted by their count): the mean
    # of micro-batch means it replaced read differently for 1x8 and 8x1 on these samples.
    assert loss_a["valid/loss"] == pytest.approx(loss_b["valid/loss"], abs=1e-6, rel=1e-6)
    assert loss_a["valid/loss"] == pytest.approx(loss_c["valid/loss"], abs=1e-6, rel=1e-6)
    assert set(w_a) == set(w_b) == set(w_c) and w_a
    for k in w_a:
        assert torch.allclose(w_a[k], w_b[k], atol=1e-6, rtol=0), k
        assert torch.allclose(w_a[k], w_c[k], atol=1e-6, rtol=0), k


def test_pretraining_loss_is_bit_identical_to_the_micro_batch_mean(single_rank):
    """Every label counts: the divisor is micro x seq exactly, so loss and gradients equal the old mean's bits;
    with masked labels the per-token loss is the global mean (sum over micro-batches of sum / N)."""
    from megatron.data.lm_batches import GlobalTokenBatches
    from megatron.model.layers import causal_lm_loss

    torch.manual_seed(0)
    batches = [(torch.zeros(4, 16, dtype=torch.long), torch.randint(0, 50, (4, 16))) for _ in range(3)]
    logits = [torch.randn(4, 16, 50, requires_grad=True) for _ in range(3)]
    stepped = list(zip(range(3), GlobalTokenBatches(iter(batches), micro_batches_per_step=3, dp_size=1)))
    for (i, (_, (labels, divisor))), (_, plain) in zip(stepped, batches):
        assert float(divisor) == 64.0 and torch.equal(labels, plain)
        # (megatron-core's cross-entropy shifts fp32 logits in place: each call gets its own copy)
        new, old = causal_lm_loss(logits[i] * 1, (labels, divisor)), causal_lm_loss(logits[i] * 1, plain)
        assert torch.equal(new, old)
        assert torch.equal(torch.autograd.grad(new, logits[i])[0], torch.autograd.grad(old, logits[i])[0])
    # Masked: micro-batch losses sum to (total token loss) / N x gas, whatever each micro-batch holds.
    masked = [(x, y.masked_fill(torch.rand(y.shape) < p, -100)) for (x, y), p in zip(batches, (0.0, 0.9, 1.0))]
    it = GlobalTokenBatches(iter(masked), micro_batches_per_step=3, dp_size=1)
    losses = [causal_lm_loss(lg * 1, lab) for lg, (_, lab) in zip(logits, [next(it) for _ in range(3)])]
    per_token = torch.cat([torch.nn.functional.cross_entropy(lg[y != -100], y[y != -100], reduction="none")
                           for lg, (_, y) in zip(logits, masked)])
    assert it.loss_tokens == len(per_token) and it.label_positions == 192
    assert float(sum(losses) / 3) == pytest.approx(float(per_token.mean()), rel=1e-6)
