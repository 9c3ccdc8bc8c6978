"""One rank of tests/test_grad_accum_fusion.py's TP 2 check of the fused embedding (layers.FusedGradVocabParallel
Embedding): every rank holds half the vocabulary; tokens of the other half look up row 0 and are masked out.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=p RANK=r WORLD_SIZE=2 python tp_embedding_worker.py

Over three micro-batches the output must equal megatron-core's VocabParallelEmbedding exactly, and main_grad must
be the fp32 sum of this rank's rows (fp64 reference), row 0 included: the masked tokens add nothing there.
Exits 0 when every check holds; a failed check raises (and prints) on the rank that saw it.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402

from megatron.model.layers import FusedGradVocabParallelEmbedding  # noqa: E402
from megatron.parallel.layout import ParallelLayout  # noqa: E402

VOCAB, HIDDEN = 64, 16


def main() -> None:
    rank = int(os.environ["RANK"])
    ParallelLayout.from_world(2, 1, 2, rank).initialize(backend="gloo", seed=0)
    cfg = ModelParallelConfig(tensor_model_parallel_size=2, params_dtype=torch.bfloat16,
                              use_cpu_initialization=True)
    plain = tensor_parallel.VocabParallelEmbedding(VOCAB, HIDDEN, init_method=torch.nn.init.normal_, config=cfg)
    fused = FusedGradVocabParallelEmbedding(VOCAB, HIDDEN, init_method=torch.nn.init.normal_, config=cfg)
    rows = VOCAB // 2
    full = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    plain.weight.data.copy_(full[rank * rows:(rank + 1) * rows])
    fused.weight.data.copy_(plain.weight.data)
    fused.weight.main_grad = torch.zeros(rows, HIDDEN)

    expected = torch.zeros(rows, HIDDEN, dtype=torch.float64)
    for step in range(3):  # the same tokens and output gradient on both ranks, as TP ranks see them
        gen = torch.Generator().manual_seed(step)
        # Both slices' first rows (tokens 0 and 32) often, so row 0 collects real and masked lookups alike.
        ids = torch.randint(0, VOCAB, (4, 64), generator=gen)
        ids[:, ::4] = 0
        ids[:, 1::4] = rows
        g = torch.randn(4, 64, HIDDEN, generator=gen).to(torch.bfloat16)
        out = fused(ids)
        torch.testing.assert_close(out, plain(ids), rtol=0, atol=0)
        torch.testing.assert_close(out, full[ids], rtol=0, atol=0)  # the all-reduced lookup of the full table
        out.backward(g)
        mine = (ids >= rank * rows) & (ids < (rank + 1) * rows)
        expected.index_add_(0, ids[mine] - rank * rows, g[mine].double())
    assert fused.weight.grad is None
    err = (fused.weight.main_grad.double() - expected).abs()
    scale = expected.abs().max().item()
    assert err[0].max().item() <= 1e-6 * scale, f"rank {rank}: row 0 off by {err[0].max().item():.3g}"
    assert err.max().item() <= 1e-6 * scale, f"rank {rank}: main_grad off by {err.max().item():.3g}"
    print(f"rank {rank}: ok (max error {err.max().item():.2e} of {scale:.2f})", flush=True)


if __name__ == "__main__":
    main()
