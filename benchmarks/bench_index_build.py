#!/usr/bin/env python3
"""GPT sample-index build time: megatron.data.gpt_dataset vs megatron-core's GPTDataset on the same corpus.

The corpus is synthetic: an .idx describing --tokens tokens in documents of random length, and a sparse .bin of
the matching size (nothing is read from it while indexing, so no disk space is used). Cold = build and cache the
index arrays; warm = load them from the cache. Prints a table and appends it to docs/performance.md.

    python benchmarks/bench_index_build.py [--tokens 200e6] [--seq-length 2048] [--epochs 2] [--no-report]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch.distributed  # noqa: E402,F401  (imported here so its ~1 s import is not timed as part of a build)
from bench_preprocess import append_report  # noqa: E402

from megatron.data.gpt_dataset import GPTDataset  # noqa: E402
from megatron.data.indexed_dataset import IndexedDataset, write_index_file  # noqa: E402


def make_corpus(prefix: str, tokens: int, mean_doc: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * mean_doc, size=tokens // mean_doc, dtype=np.int64)
    write_index_file(prefix + ".idx", np.int32, lengths, np.arange(len(lengths) + 1))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 4)
    return len(lengths)


REPEATS = 5


def timed(builds: dict, cache_root: str) -> dict[str, tuple[float, float]]:
    """Best of REPEATS for each implementation (cold build into a fresh cache directory, then a warm load from
    it), the implementations interleaved so that drift of a shared machine favours neither."""
    cold: dict[str, list[float]] = {name: [] for name in builds}
    warm: dict[str, list[float]] = {name: [] for name in builds}
    for i in range(REPEATS):
        for k, (name, build) in enumerate(builds.items()):
            cache = os.path.join(cache_root, f"{k}_{i}")
            for times in (cold, warm):
                start = time.perf_counter()
                build(cache)
                times[name].append(time.perf_counter() - start)
    return {name: (min(cold[name]), min(warm[name])) for name in builds}


def ours(prefix: str, num_samples: int, seq_length: int):
    def build(cache_dir: str) -> None:
        GPTDataset(IndexedDataset(prefix), "train", num_samples, seq_length, seed=1234, cache_dir=cache_dir)

    return build


def megatron_core(prefix: str, num_docs: int, num_samples: int, seq_length: int):
    from megatron.core.datasets.gpt_dataset import GPTDataset as MCoreGPTDataset
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MCoreIndexedDataset
    from megatron.core.datasets.utils import Split

    class Tokenizer:  # the few attributes megatron-core's config and dataset read
        vocab_size, bos, eod, eos, pad = 128256, 128000, 128001, 128001, 128004
        unique_identifiers = {"class": "Llama3Tokenizer"}

    def build(cache_dir: str) -> None:
        config = GPTDatasetConfig(
            random_seed=1234, sequence_length=seq_length, blend=([prefix], None), split="1,0,0",
            path_to_cache=cache_dir, tokenizer=Tokenizer(), reset_position_ids=False, reset_attention_mask=False,
            eod_mask_loss=False,
        )
        MCoreGPTDataset(MCoreIndexedDataset(prefix), prefix, np.arange(num_docs, dtype=np.int32), num_samples,
                        Split.train, config)

    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=200e6)
    parser.add_argument("--mean-doc-tokens", type=int, default=400)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--epochs", type=float, default=2.0, help="samples requested, in epochs of the corpus")
    parser.add_argument("--no-report", action="store_true", help="do not append to docs/performance.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "corpus")
        num_docs = make_corpus(prefix, int(args.tokens), args.mean_doc_tokens)
        num_tokens = IndexedDataset(prefix).num_tokens
        num_samples = int(args.epochs * num_tokens / args.seq_length)
        results = timed({
            "megatron.data.gpt_dataset.GPTDataset (numpy + mcore build_sample_idx)": ours(
                prefix, num_samples, args.seq_length),
            "megatron.core GPTDataset (C++ helpers)": megatron_core(prefix, num_docs, num_samples, args.seq_length),
        }, os.path.join(tmp, "caches"))
    table = [
        f"Corpus: {num_tokens / 1e6:,.0f}M tokens in {num_docs:,} documents; {num_samples:,} samples of "
        f"{args.seq_length} tokens ({args.epochs:g} epochs).",
        "",
        f"Best of {REPEATS} runs each, the implementations interleaved.",
        "",
        "| implementation | cold build + cache (s) | warm load from cache (s) |",
        "|---|---:|---:|",
    ] + [f"| {name} | {cold:.3f} | {warm:.3f} |" for name, (cold, warm) in results.items()]
    print("\n".join(table))
    if not args.no_report:
        append_report("GPT sample-index build (benchmarks/bench_index_build.py)", table)


if __name__ == "__main__":
    main()
