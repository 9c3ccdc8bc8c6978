#!/usr/bin/env python3
"""Training throughput on one GPU: this trainer (deepy.py → train.py) against HF transformers on the same shapes.

For each model shape: bf16 with fp32 master weights, ZeRO-1, seq 8192, micro-batch 1, gradient accumulation 8,
real Llama-3 tokens from a .bin/.idx file. The peer is HF `LlamaForCausalLM` (SDPA attention, the usual user
choice) doing the same 8 micro-batches per optimizer step (benchmarks/peer_hf_llama.py). The bf16 matmul peak is
measured in the same call (8192³ GEMMs: a warm-up of at least 1 s, then five ~1 s windows timed with CUDA events);
MFU is against the median window, the max is recorded beside it. FLOPs per token: 6·N_matmul + 12·L·h·s
(megatron/metrics.py).

    python benchmarks/train_throughput.py --shapes 8b-4l,1b --variants eager,fast [--steps 8] [--report]

Runs go in the order given, per shape; `hf` in --variants places the peer's run (without it the peer runs first
for each shape, unless --no-peer). Everything that touches the GPU runs in a child process (the peak, the tests,
every run), so this process never holds a CUDA context or cached blocks beside a run.

Variants switch the kernel keys (configs/README.md, "KernelArgs"): `defaults` sets none of them; `eager` = flash
SDPA, unfused pointwise ops, no gradient_accumulation_fusion; `fast` = cuDNN SDPA on Hopper, torch.compile'd
RMSNorm/RoPE/SwiGLU, still without the fusion (the defaults before 2026-11-24, kept so rows stay comparable);
`fast-fusedgrad` = fast plus gradient_accumulation_fusion (the defaults now); `fast-fusedgrad-selective` also
recomputes selectively where a shape needs checkpointing; `fast-fusedgrad-fp8` and `fast-fusedgrad-fp8-rowwise` =
fast-fusedgrad with the transformer layers' GEMMs in FP8 (torchao, tensorwise / rowwise scaling; docs/fp8.md), to
run beside `fast-fusedgrad` in the same call: `--variants fast-fusedgrad,fast-fusedgrad-fp8,fast-fusedgrad-fp8-rowwise`. First it runs the GPU-only tests (tests_gpu/,
`make test-gpu`), so every timed GPU branch is also checked in the same run (--skip-gpu-tests to leave them out).

Before each of our runs the planner (megatron/planning/) predicts its peak memory; a run predicted not to fit the
GPU is skipped (`--run-predicted-oom` runs it anyway) and every measured peak is printed beside its prediction.
Prints a table; --json writes the records (atomically: the header with the peak and the tests' outcome as soon as
they are known, then again after every row). The GPU machine's calls are short (10 minutes) and only files come
back, so a call must end on its own: --deadline (seconds from the start, default 560, under `timeout 570`) caps
every child process (the GPU tests at --gpu-tests-timeout, 200 s), a run that would not end in time is killed
with its process group and recorded as an error row with its log's tail, and a run is not started when less than
--min-run-s (90 s; 60 for the peer) is left. A long sweep is split into calls whose JSON files are merged
afterwards, on any machine:

    python benchmarks/train_throughput.py --report-from call1.json call2.json [--report] [--record-memory]

(a later file's row replaces an earlier one of the same shape, trainer and variant). --report appends the table to
docs/performance.md; --record-memory adds our measured peaks to benchmarks/results/memory_measurements.json, which
tests/test_plan.py holds the planner to (within 15%).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.monotonic()  # before the heavy imports: --deadline counts from here, as `timeout` does
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
    "defaults": {},  # no kernel key set: what a config gets
    "eager": {"attention_backend": "flash", "fuse_pointwise": False, "gradient_accumulation_fusion": False},
    "fast": {"attention_backend": "auto", "fuse_pointwise": True, "gradient_accumulation_fusion": False},
    # + weight-gradient GEMMs accumulating into DeepSpeed's fp32 buffer (megatron/grad_accum_fusion.py)
    "fast-fusedgrad": {"attention_backend": "auto", "fuse_pointwise": True, "gradient_accumulation_fusion": True},
    # + selective recompute (megatron/model/recompute.py) on the shapes that need checkpointing
    "fast-fusedgrad-selective": {"attention_backend": "auto", "fuse_pointwise": True,
                                 "gradient_accumulation_fusion": True, "recompute_granularity": "selective"},
    # + the transformer layers' GEMMs in FP8 through torchao (megatron/model/fp8.py, docs/fp8.md)
    "fast-fusedgrad-fp8": {"attention_backend": "auto", "fuse_pointwise": True, "gradient_accumulation_fusion": True,
                           "fp8": {"recipe": "tensorwise"}},
    "fast-fusedgrad-fp8-rowwise": {"attention_backend": "auto", "fuse_pointwise": True,
                                   "gradient_accumulation_fusion": True, "fp8": {"recipe": "rowwise"}},
}
COMMON = dict(seq_length=8192, max_position_embeddings=131072, rotary_emb_base=500000.0,
              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192),
              rms_norm_epsilon=1e-5, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=8,
              precision="bf16", zero_optimization={"stage": 1}, optimizer={"type": "Adam", "params": {"lr": 1e-5}},
              warmup=0.0, lr_decay_style="constant", log_interval=1, eval_iters=0, num_workers=2, num_gpus=1)


def now() -> float:
    return time.monotonic()


class Deadline:
    """Seconds left of this call's --deadline, from which every child process's timeout is derived."""

    def __init__(self, seconds: float, margin: float = 10.0):
        self.end, self.seconds, self.margin = STARTED + seconds, seconds, margin

    def left(self) -> float:
        return self.end - now()

    def timeout(self, cap: float | None = None) -> float:
        """A child's timeout: what is left less the margin for killing it and writing its row, at most `cap`."""
        t = self.left() - self.margin
        return max(0.0, t if cap is None else min(cap, t))


