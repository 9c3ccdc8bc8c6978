#!/usr/bin/env python3
"""Padding waste of each pack_impl on a realistic SFT length mix (docs/data.md records the result).

The mix imitates the AstroSage SFT sources at seq_length 8192 with log-normal conversation lengths in Llama-3
tokens (the assumed medians and spreads are printed; replace them with your data's, or pass --lengths a .npy of
real lengths, e.g. from the mix tool's datasets: IndexedDataset(prefix).sequence_lengths):
  Llama-Nemotron post-training, reasoning on (long <think> traces), 35% of the conversations
  Llama-Nemotron, reasoning off, 20%;  OpenHermes-2.5, 15%;  astronomy Q&A, 30%.

For `packed` (the token stream, no padding) it reports instead the share of samples that start inside a
conversation (whose first tokens are answers without their question) and of loss tokens in such headless pieces.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402

from megatron.data.packing import pack  # noqa: E402

# (name, share of conversations, median tokens, log-normal sigma): assumptions, stated in the output.
MIX = [("nemotron reasoning on", 0.35, 2200, 0.8), ("nemotron reasoning off", 0.20, 650, 0.9),
       ("openhermes-2.5", 0.15, 420, 0.9), ("astronomy q&a", 0.30, 380, 0.6)]


def synthetic_lengths(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    parts = [rng.lognormal(np.log(median), sigma, int(round(n * share))) for _, share, median, sigma in MIX]
    return np.maximum(np.concatenate(parts).astype(np.int64), 16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=200_000)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--lengths", default=None, help=".npy of real conversation lengths instead of the synthetic mix")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    capacity = args.seq_length + 1
    lengths = np.load(args.lengths) if args.lengths else synthetic_lengths(args.conversations, args.seed)
    if not args.lengths:
        for name, share, median, sigma in MIX:
            print(f"  assumed: {name:<24} {share:>4.0%} of conversations, median {median} tokens, sigma {sigma}")
    rng = np.random.default_rng(args.seed)
    lengths = lengths[rng.permutation(len(lengths))]
    too_long = lengths > capacity
    fit = lengths[~too_long]
    print(f"{len(lengths):,} conversations, {int(lengths.sum()):,} tokens, mean {lengths.mean():.0f}; "
          f"{int(too_long.sum()):,} ({100 * too_long.mean():.2f}%) longer than a {capacity}-token sample "
          f"(cut at a message end or dropped; left out below)")
    print(f"{'pack_impl':<20} {'samples':>9} {'padding':>8} {'seconds':>8}")
    for impl in ("best_fit", "pack_until_overflow", "unpacked"):
        start = time.perf_counter()
        bins = pack(fit, capacity, impl)
        seconds = time.perf_counter() - start
        padding = 1 - fit.sum() / (len(bins) * capacity)
        print(f"{impl:<20} {len(bins):>9,} {100 * padding:>7.2f}% {seconds:>8.1f}")
    # packed: one stream; a sample starts inside a conversation unless a conversation starts exactly there.
    ends = np.cumsum(fit)
    samples = int(ends[-1] // args.seq_length)
    starts = np.arange(samples) * args.seq_length
    inside = ~np.isin(starts, np.concatenate([[0], ends]))
    print(f"{'packed':<20} {samples:>9,} {0.0:>7.2f}%  ({100 * inside.mean():.1f}% of samples start inside a "
          f"conversation, without its system/user turns)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
