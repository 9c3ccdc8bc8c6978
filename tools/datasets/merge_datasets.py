#!/usr/bin/env python3
"""Concatenate indexed datasets (PREFIX.{bin,idx}) into one, documents in the order given.

Example:
    python tools/datasets/merge_datasets.py --inputs data/a_text_document data/b_text_document \\
        --output-prefix data/ab_text_document

All inputs must share a token dtype. The output is written under temporary names and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing

from tqdm import tqdm  # noqa: E402

from megatron.data.indexed_dataset import (  # noqa: E402
    CorruptDatasetError,
    IndexedDataset,
    IndexedDatasetWriter,
    bin_path,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True, help="dataset prefixes (without .bin/.idx)")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.{bin,idx}")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    args = parser.parse_args(argv)
    if os.path.abspath(args.output_prefix) in {os.path.abspath(p) for p in args.inputs}:
        parser.error("the output prefix must differ from every input")
    try:
        datasets = [IndexedDataset(prefix) for prefix in args.inputs]  # validates every input before writing
        dtypes = {str(ds.dtype) for ds in datasets}
        if len(dtypes) > 1:
            raise ValueError(f"inputs have different token dtypes: {', '.join(sorted(dtypes))}")
        total = sum(os.path.getsize(bin_path(ds.prefix)) for ds in datasets)
        with IndexedDatasetWriter(args.output_prefix, datasets[0].dtype) as writer, \
                tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not args.progress) as bar:
            for ds in datasets:
                writer.add_index(ds.prefix, on_bytes=bar.update)
            writer.finalize()
    except (FileNotFoundError, CorruptDatasetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    merged = IndexedDataset(args.output_prefix)
    print(f"wrote {args.output_prefix}.{{bin,idx}}: {merged.num_documents:,} documents, {len(merged):,} sequences, "
          f"{merged.num_tokens:,} tokens ({merged.dtype}) from {len(datasets)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