def run_child(cmd: list[str], timeout: float, log: Path, cwd: Path = ROOT) -> int | None:
    """Run `cmd` in its own process group with stdout and stderr to `log`; its exit status, or None when it ran
    past `timeout` (then the whole group is killed: the launcher's workers and compile workers too, which a
    plain subprocess.run(timeout=...) would leave holding the GPU and its output pipe)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 0.01))
        except subprocess.TimeoutExpired:
            return None
        finally:  # ended, timed out, or we are being stopped (SIGTERM, Ctrl-C): nothing of the group outlives it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def log_tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop_on_sigterm(signum, frame):  # `timeout 570` sends SIGTERM: our children are in their own groups
    raise SystemExit(128 + signum)


def device_probe(warmup_s: float = 1.0, window_s: float = 1.0, windows: int = 5) -> dict:
    """Runs in a child process (--device-probe): the device, its memory and the bf16 matmul peak.

    8192³ GEMMs back to back: at least `warmup_s` of them first (clocks and cuBLAS settle), then `windows`
    windows of about `window_s` each, timed with CUDA events. The median window is the peak MFU is quoted
    against; a short burst reads higher than a sustained second (the peak measured 752-783 TFLOP/s in calls of
    50 GEMMs, about 70 ms)."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    out = torch.empty_like(a)
    # Also the short burst earlier calls quoted (50 GEMMs after 5, ~70 ms, wall clock), so rows can be read
    # against either convention from the same call.
    for _ in range(5):
        torch.mm(a, b, out=out)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        torch.mm(a, b, out=out)
    torch.cuda.synchronize()
    burst = 50 * 2 * n**3 / (time.perf_counter() - t) / 1e12
    t, done = time.perf_counter(), 0
    while time.perf_counter() - t < warmup_s:
        for _ in range(20):
            torch.mm(a, b, out=out)
        torch.cuda.synchronize()
        done += 20
    per_gemm = (time.perf_counter() - t) / done
    reps = max(1, round(window_s / per_gemm))
    tflops = []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        tflops.append(reps * 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e12)
    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(), "total_gib": props.total_memory / 2**30,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "peak_tflops": statistics.median(tflops), "peak_tflops_max": max(tflops),
            "peak_windows": [round(x, 1) for x in tflops], "peak_tflops_burst": burst,
            "peak_method": f"median of {windows} windows of {reps} 8192^3 bf16 GEMMs (~{window_s:g} s each, CUDA "
                           f"events) after a {warmup_s:g} s warm-up"}


def measure_device(timeout: float, log: Path) -> dict:
    """device_probe() in a child process, so this one never opens a CUDA context (~0.5 GiB with its cached
    blocks, held through every run otherwise)."""
    rc = run_child([sys.executable, str(Path(__file__).resolve()), "--device-probe"], timeout, log)
    if rc == 0:
        for line in reversed(log_tail(log, 100_000).splitlines()):  # its JSON line, whatever torch printed after
            if line.startswith("{") and '"peak_tflops"' in line:
                return json.loads(line)
    raise RuntimeError(f"the device probe {'timed out' if rc is None else f'exited {rc}'}:\n{log_tail(log)}")


