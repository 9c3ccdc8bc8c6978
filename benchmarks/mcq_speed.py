#!/usr/bin/env python3
"""Next-token MCQ speed: tools/eval/mcq.py's scorer against lm-evaluation-harness's `hf` model scoring the same
questions as a `multiple_choice` task (the same prompt text, choices " A".." D"), same model, same process.

The model is a random Llama-3-vocabulary model of --shape written as an HF folder with the project's tokenizer
files (or --model FOLDER); the questions are --questions synthetic ones of Astrobench length, prompted with the
default shots (the paper's appendix A examples). Both sides run after a warm-up batch; the predictions of both
are compared (they must agree: lm-eval's highest log-likelihood of " X" is our highest next-token logit).
Prints a table and appends it to docs/performance.md.

    python benchmarks/mcq_speed.py [--shape small] [--questions 200] [--batch-size 16] [--device cpu] [--no-report]

--full-pass N then times the tool itself as a user runs it, in its own process: `tools/eval/mcq.py` over N synthetic
questions with --method next-token and with --method instruct (greedy, --max-new-tokens; a random model never
ends its reply, so every reply runs to that limit: an upper bound), and --json writes every number:

    python benchmarks/mcq_speed.py --shape 8b --device cuda --questions 500 --full-pass 4425 --json mcq_8b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, intermediate
    "tiny": (64, 2, 8, 2, 160),
    "small": (512, 8, 8, 2, 1536),
    "1b": (2048, 16, 32, 8, 8192),
    "8b": (4096, 32, 32, 8, 14336),
}
def build_model(shape: str, out: Path, dtype: torch.dtype, device: str = "cpu") -> None:
    import transformers

    from megatron.checkpoint.hf_tokenizer import write_llama3_tokenizer

    hidden, layers, heads, kv, inter = SHAPES[shape]
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000,
                                   eos_token_id=128001, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # on the GPU an 8B model is initialized in seconds, not minutes
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(str(out))
    del model
    write_llama3_tokenizer(out)


def synthetic(n: int, seed: int = 0) -> list:
    from megatron.eval.questions import parse_row

    rng = random.Random(seed)
    words = ("stellar mass halo accretion disk redshift galaxy cluster luminosity metallicity spectrum emission "
             "absorption magnetic field pulsar neutron dwarf nebula cosmic microwave background dark energy "
             "supernova radius temperature density velocity dispersion").split()

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    return [parse_row({"id": f"q{i}", "question": text(22).capitalize() + "?",
                       "options": [text(18).capitalize() + "." for _ in range(4)], "answer": "ABCD"[i % 4]},
                      "synthetic", i + 1) for i in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--model", default=None, help="an HF folder to use instead of a random --shape model")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16 / fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--full-pass", type=int, default=0, metavar="N",
                   help="also time tools/eval/mcq.py (next-token, instruct) over N questions in its own process")
    p.add_argument("--max-new-tokens", type=int, default=32, help="--full-pass instruct: the reply limit")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype] or (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from megatron.eval.next_token import NextTokenScorer, hf_candidate_logits
    from megatron.eval.lm_eval_task import write_mcq_task
    from megatron.eval.shots import PAPER_EXAMPLES
    from megatron.generation.loading import load_model

    work = Path(tempfile.mkdtemp(prefix="mcq_speed_"))
    folder = Path(args.model) if args.model else work / "model"
    if not args.model:
        build_model(args.shape, folder, dtype, args.device)
    questions = synthetic(args.questions)

    # ours: the tool's scorer, batches of --batch-size, longest prompts first (as tools/eval/mcq.py runs)
    loaded = load_model(folder, device=args.device, dtype=dtype)
    scorer = NextTokenScorer(loaded.tokenizer, hf_candidate_logits(loaded.model, 128001), PAPER_EXAMPLES)
    order = sorted(questions, key=lambda q: -len(scorer.prompt(q)))
    prompt_tokens = sum(len(scorer.prompt(q)) for q in questions) / len(questions)
    scorer.score(order[:args.batch_size])  # warm-up
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    ours = {}
    for i in range(0, len(order), args.batch_size):
        for r in scorer.score(order[i:i + args.batch_size]):
            ours[r["id"]] = r["prediction"]
    sync()
    ours_s = time.perf_counter() - t0
    del loaded, scorer
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    # lm-eval's hf model on the same prompts as a multiple_choice task (4 log-likelihood requests per question)
    tasks = work / "tasks"
    rows = write_mcq_task(questions, PAPER_EXAMPLES, tasks, "mcq_speed")
    lm = HFLM(pretrained=str(folder), device=args.device, dtype=dtype, batch_size=args.batch_size)
    # (a) lm-eval's model alone: the 4 log-likelihood requests per question the multiple_choice task makes
    requests = [Instance(request_type="loglikelihood", doc=r, arguments=(r["prompt"], " " + letter), idx=k,
                         metadata=("mcq_speed", i, 1)) for i, r in enumerate(rows) for k, letter in enumerate("ABCD")]
    lm.loglikelihood(requests[:4 * args.batch_size], disable_tqdm=True)  # warm-up
    sync()
    t0 = time.perf_counter()
    lls = lm.loglikelihood(requests, disable_tqdm=True)
    sync()
    model_s = time.perf_counter() - t0
    by_model = {r["id"]: "ABCD"[max(range(4), key=lambda k: lls[4 * i + k][0])] for i, r in enumerate(rows)}
    # (b) the whole lm-eval run (task building, requests, metrics), as `lm_eval --tasks` does it
    manager = TaskManager(include_path=str(tasks))
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=["mcq_speed"], task_manager=manager, log_samples=True)
    sync()
    theirs_s = time.perf_counter() - t0
    theirs = {}
    for s in res["samples"]["mcq_speed"]:
        lls4 = [float(r[0]) for r in s["filtered_resps"]]
        theirs[s["doc"]["id"]] = "ABCD"[max(range(4), key=lambda k: lls4[k])]
    assert theirs == by_model, "lm-eval's task and its model calls disagree"
    agree = sum(ours[i] == by_model[i] for i in ours)

    n = len(questions)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    when = time.strftime("%Y-%m-%d %H:%M")
    shape = args.model or f"{args.shape} (hidden {SHAPES[args.shape][0]}, {SHAPES[args.shape][1]} layers)"
    lines = [
        f"## Next-token MCQ vs lm-eval `hf` (benchmarks/mcq_speed.py) ({when})", "",
        f"{n} synthetic Astrobench-length questions, 2-shot prompt (appendix A shots), mean {prompt_tokens:.0f} "
        f"prompt tokens; model {shape}, {str(dtype).removeprefix('torch.')}, {device}, batch {args.batch_size}; "
        f"torch {torch.__version__}, lm-eval {lm_eval.__version__}, Python {platform.python_version()}. lm-eval "
        "scores the same prompts as a multiple_choice task (choices \" A\"..\" D\"); each side after a warm-up "
        "batch, run one after the other in one process.", "",
        "| scorer | seconds | questions/s | ours is faster by | predictions agreeing with ours |",
        "|---|---:|---:|---:|---:|",
        f"| tools/eval/mcq.py next-token (shared prompt prefix run once, then each question's own tokens; "
        f"last-position logits) | {ours_s:.2f} | "
        f"{n / ours_s:.1f} | | |",
        f"| lm-eval `hf` model: loglikelihood of the {4 * n} requests | {model_s:.2f} | {n / model_s:.1f} | "
        f"{model_s / ours_s:.2f}x | {agree}/{n} |",
        f"| lm-eval `simple_evaluate` of the task (end to end) | {theirs_s:.2f} | {n / theirs_s:.1f} | "
        f"{theirs_s / ours_s:.2f}x | |", ""]
    record = {"when": when, "device": device, "model": shape, "dtype": str(dtype), "questions": n,
              "batch_size": args.batch_size, "prompt_tokens_mean": prompt_tokens, "ours_s": ours_s,
              "lm_eval_model_s": model_s, "lm_eval_end_to_end_s": theirs_s, "agree": agree}
    if args.full_pass:
        passes = full_passes(args, folder, work)
        record["full_pass"] = passes
        lines += [f"`tools/eval/mcq.py` itself over {args.full_pass} questions, in its own process (model load "
                  f"included; instruct: greedy, at most {args.max_new_tokens} new tokens, batch {args.batch_size}; a "
                  "random model never ends its reply early, so the instruct time is an upper bound):", "",
                  "| method | seconds (process) | questions/s (process) | questions/s (the tool's own, scoring) |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {m} | {r['seconds']:.1f} | {args.full_pass / r['seconds']:.1f} | "
                  f"{r.get('summary', {}).get('questions_per_second', float('nan')):.1f} |" if r.get("rc") == 0
                  else f"| {m} | failed: {r.get('error', '')[-200:]} | | |" for m, r in passes.items()]
        lines.append("")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_report:
        with open(os.path.join(REPO_ROOT, "docs", "performance.md"), "a") as f:
            f.write("\n" + "\n".join(lines))
    ok = all(r.get("rc") == 0 for r in record.get("full_pass", {}).values())
    return 0 if agree == n and ok else 1


def full_passes(args, folder: Path, work: Path) -> dict:
    """tools/eval/mcq.py as a user runs it, one process per method, timed from start to exit."""
    import subprocess

    qfile = work / "questions.jsonl"
    with open(qfile, "w") as f:
        for q in synthetic(args.full_pass, seed=1):
            f.write(json.dumps({"id": q.id, "question": q.question, **dict(zip("ABCD", q.options)),
                                "answer": q.answer}) + "\n")
    out = {}
    for method in ("next-token", "instruct"):
        cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "eval", "mcq.py"), "--model", str(folder),
               "--questions", str(qfile), "--method", method, "--output", str(work / f"run-{method}"),
               "--batch-size", str(args.batch_size), "--device", args.device, "--no-progress",
               "--max-new-tokens", str(args.max_new_tokens)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        r = {"rc": proc.returncode, "seconds": time.perf_counter() - t0}
        if proc.returncode != 0:
            r["error"] = proc.stderr[-1500:]
        else:
            summary = work / f"run-{method}" / "summary.json"
            if summary.exists():
                r["summary"] = json.loads(summary.read_text())
        out[method] = r
    return out


if __name__ == "__main__":
    sys.exit(main())
