#!/usr/bin/env python3
"""Summarise an indexed dataset (PREFIX.{bin,idx}) and optionally decode documents.

Example:
    python tools/datasets/inspect_dataset.py data/demo/python_docs_text_document --decode 2

Opening the dataset validates it (magic, version, dtype, sizes, document index); --check-vocab also scans every
token against the tokenizer's vocabulary.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing

import numpy as np  # noqa: E402

from megatron.data.gpt_dataset import document_token_ranges  # noqa: E402
from megatron.data.indexed_dataset import CorruptDatasetError, IndexedDataset  # noqa: E402
from megatron.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def summary(ds: IndexedDataset) -> str:
    _, lengths = document_token_ranges(ds)
    lines = [
        f"dataset    {ds.prefix}",
        f"dtype      {ds.dtype}",
        f"documents  {ds.num_documents:,}",
        f"sequences  {len(ds):,}",
        f"tokens     {ds.num_tokens:,}",
    ]
    if len(lengths):
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        lines.append(
            f"doc tokens min {lengths.min():,}  mean {lengths.mean():,.1f}  p50 {p50:,.0f}  p90 {p90:,.0f}  "
            f"p99 {p99:,.0f}  max {lengths.max():,}  empty {(lengths == 0).sum():,}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", help="dataset prefix (without .bin/.idx)")
    parser.add_argument("--decode", type=int, default=0, metavar="N", help="print the first N documents as text")
    parser.add_argument("--max-chars", type=int, default=500, help="characters shown per decoded document")
    parser.add_argument("--check-vocab", action="store_true", help="check every token id is below the vocab size")
    parser.add_argument("--tokenizer-type", default="Llama3Tokenizer", choices=TOKENIZER_TYPES)
    parser.add_argument("--vocab-file", default=None)
    args = parser.parse_args(argv)
    try:
        ds = IndexedDataset(args.prefix)
    except (FileNotFoundError, CorruptDatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(summary(ds))
    if not (args.decode or args.check_vocab):
        return 0
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file)
    if args.check_vocab and ds.num_tokens:
        top = int(ds.tokens.max())
        low = int(ds.tokens.min())
        ok = 0 <= low and top < tokenizer.vocab_size
        print(f"token ids  {low:,}..{top:,}: {'within' if ok else 'OUTSIDE'} {tokenizer.name}'s vocabulary "
              f"of {tokenizer.vocab_size:,}")
        if not ok:
            return 1
    ids = {tokenizer.bos_id: "BOS", tokenizer.eod_id: "EOD"}
    for doc in range(min(args.decode, ds.num_documents)):
        tokens = ds.document_tokens(doc)
        marks = [ids[t] for t in (int(tokens[0]), int(tokens[-1])) if t in ids] if len(tokens) else []
        text = tokenizer.decode(tokens.tolist())
        shown = text if len(text) <= args.max_chars else text[: args.max_chars] + " [...]"
        print(f"\n--- document {doc}: {len(tokens):,} tokens {'(' + ', '.join(marks) + ')' if marks else ''}\n"
              f"{shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