def write_json(path: str | Path, obj: dict) -> None:
    """Atomically: a call killed mid-write leaves the previous version, never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def ensure_tokens(prefix: Path, deadline: Deadline | None = None) -> Path:
    """Real Llama-3 tokens: Python's bundled docs through the preprocessing tool (as `make demo` does)."""
    if not Path(str(prefix) + "_text_document.idx").exists():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        jsonl = prefix.parent / "corpus.jsonl"
        for name, cmd in (
                ("corpus", [sys.executable, str(ROOT / "tools/datasets/build_demo_corpus.py"), "--output", str(jsonl)]),
                ("preprocess", [sys.executable, str(ROOT / "tools/datasets/preprocess_data.py"), "--input",
                                str(jsonl), "--output-prefix", str(prefix), "--append-eod", "--workers", "8"])):
            log = prefix.parent / f"{name}.log"
            rc = run_child(cmd, deadline.timeout() if deadline else 3600, log)
            if rc != 0:
                raise RuntimeError(f"{name} {'timed out' if rc is None else f'exited {rc}'}:\n{log_tail(log)}")
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


# Lines of the trainer's log kept in each row of ours (the log itself stays on the GPU machine): the wgrad kernel
# the fusion chose, the model/layout/precision line, notes, phases, warnings.
LOG_KEEP = ("gradient accumulation fusion:", "Llama:", "layout ", "attention", "recompute", "note:",
            "phases (ms/step)", "training loss", "warn", "fallback")


def setup_lines(text: str, limit: int = 40) -> list[str]:
    kept: dict[str, None] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and any(k in line.lower() for k in map(str.lower, LOG_KEEP)):
            kept.setdefault(line[:400], None)
    return list(kept)[:limit]


def wgrad_kernel(lines: list[str]) -> str | None:
    """What the trainer's 'gradient accumulation fusion: ...' line says (megatron/trainer.py): the number of
    fused weights and the wgrad kernel grad_accum_fusion chose, or why the fusion is off."""
    for line in lines:
        if "gradient accumulation fusion:" in line:
            return line.split("gradient accumulation fusion:", 1)[1].strip()
    return None


def run_ours(shape: str, variant: str, data: Path, steps: int, work: Path, extra: dict,
             device_gib: float | None = None, timeout: float = 900) -> dict:
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
    # A fresh directory: the trainer appends to run_dir/metrics.jsonl, so an earlier run of the same shape and
    # variant (a re-run on a warm machine) would mix its steps into the median and its peak into the max.
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    path = run_dir / "bench.yml"
    path.write_text(yaml.safe_dump(cfg))
    log = run_dir / "log.txt"
    t = time.perf_counter()
    rc = run_child([sys.executable, str(ROOT / "deepy.py"), "train.py", str(path)], timeout, log)
    wall = time.perf_counter() - t
    text = log_tail(log, 10**7)
    head.update(wall_s=wall, setup=setup_lines(text), wgrad_kernel=wgrad_kernel(setup_lines(text)))
    if rc is None:
        return {**head, "timed_out": True, "error": f"timed out after {timeout:.0f} s (killed):\n" + text[-3000:]}
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    train = [r for r in records if "train/tokens_per_s" in r]
    if rc != 0 or not train:
        return {**head, "error": f"exit {rc}" + ("" if train else ", no train records") + ":\n" + text[-3000:]}
    return {**head, "steps": steps, "tokens_per_s": steady([r["train/tokens_per_s"] for r in train], 3),
            "tflops": steady([r["train/tflops_per_gpu"] for r in train], 3),
            "peak_gib": max(r["train/peak_mem_gib"] for r in train), "final_loss": train[-1]["train/loss"],
            "step_tokens_per_s": [round(r["train/tokens_per_s"]) for r in train]}


