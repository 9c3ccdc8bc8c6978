"""One rank of tests/test_converters.py's logits check: load checkpoints the way the trainer does and run them.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=p python converter_logits_worker.py JOBS.json WORLD_SIZE

JOBS.json: {"tokens": path of a [batch, seq] LongTensor, "out_dir": ..., "jobs": [{"name", "ckpt", "tp", "pp"}]}.
All jobs run in the same world (so the processes start once): each job re-initialises megatron-core's groups for
its (TP, PP), DP being what is left of the world, builds the model, and loads the checkpoint with DeepSpeed's
`engine.load_checkpoint(load_module_only=True)` (what train.py does for a weights-only checkpoint). The forward
pass goes stage by stage (activations sent to the next stage's rank with the same DP/TP coordinates); the last
stage all-gathers the vocab-parallel logits over TP and rank (dp 0, tp 0) saves them as OUT_DIR/NAME.pt.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron.checkpoint import hf_config, metadata  # noqa: E402
from megatron.checkpoint.convert import read_neox_model  # noqa: E402
from megatron.model.llama import build_model  # noqa: E402
from megatron.parallel.layout import ParallelLayout  # noqa: E402

TIME_LIMIT_S = 240


def run_job(job: dict, tokens: torch.Tensor, out_dir: Path, rank: int, world: int) -> None:
    tp, pp = job["tp"], job["pp"]
    root = Path(job["ckpt"])
    tag = metadata.find_loadable_tag(root)
    keys, meta = read_neox_model(root / tag)
    padded = meta["model"]["padded_vocab_size"]
    layout = ParallelLayout.from_world(tp, pp, world, rank)
    parallel_state.destroy_model_parallel()
    layout.initialize(backend="gloo", seed=1234, num_kv_heads=keys["num_kv_heads"])
    cfg = hf_config.llama_config(keys, padded)
    model = build_model(cfg, layout).eval()
    for p in model.parameters():  # a random start, so a checkpoint that loads nothing cannot pass
        p.data.normal_(0.0, 1.0)
    ds_config = {"train_micro_batch_size_per_gpu": tokens.shape[0], "gradient_accumulation_steps": 1,
                 "train_batch_size": tokens.shape[0] * layout.dp}
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_only=True, load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    assert path is not None, f"DeepSpeed loaded nothing from {root}/{tag}"

    stride = layout.dp * tp  # rank distance between consecutive stages with the same (dp, tp) coordinates
    with torch.no_grad():
        if layout.is_first_stage:
            x = tokens
        else:
            x = torch.empty(*tokens.shape, cfg.hidden_size)
            dist.recv(x, src=rank - stride)
        y = model(x)
        if not layout.is_last_stage:
            dist.send(y.contiguous(), dst=rank + stride)
            return
        parts = [torch.empty_like(y) for _ in range(tp)]
        dist.all_gather(parts, y.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        if layout.tp_rank == 0 and layout.dp_rank == 0:
            torch.save(torch.cat(parts, -1)[..., : keys["vocab_size"]], out_dir / f"{job['name']}.pt")


def run_rank(spec: dict, rank: int, world: int) -> None:
    tokens = torch.load(spec["tokens"])
    out_dir = Path(spec["out_dir"])
    for job in spec["jobs"]:
        run_job(job, tokens, out_dir, rank, world)
        dist.barrier()
    dist.barrier()


def main() -> int:
    """Fork the ranks from one process that has already imported torch, DeepSpeed and megatron-core: on the 2-core
    CI machine four separate interpreters spend ~25 s importing them, four forks none. No torch computation runs
    before the fork (so no OpenMP pool is inherited), and each rank uses one intra-op thread."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    world = int(sys.argv[2])
    pids = []
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
                torch.set_num_threads(1)
                run_rank(spec, rank, world)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    remaining, failed = set(pids), []

    def kill_remaining(*_):
        for pid in remaining:  # a rank that failed leaves the others blocked in a collective: end them
            os.kill(pid, signal.SIGKILL)

    def timed_out(*_):
        print(f"ranks still running after {TIME_LIMIT_S} s: killed", file=sys.stderr, flush=True)
        kill_remaining()

    signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(TIME_LIMIT_S)
    while remaining:
        pid, status = os.wait()
        remaining.discard(pid)
        if status != 0:
            failed.append(pids.index(pid))
            kill_remaining()
    if failed:
        print(f"ranks {sorted(failed)} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
