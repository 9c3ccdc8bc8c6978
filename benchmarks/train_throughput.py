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
checked in the same run (--skip-gpu-tests to leave them out).

Before each of our runs the planner (megatron/planning.py) predicts its peak memory; a run predicted not to fit the
GPU is skipped (`--run-predicted-oom` runs it anyway) and every measured peak is printed beside its prediction.
Prints a table; --json writes the records. The GPU machine's calls are short (10 minutes) and only files come
back, so a long sweep is split into calls whose JSON files are merged afterwards, on any machine:

    python benchmarks/train_throughput.py --report-from call1.json call2.json [--report] [--record-memory]

(a later file's row replaces an earlier one of the same shape, trainer and variant). --report appends the table to
docs/performance.md; --record-memory adds our measured peaks to benchmarks/results/memory_measurements.json, which
tests/test_plan.py holds the planner to (within 15%).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron import planning  # noqa: E402

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


def our_config(shape: str, variant: str, extra: dict | None = None) -> dict:
    """The config keys of one of our runs, without the run-only ones (data, paths, length)."""
    cfg = {**COMMON, **SHAPES[shape], **VARIANTS[variant], "checkpoint_activations": shape in NEEDS_CHECKPOINTING,
           **(extra or {})}
    if not cfg["checkpoint_activations"]:
        cfg.pop("recompute_granularity", None)  # selective needs checkpointing (the config refuses it alone)
    return cfg


def planned_gib(cfg: dict) -> dict:
    """The planner's peak for a one-GPU run: allocated (what the trainer's peak_mem_gib reports) and device
    (with the caching allocator's slack, the CUDA context and communicator buffers)."""
    return {what: round(planning.predict_peak_gib(cfg, 1, what=what), 2) for what in ("allocated", "device")}


def predicted_to_fit(planned: dict, device_gib: float) -> bool:
    return planned["device"] <= device_gib


def run_ours(shape: str, variant: str, data: Path, steps: int, work: Path, extra: dict,
             device_gib: float | None = None) -> dict:
    import yaml

    run_dir = work / f"ours_{shape}_{variant}"
    keys = our_config(shape, variant, extra)
    cfg = {**keys, "train_iters": steps, "data_path": str(data), "split": "100,0,0", "run_dir": str(run_dir),
           "data_cache_dir": str(work / "cache")}
    planned = planned_gib(keys)
    head = {"who": "ours", "shape": shape, "variant": variant, "config": keys,
            "planned_gib": planned["allocated"], "planned_device_gib": planned["device"]}
    if device_gib is not None and not predicted_to_fit(planned, device_gib):
        return {**head, "skipped": f"planner: {planned['device']:.1f} GiB on the device > {device_gib:.1f} GiB"}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "bench.yml"
    path.write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {**head, "error": (proc.stdout + proc.stderr)[-3000:]}
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/tokens_per_s" in r]
    return {**head, "steps": steps, "tokens_per_s": steady([r["train/tokens_per_s"] for r in train], 3),
            "tflops": steady([r["train/tflops_per_gpu"] for r in train], 3),
            "peak_gib": max(r["train/peak_mem_gib"] for r in train), "wall_s": time.perf_counter() - t,
            "final_loss": train[-1]["train/loss"]}


def run_gpu_tests() -> str:
    """pytest tests_gpu/ (the checks of every GPU-only branch against its plain definition); its summary line."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests_gpu")],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:  # still time the runs: a stuck test must not cost the whole call
        return "timed out after 600 s"
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


def table(rows: list[dict]) -> str:
    """One line per row; MFU against the matmul peak measured in the row's own call, the ratio against the peer's
    row of the same shape."""
    lines = ["| shape | trainer | variant | tokens/s | TFLOP/s per GPU | MFU vs measured peak | vs HF | peak GiB | "
             "planned GiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    hf = {r["shape"]: r for r in rows if r["who"] == "hf" and "tflops" in r}
    for r in rows:
        planned = f"{r['planned_gib']:.1f}" if "planned_gib" in r else ""
        if "tflops" not in r:
            why = "skipped: " + r["skipped"] if "skipped" in r else "failed (see the JSON's error)"
            lines.append(f"| {r['shape']} | {r['who']} | {r['variant']} | {why} | | | | | {planned} |")
            continue
        ratio = f"{r['tflops'] / hf[r['shape']]['tflops']:.2f}x" if r["shape"] in hf else "-"
        if planned:
            planned += f" ({100 * (r['planned_gib'] / r['peak_gib'] - 1):+.1f}%)"
        lines.append(f"| {r['shape']} | {r['who']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
                     f"{100 * r['tflops'] / r['peak_tflops']:.1f}% | {ratio} | {r['peak_gib']:.1f} | {planned} |")
    return "\n".join(lines)


def merge(calls: list[dict]) -> list[dict]:
    """Rows of several calls' JSON files, in first-seen order; a later call's row replaces an earlier one with the
    same (trainer, shape, variant). Each row keeps its own call's device, date and matmul peak."""
    merged: dict[tuple, dict] = {}
    for call in calls:
        for row in call["rows"]:
            row = {"device": call["device"], "torch": call["torch"], "python": call.get("python", "?"),
                   "peak_tflops": call["peak_tflops"],
                   "date": call["date"], "gpu_tests": call.get("gpu_tests", ""), **row}
            key = (row["who"], row["shape"], row["variant"])
            merged.pop(key, None)  # a re-measured row moves to where it was measured last
            merged[key] = row
    return list(merged.values())


def memory_records(rows: list[dict], commit: str) -> list[dict]:
    """Our measured rows as records for benchmarks/results/memory_measurements.json (tests/test_plan.py)."""
    out = []
    for r in rows:
        if r["who"] != "ours" or "peak_gib" not in r:
            continue
        keys = planning.recorded_keys(planning.config_from_keys(r["config"]))
        out.append({"config": keys, "measured_peak_gib": round(r["peak_gib"], 3),
                    "metric": "torch.cuda.max_memory_allocated", "device": r["device"], "torch": r["torch"],
                    "steps": r.get("steps"), "world_size": 1,
                    "predicted_peak_gib": round(planning.predict_peak_gib(keys, 1), 3), "date": r["date"],
                    "commit": commit, "source": f"benchmarks/train_throughput.py, shape {r['shape']}, variant "
                                                f"{r['variant']} (peak of the trainer's peak_mem_gib over the run)"})
    return out


def report(rows: list[dict], append: bool, record: bool, commit: str) -> str:
    calls = sorted({(r["device"], r["torch"], r["python"], r["date"], round(r["peak_tflops"])) for r in rows})
    tests = sorted({r["gpu_tests"] for r in rows if r.get("gpu_tests")})
    text = table(rows) + "\n\n" + "\n".join(
        f"Call on {d}, torch {t}, Python {py}, {day}: bf16 matmul peak measured {p} TFLOP/s."
        for d, t, py, day, p in calls)
    text += "".join(f"\nGPU-only tests (tests_gpu/) in the same run: {x}." for x in tests)
    if append:
        with open(ROOT / "docs" / "performance.md", "a") as f:
            f.write(f"\n## Training throughput (benchmarks/train_throughput.py) ({time.strftime('%Y-%m-%d %H:%M')}, "
                    f"code {commit})\n\nseq 8192, micro-batch 1, gradient accumulation 8, bf16 with fp32 master "
                    f"weights, ZeRO-1; median of steps after the third. FLOPs/token 6N+12Lhs. MFU is against the "
                    f"matmul peak measured in the row's own call; 'planned' is tools/plan.py's prediction of the "
                    f"peak (its error against the measured peak in brackets).\n\n{text}\n")
    if record:
        planning.append_memory_records(memory_records(rows, commit))
    return text


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
    ap.add_argument("--run-predicted-oom", action="store_true",
                    help="run our variants even where the planner predicts they do not fit the GPU")
    ap.add_argument("--report-from", nargs="+", metavar="JSON",
                    help="no GPU needed: merge these --json files of earlier calls and print (--report: append) them")
    ap.add_argument("--record-memory", action="store_true",
                    help="add our measured peaks to benchmarks/results/memory_measurements.json")
    args = ap.parse_args()

    if args.report_from:
        rows = merge([json.loads(Path(f).read_text()) for f in args.report_from])
        print(report(rows, args.report, args.record_memory, planning.code_version()))
        return

    import torch

    work = Path(args.work)
    peak = matmul_peak_tflops()
    device = torch.cuda.get_device_name()
    device_gib = None if args.run_predicted_oom else torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"{device} | torch {torch.__version__} | bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    gpu_tests = "not run (--skip-gpu-tests)" if args.skip_gpu_tests else run_gpu_tests()
    print(f"GPU-only tests (tests_gpu/): {gpu_tests}", flush=True)
    data = ensure_tokens(work / "data" / "pydocs")
    extra = json.loads(args.extra)
    call = {"device": device, "torch": torch.__version__, "python": platform.python_version(), "peak_tflops": peak,
            "date": time.strftime("%Y-%m-%d"), "gpu_tests": gpu_tests, "commit": planning.code_version(), "rows": []}

    def add(row: dict) -> None:
        call["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "config"})[:3000], flush=True)
        if args.json:  # after every row: a call cut off by its time limit still brings back what it measured
            Path(args.json).write_text(json.dumps(call, indent=1))

    for shape in args.shapes.split(","):
        if not args.no_peer:
            add(run_peer(shape, args.steps))
        seen: dict[str, str] = {}  # config -> the variant that ran it: where a shape is not checkpointed,
        for variant in args.variants.split(","):  # the selective variant is the fused one again
            key = json.dumps(our_config(shape, variant, extra), sort_keys=True)
            if key in seen:
                add({"who": "ours", "shape": shape, "variant": variant, "skipped": f"the same config as {seen[key]}"})
                continue
            seen[key] = variant
            add(run_ours(shape, variant, data, args.steps, work, extra, device_gib))
    print(report(merge([call]), args.report, args.record_memory, call["commit"]))


if __name__ == "__main__":
    main()