def run_gpu_tests(timeout: float, log: Path) -> tuple[str, str]:
    """pytest tests_gpu/ (the checks of every GPU-only branch against its plain definition): its summary line,
    and the log's tail when it failed or ran out of time (else "")."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests_gpu")]
    rc = run_child(cmd, timeout, log)
    lines = [x for x in log_tail(log, 10**7).strip().splitlines() if x.strip()]
    if rc is None:  # still time the runs: a stuck test must not cost the whole call
        return f"timed out after {timeout:.0f} s (killed)", log_tail(log, 4000)
    if rc != 0:
        print("\n".join(lines[-40:]), flush=True)
    summary = lines[-1] if lines else f"pytest exited {rc} with no output"
    return summary, ("" if rc == 0 else log_tail(log, 4000))


def run_peer(shape: str, steps: int, work: Path, timeout: float = 900) -> dict:
    out = work / f"hf_{shape}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks/peer_hf_llama.py"), "--shape-json", json.dumps(SHAPES[shape]),
           "--steps", str(steps), "--grad-accum", "8", "--seq", "8192", "--out", str(out)]
    if shape in NEEDS_CHECKPOINTING:
        cmd.append("--checkpointing")
    head = {"who": "hf", "shape": shape, "variant": "sdpa"}
    log = work / f"hf_{shape}.log"
    t = time.perf_counter()
    rc = run_child(cmd, timeout, log)
    head["wall_s"] = time.perf_counter() - t
    if rc is None:
        return {**head, "timed_out": True, "error": f"timed out after {timeout:.0f} s (killed):\n" + log_tail(log)}
    if rc != 0 or not out.exists():
        return {**head, "error": f"exit {rc}:\n" + log_tail(log)}
    measured = json.loads(out.read_text())
    tflops = measured["tokens_per_s"] * shape_flops_per_token(shape) / 1e12
    return {**head, "tflops": tflops, **measured}


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
    """One line per row; MFU against the median matmul peak measured in the row's own call, the ratio against the
    peer's row of the same shape from the same call (none across calls); the wgrad kernel is what the run's log said
    (gradient accumulation fusion)."""
    lines = ["| call | shape | trainer | variant | tokens/s | TFLOP/s per GPU | MFU vs median matmul peak | vs HF | "
             "peak GiB | planned GiB | wgrad kernel |", "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    hf = {(r["shape"], r.get("call")): r for r in rows if r["who"] == "hf" and "tflops" in r}
    for r in rows:
        planned = f"{r['planned_gib']:.1f}" if "planned_gib" in r else ""
        kernel = r.get("wgrad_kernel") or ""
        if "tflops" not in r:
            if "skipped" in r:
                why = "skipped: " + r["skipped"]
            elif r.get("timed_out"):
                why = f"timed out after {r.get('wall_s', 0):.0f} s (log tail in the JSON's error)"
            else:
                why = "failed (see the JSON's error)"
            lines.append(f"| {r.get('call', 1)} | {r['shape']} | {r['who']} | {r['variant']} | {why} | | | | | "
                         f"{planned} | {kernel} |")
            continue
        peer = hf.get((r["shape"], r.get("call")))
        ratio = f"{r['tflops'] / peer['tflops']:.2f}x" if peer else "-"
        if planned:
            planned += f" ({100 * (r['planned_gib'] / r['peak_gib'] - 1):+.1f}%)"
        lines.append(f"| {r.get('call', 1)} | {r['shape']} | {r['who']} | {r['variant']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops']:.0f} | "
                     f"{100 * r['tflops'] / r['peak_tflops']:.1f}% | {ratio} | {r['peak_gib']:.1f} | {planned} | "
                     f"{kernel} |")
    return "\n".join(lines)


def merge(calls: list[dict]) -> list[dict]:
    """Rows of several calls' JSON files, in first-seen order; a later call's row replaces an earlier one with the
    same (trainer, shape, variant). Each row keeps its own call's device, date and matmul peak."""
    merged: dict[tuple, dict] = {}
    for n, call in enumerate(calls, 1):
        for row in call["rows"]:
            row = {"call": n, "device": call["device"], "torch": call["torch"], "python": call.get("python", "?"),
                   "peak_tflops": call["peak_tflops"], "peak_tflops_max": call.get("peak_tflops_max"),
                   "peak_tflops_burst": call.get("peak_tflops_burst"),
                   "peak_method": call.get("peak_method", "50 back-to-back 8192^3 bf16 GEMMs after 5 (wall clock)"),
                   "date": call["date"], "gpu_tests": call.get("gpu_tests", ""), "commit": call.get("commit"), **row}
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
                    "commit": r.get("commit") or commit,
                    "source": f"benchmarks/train_throughput.py, shape {r['shape']}, variant "
                                                f"{r['variant']} (peak of the trainer's peak_mem_gib over the run)"})
    return out


