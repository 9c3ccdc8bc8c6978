#!/usr/bin/env python3
"""Convert a Hugging Face Llama checkpoint (config.json + sharded safetensors) to this trainer's format.

Example:
    python tools/ckpts/convert_hf_llama_to_neox.py --hf-dir Llama-3.1-70B --output-dir ckpts/llama70b --tp 8 --pp 8

Writes OUT/global_step0 (DeepSpeed pipeline files + neox_meta.json), OUT/latest and OUT/model.yml (the model keys
to train it with). Train from it with `load: OUT` in the run config (weights only, starting at step 0). The
conversion streams one layer at a time; see docs/converters.md for memory and time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json, *.safetensors, index)")
    parser.add_argument("--output-dir", required=True, help="checkpoint root to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (model_parallel_size)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (pipe_parallel_size)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary to a multiple of this x TP, as the training config will")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="dtype of the written weights (default: the source's)")
    parser.add_argument("--pipe-partition-method", default="type:transformer",
                        help="must match the training config's pipe_partition_method")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from megatron.checkpoint.convert import hf_to_neox, peak_rss_bytes, run_cli

    start = time.perf_counter()
    rc = run_cli(lambda: hf_to_neox(
        args.hf_dir, args.output_dir, args.tp, args.pp, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        dtype=args.dtype, pipe_partition_method=args.pipe_partition_method, overwrite=args.overwrite,
        progress=not args.no_progress))
    if rc == 0:
        print(f"done in {time.perf_counter() - start:.1f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
