#!/usr/bin/env python3
"""Training throughput on one GPU: this trainer (deepy.py → train.py) against HF transformers on the same shapes.

For each model shape: bf16 with fp32 master weights, ZeRO-1, seq 8192, micro-batch 1, gradient accumulation 8,
real Llama-3 tokens from a .bin/.idx file. The peer is HF `LlamaForCausalLM` (SDPA attention, the usual user
choice) doing the same 8 micro-batches per optimizer step (benchmarks/peer_hf_llama.py). The bf16 matmul peak is
measured in the same run; MFU is against it. FLOPs per token: 6·N_matmul + 12·L·h·s (megatron/metrics.py).

    python benchmarks/train_throughput.py --shapes 8b-4l,1b --variants eager,fast [--steps 8] [--report]

Variants switch the kernel keys (configs/README.md, "KernelArgs"): `eager` = flash SDPA, unfused pointwise ops;
`fast` = the defaults (cuDNN SDPA on Hopper, torch.compile'd RMSNorm/RoPE/SwiGLU); `fast-fusedgrad` = fast plus
gradient_accumulation_fusion; `fast-fusedgrad-selective` also recomputes selectively where a shape needs
checkpointing. First it runs the GPU-only tests (tests_gpu/, `make test-gpu`), so every timed GPU branch is also
checked in the same run (--skip-gpu-tests to leave them out). Prints a table; --report appends it to
docs/performance.md; --json writes the records (with peak memory, for tools/plan.py's validation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    # Llama-3.1-8B width, cut to a few layers so one GPU holds weights, fp32 master and Adam state.
    "8b-4l": dict(num_layers=4, hidden_size=4096, num_attention_heads=32, num_kv_heads=8, intermediate_size=14336),
    "8b-8l": dict(num_layers=8, hidden_size=4096, num_attention_heads=32, num_kv_heads=8, intermediate_size=14336),
    "1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_kv_heads=8, intermediate_size=8192),
    "3b": dict(num_layers=28, hidden_size=3072, num_attention_heads=24, num_kv_heads=8, intermediate_size=8192),
}
# Shapes whose activations do not fit 80 GB at seq 8192 without recomputation (both trainers get it).
NEEDS_CHECKPOINTING = {"8b-8l", "3b"}
VARIANTS = {
    "eager": {"attention_backend": "flash", "fuse_pointwise": False},
    "fast": {"attention_backend": "auto", "fuse_pointwise": True},
    # + weight-gradient GEMMs accumulating into DeepSpeed's fp32 buffer (megatron/grad_accum_fusion.py)
    "fast-fusedgrad": {"attention_backend": "auto", "fuse_pointwise": True, "gradient_accumulation_fusion": True},
    # + selective recompute (megatron/model/recompute.py) on the shapes that need checkpointing
    "fast-fusedgrad-selective": {"attention_backend": "auto", "fuse_pointwise": True,
                                 "gradient_accumulation_fusion": True, "recompute_granularity": "selective"},
}
COMMON = dict(seq_length=8192, max_position_embeddings=131072, rotary_emb_base=500000.0,
              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192),
              rms_norm_epsilon=1e-5, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=8,
              precision="bf16", zero_optimization={"stage": 1}, optimizer={"type": "Adam", "params": {"lr": 1e-5}},
              warmup=0.0, lr_decay_style="constant", log_interval=1, eval_iters=0, num_workers=2, num_gpus=1)


def matmul_peak_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 50
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return n * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def ensure_tokens(prefix: Path) -> Path:
    """Real Llama-3 tokens: Python's bundled docs through the preprocessing tool (as `make demo` does)."""
    if not Path(str(prefix) + "_text_document.idx").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        jsonl = prefix.parent / "corpus.jsonl"
        subprocess.run([sys.executable, str(ROOT / "tools/datasets/build_demo_corpus.py"), "--output", str(jsonl)],
                       check=True)
        subprocess.run([sys.executable, str(ROOT / "tools/datasets/preprocess_data.py"), "--input", str(jsonl),
                        "--output-prefix", str(prefix), "--append-eod", "--workers", "8"], check=True)
    return Path(str(prefix) + "_text_document")


def steady(values: list[float], skip: int) -> float:
    return statistics.median(values[skip:] if len(values) > skip else values)


def run_ours(shape: str, variant: str, data: Path, steps: int, work: Path, extra: dict) -> dict:
    import yaml

    run_dir = work / f"ours_{shape}_{variant}"
    cfg = {**COMMON, **SHAPES[shape], **VARIANTS[variant], "train_iters": steps, "data_path": str(data),
           "split": "100,0,0", "run_dir": str(run_dir), "data_cache_dir": str(work / "cache"),
           "checkpoint_activations": shape in NEEDS_CHECKPOINTING, **extra}
    if not cfg["checkpoint_activations"]:
        cfg.pop("recompute_granularity", None)  # selective needs checkpointing (the config refuses it alone)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "bench.yml"
    path.write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"who": "ours", "shape": shape, "variant": variant, "error": (proc.stdout + proc.stderr)[-3000:]}
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/tokens_per_s" in r]
    return {"who": "ours", "shape": shape, "variant": variant, "config": cfg,
            "tokens_per_s": steady([r["train/tokens_per_s"] for r in train], 3),
            "tflops": steady([r["train/tflops_per_gpu"] for r in train], 3),
            "peak_gib": max(r["train/peak_mem_gib"] for r in train), "wall_s": time.perf_counter() - t,
            "final_loss": train[-1]["train/loss"]}