def report(rows: list[dict], append: bool, record: bool, commit: str) -> str:
    calls: dict[int, dict] = {}
    for r in rows:  # a call's fields are on each of its rows
        calls.setdefault(r.get("call", 1), r)
    text = table(rows) + "\n"
    for n, r in sorted(calls.items()):
        text += (f"\nCall {n} on {r['device']}, torch {r['torch']}, Python {r['python']}, {r['date']}: bf16 matmul "
                 f"peak {r['peak_tflops']:.0f} TFLOP/s"
                 + (f" (max {r['peak_tflops_max']:.0f})" if r.get("peak_tflops_max") else "") + f", {r['peak_method']}"
                 + (f"; a 50-GEMM burst (~70 ms, the convention of earlier calls) read {r['peak_tflops_burst']:.0f} "
                    "TFLOP/s" if r.get("peak_tflops_burst") else "")
                 + (f". GPU-only tests (tests_gpu/) in the same call: {r['gpu_tests']}" if r.get("gpu_tests") else "")
                 + ".")
    if append:
        with open(ROOT / "docs" / "performance.md", "a") as f:
            f.write(f"\n## Training throughput (benchmarks/train_throughput.py) ({time.strftime('%Y-%m-%d %H:%M')}, "
                    f"code {commit})\n\nseq 8192, micro-batch 1, gradient accumulation 8, bf16 with fp32 master "
                    f"weights, ZeRO-1; median of steps after the third. FLOPs/token 6N+12Lhs. MFU is against the "
                    f"median of the matmul peak's ~1 s windows measured in the row's own call (how, and the max "
                    f"window, below the table); 'planned' is tools/plan.py's prediction of the peak (its error "
                    f"against the measured peak in brackets); 'wgrad kernel' is the trainer's own line naming the "
                    f"weight-gradient kernel of gradient_accumulation_fusion.\n\n{text}\n")
    if record:
        planning.append_memory_records(memory_records(rows, commit))
    return text


def plan_runs(shapes: list[str], variants: list[str], no_peer: bool) -> list[tuple[str, str]]:
    """(shape, variant) in the order to run them: per shape, the variants as given; `hf` is the peer's place
    (first when not given, none with --no-peer)."""
    order = []
    for shape in shapes:
        vs = list(variants)
        if no_peer:
            vs = [v for v in vs if v != "hf"]
        elif "hf" not in vs:
            vs.insert(0, "hf")
        order += [(shape, v) for v in vs]
    return order


OURS_MIN_S, PEER_MIN_S = 90.0, 60.0  # about the shortest a run takes on the H100, start-up included


def deadline_note(deadline: Deadline, need: float) -> str:
    return (f"deadline: {deadline.left():.0f} s left of --deadline {deadline.seconds:.0f}, a run needs about "
            f"{need:.0f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="8b-4l,1b")
    ap.add_argument("--variants", default="eager,fast",
                    help=f"in the order to run them, of {', '.join(VARIANTS)}; `hf` places the peer's run")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--work", default="/tmp/throughput")
    ap.add_argument("--extra", default="{}", help="JSON of extra config keys for our runs (e.g. profiling)")
    ap.add_argument("--json", help="write all records here (atomically, after the tests and after every row)")
    ap.add_argument("--report", action="store_true", help="append the table to docs/performance.md")
    ap.add_argument("--skip-gpu-tests", action="store_true", help="do not run tests_gpu/ first")
    ap.add_argument("--gpu-tests-timeout", type=float, default=200.0, help="seconds (killed after)")
    ap.add_argument("--deadline", type=float, default=560.0,
                    help="seconds from the start by which the call ends on its own (under `timeout 570`): every "
                         "child's timeout comes from it")
    ap.add_argument("--min-run-s", type=float, default=OURS_MIN_S,
                    help=f"do not start one of our runs with less than this left ({PEER_MIN_S:.0f} s for the peer)")
    ap.add_argument("--run-predicted-oom", action="store_true",
                    help="run our variants even where the planner predicts they do not fit the GPU")
    ap.add_argument("--report-from", nargs="+", metavar="JSON",
                    help="no GPU needed: merge these --json files of earlier calls and print (--report: append) them")
    ap.add_argument("--record-memory", action="store_true",
                    help="add our measured peaks to benchmarks/results/memory_measurements.json")
    ap.add_argument("--device-probe", action="store_true", help=argparse.SUPPRESS)  # the child measure_device runs
    args = ap.parse_args(argv)

    if args.device_probe:
        print(json.dumps(device_probe()), flush=True)
        return
    if args.report_from:
        rows = merge([json.loads(Path(f).read_text()) for f in args.report_from])
        print(report(rows, args.report, args.record_memory, planning.code_version()))
        return
    shapes, variants = args.shapes.split(","), args.variants.split(",")
    unknown = [s for s in shapes if s not in SHAPES] + [v for v in variants if v not in VARIANTS and v != "hf"]
    if unknown:
        ap.error(f"unknown shape or variant: {', '.join(unknown)}")

    deadline = Deadline(args.deadline)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)  # children die with us (run_child's finally)
    try:
        sweep(args, shapes, variants, deadline)
    finally:
        signal.signal(signal.SIGTERM, previous)


