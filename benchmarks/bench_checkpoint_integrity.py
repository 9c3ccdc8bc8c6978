#!/usr/bin/env python
"""What checkpoint checksums cost: save and load of a Llama-3.2-1B-shaped checkpoint with and without them.

    python benchmarks/bench_checkpoint_integrity.py                     # weights (bf16, 2.5 GB), append to docs
    python benchmarks/bench_checkpoint_integrity.py --optimizer         # + fp32 master and Adam moments (15 GB)

The files are the ones a training save writes, one torch.save per pipeline spec (embedding, 16 transformer layers,
final norm, output layer; `--optimizer` adds a ZeRO shard with fp32 master weights and both Adam moments), written
with the same calls DeepSpeed makes. "with checksums" adds what CheckpointManager adds: at save,
`metadata.checksum_files` over every file (after they are written, so usually from the page cache); at load,
`metadata.verify_files` before the files are read. One process does all the hashing here; in a run each rank
hashes 1/world of the files in parallel, so the added time divides by the number of ranks.
Appends a table to docs/performance.md (--no-doc to only print it).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron.checkpoint import metadata  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, MLP, VOCAB = 16, 2048, 32, 8, 8192, 128256
HEAD_DIM = HIDDEN // HEADS


def spec_tensors(dtype: torch.dtype) -> list[tuple[str, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)

    specs = [(metadata.layer_file(0, 0), {"word_embeddings.weight": t(VOCAB, HIDDEN)})]
    for i in range(LAYERS):
        specs.append((metadata.layer_file(i + 1, 0), {
            "input_layernorm.weight": t(HIDDEN), "post_attention_layernorm.weight": t(HIDDEN),
            "attention.q.weight": t(HEADS * HEAD_DIM, HIDDEN), "attention.k.weight": t(KV_HEADS * HEAD_DIM, HIDDEN),
            "attention.v.weight": t(KV_HEADS * HEAD_DIM, HIDDEN), "attention.dense.weight": t(HIDDEN, HIDDEN),
            "mlp.gate.weight": t(MLP, HIDDEN), "mlp.up.weight": t(MLP, HIDDEN), "mlp.down.weight": t(HIDDEN, MLP)}))
    specs.append((metadata.layer_file(LAYERS + 1, 0), {"norm.weight": t(HIDDEN)}))
    specs.append((metadata.layer_file(LAYERS + 2, 0), {"final_linear.weight": t(VOCAB, HIDDEN)}))
    return specs


def optimizer_shard(specs) -> dict:
    flat = torch.cat([v.float().flatten() for _, sd in specs for v in sd.values()])
    return {"optimizer_state_dict": {"fp32_flat_groups": [flat], "exp_avg": [flat.clone()],
                                     "exp_avg_sq": [flat.clone()]}}


def save_all(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True)
    for name, obj in files.items():
        with open(folder / name, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk, as a checkpoint must be before it is declared complete


def load_all(folder: Path, names) -> None:
    for name in names:
        torch.load(folder / name, map_location="cpu", weights_only=False)


def measure(work: Path, files: dict, repeats: int) -> dict:
    best: dict[str, float] = {}

    def keep(key, seconds):
        best[key] = min(best.get(key, float("inf")), seconds)

    for r in range(repeats):
        for checked in (False, True):
            folder = work / f"global_step{2 * r + checked}"
            t0 = time.perf_counter()
            save_all(folder, files)
            t1 = time.perf_counter()
            sums = metadata.checksum_files(folder, sorted(files)) if checked else None
            t2 = time.perf_counter()
            keep("save", t1 - t0)
            if checked:
                keep("checksum", t2 - t1)
            t3 = time.perf_counter()
            bad = metadata.verify_files(folder, sums, sorted(sums)) if checked else []
            t4 = time.perf_counter()
            assert not bad, bad
            load_all(folder, sorted(files))
            t5 = time.perf_counter()
            keep("load", t5 - t4)
            if checked:
                keep("verify", t4 - t3)
            shutil.rmtree(folder)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", action="store_true", help="add a ZeRO shard: fp32 master + two Adam moments")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many (default 2)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--no-doc", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    specs = spec_tensors(torch.bfloat16)
    files = dict(specs)
    if args.optimizer:
        files[metadata.optim_file(0, 0)] = optimizer_shard(specs)
    work = Path(tempfile.mkdtemp(prefix="ckpt_integrity_", dir=args.dir))
    try:
        best = measure(work, files, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = sum(v.numel() * v.element_size() for sd in files.values() if isinstance(sd, dict)
                for v in sd.values() if isinstance(v, torch.Tensor))
    if args.optimizer:
        total += sum(t.numel() * 4 for group in files[metadata.optim_file(0, 0)]["optimizer_state_dict"].values()
                     for t in group)
    gb = total / 1e9
    what = "bf16 weights" + (" + fp32 master and Adam moments" if args.optimizer else "")
    rows = [
        ("save (torch.save + fsync, every file)", best["save"], best["save"] + best["checksum"]),
        ("load (torch.load, every file)", best["load"], best["load"] + best["verify"]),
    ]
    lines = [
        "",
        f"### Checkpoint checksums: cost on a Llama-3.2-1B-shaped checkpoint ({time.strftime('%Y-%m-%d')})",
        "",
        f"{len(files)} files, {gb:.2f} GB ({what}), one process, best of {args.repeats}; "
        f"host: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs when measured); "
        f"xxh3-128 via the `xxhash` package. Files in the page cache (just written), as at a save; a cold load "
        f"reads from disk for both columns. `python benchmarks/bench_checkpoint_integrity.py"
        f"{' --optimizer' if args.optimizer else ''}`",
        "",
        "| step | without checksums (s) | with checksums (s) | added |",
        "|---|---:|---:|---:|",
    ]
    for name, plain, checked in rows:
        lines.append(f"| {name} | {plain:.2f} | {checked:.2f} | +{100 * (checked - plain) / plain:.0f}% |")
    lines += ["", f"Hashing alone: {gb / best['checksum']:.1f} GB/s at save, {gb / best['verify']:.1f} GB/s at "
                  f"load (one core). A run splits the files over its ranks, so each rank hashes 1/world of them.",
              ""]
    text = "\n".join(w for line in lines for w in (
        [line] if line.startswith("|") or len(line) <= 120 else textwrap.wrap(line, 120, break_on_hyphens=False)))
    print(text)
    if not args.no_doc:
        doc = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
        with open(doc, "a") as f:
            f.write(text)
        print(f"appended to {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
