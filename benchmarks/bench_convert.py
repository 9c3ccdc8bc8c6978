#!/usr/bin/env python3
"""Converter time and peak memory on a Llama-3.2-1B-sized checkpoint of random bf16 weights (~2.5 GB).

The source is written tensor by tensor (never held whole) as Meta ships Llama-3.2-1B: one safetensors file,
tied embeddings, llama3 rope_scaling. Each conversion then runs as its own process through the CLI, and its
wall time and peak resident set size (ru_maxrss from wait4, so only that process) are recorded, next to the
resident size of a process that merely imports the same modules (the floor). The round trip is checked for
bit-identical tensors. Prints a table and appends it to docs/performance.md.

    python benchmarks/bench_convert.py [--tp 2 --pp 2] [--max-shard-size 1GB] [--workdir DIR] [--no-report]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (REPO_ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from bench_preprocess import append_report  # noqa: E402

from megatron.checkpoint.convert import hf_names, hf_shapes  # noqa: E402
from megatron.checkpoint.hf_config import model_keys_from_hf  # noqa: E402
from megatron.checkpoint.safetensors_stream import SafetensorsSource, ShardedWriter, shard_plan  # noqa: E402

# meta-llama/Llama-3.2-1B's config.json (shape and RoPE), with random weights.
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "head_dim": 64,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
GB = 1e9


def write_source(path: Path) -> int:
    path.mkdir(parents=True)
    keys = model_keys_from_hf(LLAMA32_1B)
    shapes = hf_shapes(keys)
    L = keys["num_layers"]
    order = [(n, shapes[n]) for s in range(L + 2) for n in hf_names(L, s)]  # tied: no lm_head.weight
    writer = ShardedWriter(path, shard_plan(order, torch.bfloat16, 10 * 10**9), torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for name, shape in order:
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
        writer.write(name, t.to(torch.bfloat16))
    writer.close()
    (path / "config.json").write_text(json.dumps(LLAMA32_1B, indent=2))
    return writer.total_bytes


# Runs a command's Python code, then reports the process's VmHWM (its own peak resident set; ru_maxrss from wait4
# would include this benchmark's resident set at fork time).
MEASURE = ("import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, {root!r});\n"
           "from megatron.checkpoint.convert import peak_rss_bytes\n"
           "try:\n    runpy.run_path(sys.argv[0], run_name='__main__') if sys.argv[0] != '-c' else exec(sys.argv[1])\n"
           "except SystemExit as e:\n    assert not e.code, e.code\n"
           "print('PEAK_RSS', peak_rss_bytes(), file=sys.stderr)")


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of that process alone) for `python SCRIPT ARGS` or `python -c CODE`."""
    start = time.perf_counter()
    proc = subprocess.run([cmd[0], "-c", MEASURE.format(root=REPO_ROOT), *cmd[1:]], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS")]
    return wall, int(peak[-1].split()[1])


def same_tensors(a: Path, b: Path) -> int:
    """Compare two HF directories tensor by tensor (lm_head against the tied embedding); returns the count."""
    sa, sb = SafetensorsSource(a), SafetensorsSource(b)
    n = 0
    for name in sb.tensors:
        ref = sa.get(name if name in sa else "model.embed_tokens.weight")
        got = sb.get(name)
        if got.dtype != ref.dtype or not torch.equal(got, ref):
            raise AssertionError(f"{name} differs after the round trip")
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--max-shard-size", default="1GB", help="export shard size")
    parser.add_argument("--workdir", default=None, help="where to write the ~12 GB of checkpoints (default: temp)")
    parser.add_argument("--no-report", action="store_true", help="do not append to docs/performance.md")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    tools = Path(REPO_ROOT) / "tools" / "ckpts"
    py = sys.executable
    try:
        t0 = time.perf_counter()
        src_bytes = write_source(work / "hf")
        print(f"random Llama-3.2-1B-sized source: {src_bytes / GB:.2f} GB in {time.perf_counter() - t0:.0f} s")
        floor_cmd = [py, "-c", f"import sys; sys.path.insert(0, {REPO_ROOT!r}); import deepspeed, safetensors.torch, "
                     "megatron.checkpoint.convert, transformers.convert_slow_tokenizer"]
        rows = [("python + torch + deepspeed + transformers imported (floor)", "", *run_measured(floor_cmd), 0.0)]
        floor = rows[0][3]

        runs = [
            (f"HF -> neox, TP 1 x PP 1", "hf2neox_11",
             [py, str(tools / "convert_hf_llama_to_neox.py"), "--hf-dir", str(work / "hf"), "--output-dir",
              str(work / "neox_11"), "--tp", "1", "--pp", "1", "--no-progress"], work / "neox_11"),
            (f"HF -> neox, TP {args.tp} x PP {args.pp}", "hf2neox",
             [py, str(tools / "convert_hf_llama_to_neox.py"), "--hf-dir", str(work / "hf"), "--output-dir",
              str(work / "neox"), "--tp", str(args.tp), "--pp", str(args.pp), "--no-progress"], work / "neox"),
            (f"neox (TP {args.tp} x PP {args.pp}) -> HF, {args.max_shard_size} shards, no tokenizer", "neox2hf",
             [py, str(tools / "convert_neox_to_hf.py"), "--input-dir", str(work / "neox"), "--output-dir",
              str(work / "hf_out"), "--max-shard-size", args.max_shard_size, "--no-tokenizer", "--no-progress"],
             work / "hf_out"),
            ("Llama-3 tokenizer files only (tiktoken -> tokenizer.json)", "tokenizer",
             [py, "-c", f"import sys; sys.path.insert(0, {REPO_ROOT!r}); from pathlib import Path; "
              "from megatron.checkpoint.hf_tokenizer import write_llama3_tokenizer; "
              f"Path({str(work / 'tok')!r}).mkdir(); write_llama3_tokenizer(Path({str(work / 'tok')!r}))"],
             work / "tok"),
        ]
        for label, _, cmd, out in runs:
            wall, rss = run_measured(cmd)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            rows.append((label, f"{size / GB:.2f}", wall, rss, rss - floor))
            print(f"{label}: {wall:.1f} s, peak RSS {rss / 2**30:.2f} GiB")
        checked = same_tensors(work / "hf", work / "hf_out")
        print(f"round trip: {checked} tensors bit-identical")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    emb = 128256 * 2048 * 2
    layer = (2048 * (2048 + 2 * 512 + 2048) + 3 * 2048 * 8192) * 2
    table = ["| step | output GB | wall s | peak RSS GiB | above the floor GiB |", "|---|---:|---:|---:|---:|"]
    for label, out, wall, rss, above in rows:
        table.append(f"| {label} | {out} | {wall:.1f} | {rss / 2**30:.2f} | "
                     f"{above / 2**30:.2f} |" if out else f"| {label} | | {wall:.1f} | {rss / 2**30:.2f} | |")
    notes = (f"Source: random bf16 weights in Llama-3.2-1B's shape (16 layers, hidden 2048, GQA 32:8, MLP 8192, vocab "
             f"128,256, tied embeddings), one {src_bytes / GB:.2f} GB model.safetensors as Meta ships it. The "
             f"neox checkpoint and the export are untied (lm_head written), {src_bytes / GB + emb / GB:.2f} GB. "
             f"Largest tensor: the embedding, {emb / 2**30:.2f} GiB; one transformer layer: {layer / 2**30:.2f} GiB. "
             f"Peak RSS is the converter process's own VmHWM (file pages it mapped included); 'above the "
             f"floor' subtracts a process that only imports the same modules. Round trip checked: {checked} "
             "tensors bit-identical (lm_head equal to the source's tied embedding). Files were in the page cache.")
    print("\n".join(table) + "\n\n" + notes)
    if not args.no_report:
        append_report("Checkpoint conversion (benchmarks/bench_convert.py)", table, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