def sweep(args: argparse.Namespace, shapes: list[str], variants: list[str], deadline: Deadline) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        probe = measure_device(deadline.timeout(180), work / "device_probe.log")
    except RuntimeError as e:
        if args.json:
            write_json(args.json, {"error": str(e)[-4000:], "rows": []})  # merge() reads it as a call of no rows
        raise
    device_gib = None if args.run_predicted_oom else probe["total_gib"]
    print(f"{probe['device']} | torch {probe['torch']} | bf16 matmul peak {probe['peak_tflops']:.0f} TFLOP/s "
          f"(median; max {probe['peak_tflops_max']:.0f}; windows {probe['peak_windows']}; 50-GEMM burst "
          f"{probe['peak_tflops_burst']:.0f})", flush=True)
    call = {"device": probe["device"], "torch": probe["torch"], "python": platform.python_version(),
            "peak_tflops": probe["peak_tflops"], "peak_tflops_max": probe["peak_tflops_max"],
            "peak_windows": probe["peak_windows"], "peak_method": probe["peak_method"],
            "peak_tflops_burst": probe["peak_tflops_burst"], "device_gib": probe["total_gib"],
            "date": time.strftime("%Y-%m-%d"), "gpu_tests": "running",
            "commit": planning.code_version(), "deadline_s": args.deadline, "rows": []}

    def save() -> None:
        if args.json:  # a call cut off by its time limit still brings back what it measured
            write_json(args.json, call)

    save()
    if args.skip_gpu_tests:
        call["gpu_tests"] = "not run (--skip-gpu-tests)"
    else:
        call["gpu_tests"], tail = run_gpu_tests(deadline.timeout(args.gpu_tests_timeout), work / "gpu_tests.log")
        if tail:
            call["gpu_tests_log_tail"] = tail
    print(f"GPU-only tests (tests_gpu/): {call['gpu_tests']}", flush=True)
    save()

    def add(row: dict) -> None:
        call["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("config", "setup")})[:3000], flush=True)
        save()

    try:
        data = ensure_tokens(work / "data" / "pydocs", deadline)
    except RuntimeError as e:
        call["error"] = str(e)[-4000:]
        save()
        raise
    extra = json.loads(args.extra)
    seen: dict[tuple, str] = {}  # (shape, config) -> the variant that ran it: where a shape is not checkpointed,
    for shape, variant in plan_runs(shapes, variants, args.no_peer):  # the selective variant is the fused one
        if variant == "hf":
            if deadline.timeout() < PEER_MIN_S:
                add({"who": "hf", "shape": shape, "variant": "sdpa", "skipped": deadline_note(deadline, PEER_MIN_S)})
            else:
                add(run_peer(shape, args.steps, work, timeout=deadline.timeout()))
            continue
        keys = our_config(shape, variant, extra)
        key = (shape, json.dumps(keys, sort_keys=True))
        if key in seen:
            add({"who": "ours", "shape": shape, "variant": variant, "skipped": f"the same config as {seen[key]}"})
            continue
        seen[key] = variant
        fits = device_gib is None or predicted_to_fit(planned_gib(keys), device_gib)
        if fits and deadline.timeout() < args.min_run_s:  # (one predicted not to fit is skipped by run_ours)
            add({"who": "ours", "shape": shape, "variant": variant,
                 "skipped": deadline_note(deadline, args.min_run_s)})
            continue
        add(run_ours(shape, variant, data, args.steps, work, extra, device_gib, timeout=deadline.timeout()))
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # the runs' numbers would carry a second context
        call["warning"] = "the benchmark's own process opened a CUDA context"
        save()
    print(report(merge([call]), args.report, args.record_memory, call["commit"]))


if __name__ == "__main__":
    main()