def run_gpu_tests() -> str:
    """pytest tests_gpu/ (the checks of every GPU-only branch against its plain definition); its summary line."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests_gpu")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [x for x in (proc.stdout + proc.stderr).strip().splitlines() if x.strip()]
    if proc.returncode != 0:
        print("\n".join(lines[-40:]), flush=True)
    return lines[-1] if lines else f"pytest exited {proc.returncode} with no output"


def run_peer(shape: str, steps: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks/peer_hf_llama.py"), "--shape-json", json.dumps(SHAPES[shape]),
           "--steps", str(steps), "--grad-accum", "8", "--seq", "8192"]
    if shape in NEEDS_CHECKPOINTING:
        cmd.append("--checkpointing")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"who": "hf", "shape": shape, "variant": "sdpa", "error": (proc.stdout + proc.stderr)[-3000:]}
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    tflops = measured["tokens_per_s"] * shape_flops_per_token(shape) / 1e12
    return {"who": "hf", "shape": shape, "variant": "sdpa", "tflops": tflops, **measured}


def shape_flops_per_token(shape: str) -> float:
    """The trainer's FLOPs convention (megatron/metrics.py), applied to the peer too."""
    from megatron.metrics import flops_per_token
    from megatron.model.config import LlamaConfig

    s = SHAPES[shape]
    cfg = LlamaConfig(num_layers=s["num_layers"], hidden_size=s["hidden_size"],
                      num_attention_heads=s["num_attention_heads"], num_kv_heads=s["num_kv_heads"],
                      intermediate_size=s["intermediate_size"], vocab_size=128256, padded_vocab_size=128256)
    return flops_per_token(cfg, COMMON["seq_length"])


def table(rows: list[dict], peak: float) -> str:
    lines = ["| shape | trainer | variant | tokens/s | TFLOP/s per GPU | MFU vs measured peak | vs HF | peak GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    hf = {r["shape"]: r for r in rows if r["who"] == "hf" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['who']} | {r['variant']} | failed | | | | |")
            continue
        ratio = f"{r['tflops'] / hf[r['shape']]['tflops']:.2f}x" if r["shape"] in hf else "-"
        lines.append(f"| {r['shape']} | {r['who']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
                     f"{100 * r['tflops'] / peak:.1f}% | {ratio} | {r['peak_gib']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8b-4l,1b")
    ap.add_argument("--variants", default="eager,fast")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--work", default="/tmp/throughput")
    ap.add_argument("--extra", default="{}", help="JSON of extra config keys for our runs (e.g. profiling)")
    ap.add_argument("--json", help="write all records here")
    ap.add_argument("--report", action="store_true", help="append the table to docs/performance.md")
    ap.add_argument("--skip-gpu-tests", action="store_true", help="do not run tests_gpu/ first")
    args = ap.parse_args()

    import torch

    work = Path(args.work)
    peak = matmul_peak_tflops()
    device = torch.cuda.get_device_name()
    print(f"{device} | torch {torch.__version__} | bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    gpu_tests = "not run (--skip-gpu-tests)" if args.skip_gpu_tests else run_gpu_tests()
    print(f"GPU-only tests (tests_gpu/): {gpu_tests}", flush=True)
    data = ensure_tokens(work / "data" / "pydocs")
    rows = []
    for shape in args.shapes.split(","):
        if not args.no_peer:
            rows.append(run_peer(shape, args.steps))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "config"})[:600], flush=True)
        for variant in args.variants.split(","):
            rows.append(run_ours(shape, variant, data, args.steps, work, json.loads(args.extra)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "config"})[:3000], flush=True)
    text = table(rows, peak) + f"\n\nGPU-only tests (tests_gpu/) in the same run: {gpu_tests}."
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "torch": torch.__version__, "peak_tflops": peak,
                                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    if args.report:
        with open(ROOT / "docs" / "performance.md", "a") as f:
            f.write(f"\n## Training throughput (benchmarks/train_throughput.py) ({time.strftime('%Y-%m-%d %H:%M')})\n\n"
                    f"Machine: {device}, torch {torch.__version__}, Python {platform.python_version()}; bf16 matmul "
                    f"peak measured in the same run: {peak:.0f} TFLOP/s. seq 8192, micro-batch 1, gradient "
                    f"accumulation 8, bf16 with fp32 master weights, ZeRO-1; median of steps after the third. "
                    f"FLOPs/token 6N+12Lhs.\n\n{text}\n")


if __name__ == "__main__":
    main()
