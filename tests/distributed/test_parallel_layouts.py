"""3D parallelism on CPU: one tiny model, one seed, the same global batches, trained 5 steps under each
(TP, PP, DP) layout through deepy.py. Losses, gradient norms and the final full weights must match TP1 PP1 DP1.

Each layout is launched once (startup dominates: ~8 gloo ranks of a trivial model take ~45 s on 2 cores); all
comparisons happen in the one test function below, against the files each run leaves behind:
  run/metrics.jsonl  per-step train/loss and train/grad_norm (log_interval: 1), written by rank 0
  ckpt/global_step5  DeepSpeed's per-layer, per-TP-rank weight files, unsharded with pipe_to_hf_state
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from megatron.checkpoint.hf_keys import pipe_to_hf_state
from megatron.model.config import LlamaConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from test_train_e2e import VOCAB, synthetic_corpus  # noqa: E402

STEPS = 5
GLOBAL_BATCH = 4
MODEL = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_kv_heads": 2, "intermediate_size": 128,
         "seq_length": 32, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64}
# (TP, PP, DP, extra keys). TP 4 with 2 kv heads makes each kv head shared by 2 ranks; checkpointing variants
# ride on layouts that run anyway (their exact on/off equality is tested in-process in test_activation_memory.py).
# Selective recompute rides on TP 4: replaying a row-parallel layer must not all-reduce its kept output again.
# Each dimension > 1 appears alone or with the others (TP: 2 and 4; PP: 2 and 4; DP: 2 with TP and PP); a layout
# with a single dimension > 1 is implied by the combined ones (a TP-only bug breaks TP 2 x PP 2 as well), and each
# launch costs ~20 s of the CI budget, so TP 2, PP 2 and DP 2 alone are not launched separately.
LAYOUTS = [
    (1, 1, 1, {}),
    (2, 2, 1, {}),
    (2, 2, 2, {"checkpoint_activations": True, "partition_activations": True}),
    (1, 4, 1, {"checkpoint_activations": True}),
    (4, 1, 1, {"checkpoint_activations": True, "recompute_granularity": "selective"}),
]


def launch(tmp_path: Path, data_prefix: str, tp: int, pp: int, dp: int, extra: dict) -> tuple[Path, str]:
    base = yaml.safe_load((ROOT / "configs" / "tiny_cpu.yml").read_text())
    name = f"tp{tp}_pp{pp}_dp{dp}" + ("_ckpt" if extra else "")
    out = tmp_path / name
    micro = GLOBAL_BATCH // 2 // dp  # accumulation 2: micro x accumulation x DP = GLOBAL_BATCH for every layout
    cfg = {**base, **MODEL, "model_parallel_size": tp, "pipe_parallel_size": pp, "num_gpus": tp * pp * dp,
           "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 2, "train_iters": STEPS,
           "log_interval": 1, "eval_iters": 0, "eval_interval": 1000, "data_path": data_prefix,
           "split": "100,0,0", "optimizer": {"type": "Adam", "params": {"lr": 5.0e-4, "eps": 1.0e-6}}, "warmup": 0.0,
           "min_lr": 1.0e-4, "gradient_clipping": 1.0, "run_dir": str(out / "run"), "save": str(out / "ckpt"),
           "use_wandb": False, "tensorboard_dir": None, "master_port": 29300 + os.getpid() % 200 + 7 * tp + pp,
           **extra}
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    # One intra-op thread per rank: up to 8 ranks share 2 cores, and spinning thread pools slow gloo to a crawl.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} failed:\n{log[-4000:]}"
    return out, log


def metrics(out: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["train/loss"] for r in rows], [r["train/grad_norm"] for r in rows]


def full_weights(out: Path, tp: int) -> dict[str, torch.Tensor]:
    """HF-named full tensors from DeepSpeed's pipeline checkpoint (layer_XX-model_YY-model_states.pt)."""
    cfg = LlamaConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_kv_heads=2, intermediate_size=128,
                      vocab_size=VOCAB, padded_vocab_size=VOCAB)
    ckpt = out / "ckpt" / f"global_step{STEPS}"
    shards: list[dict] = [{} for _ in range(tp)]
    for idx in range(cfg.num_layers + 3):
        for rank in range(tp):
            state = torch.load(ckpt / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt", map_location="cpu")
            shards[rank].update({f"{idx}.{k}": v for k, v in state.items()})
    return pipe_to_hf_state(shards, cfg, range(cfg.num_layers + 3))


@pytest.mark.distributed
def test_every_layout_trains_like_one_rank(tmp_path):
    prefix = str(tmp_path / "synthetic_text_document")
    synthetic_corpus(prefix)
    results, timings = {}, {}
    for tp, pp, dp, extra in LAYOUTS:
        t0 = time.perf_counter()
        out, log = launch(tmp_path, prefix, tp, pp, dp, extra)
        timings[(tp, pp, dp)] = time.perf_counter() - t0
        world = tp * pp * dp
        # Start-up proved, on every rank, that megatron-core and DeepSpeed place it at the same coordinates.
        assert f"megatron-core and DeepSpeed agree on the (tp, pp, dp) coordinates of all {world} ranks" in log
        results[(tp, pp, dp)] = (*metrics(out), full_weights(out, tp))
    print("launch seconds:", {k: round(v, 1) for k, v in timings.items()})

    ref_loss, ref_norm, ref_weights = results[(1, 1, 1)]
    assert ref_loss[-1] < ref_loss[0]
    for layout, (loss, norm, weights) in results.items():
        assert loss == pytest.approx(ref_loss, abs=1e-5), layout
        assert norm == pytest.approx(ref_norm, abs=1e-5), layout
        assert weights.keys() == ref_weights.keys()
        for name, ref in ref_weights.items():
            torch.testing.assert_close(weights[name], ref, atol=1e-5, rtol=0, msg=f"{layout} {name}")
