#!/usr/bin/env python3
"""Preprocessing throughput: bare tiktoken vs our tokenizer vs the full preprocess_data pipeline (1 and 2 workers),
and the cost of the optional cleaning steps (--ftfy, --remove-repetitions) with 1 worker.

Runs on the demo corpus (built on the fly if data/demo/python_docs.jsonl is missing), repeated --repeat times so
the run is long enough to time. Every row is timed --runs times, the rows interleaved (round-robin), and the best
run kept, so slow drift of the machine (other jobs, clock boost) does not favour one row. Prints a table and
appends it to docs/performance.md with machine and date.

    python benchmarks/bench_preprocess.py [--repeat 8] [--runs 3] [--no-report]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import importlib.util  # noqa: E402

from megatron.data.tokenizer import LLAMA3_PAT_STR, build_tokenizer, default_llama3_tokenizer_path  # noqa: E402

DEMO_CORPUS = os.path.join(REPO_ROOT, "data", "demo", "python_docs.jsonl")
REPORT = os.path.join(REPO_ROOT, "docs", "performance.md")


def machine_summary() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other work on the machine skews the numbers
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}, load {load}"


def append_report(title: str, table: list[str], notes: str = "") -> None:
    """Append a dated section to docs/performance.md (created with a heading if missing)."""
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    new = not os.path.exists(REPORT)
    with open(REPORT, "a") as f:
        if new:
            f.write("# Performance\n\nMeasured by the scripts in benchmarks/; each run appends a section.\n")
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        f.write(f"\n## {title} ({stamp})\n\nMachine: {machine_summary()}\n\n" + "\n".join(table) + "\n")
        if notes:
            f.write(f"\n{notes}\n")
    print(f"appended to {os.path.relpath(REPORT, REPO_ROOT)}")


def load_texts(repeat: int) -> tuple[list[str], str]:
    if not os.path.exists(DEMO_CORPUS):
        subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools/datasets/build_demo_corpus.py"),
                        "--output", DEMO_CORPUS], check=True)
    with open(DEMO_CORPUS, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f] * repeat
    return texts, DEMO_CORPUS


def time_encode(encode, texts: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(len(encode(t)) for t in texts)
    return time.perf_counter() - start, tokens


def time_pipeline(texts: list[str], workers: int, tmp: str, extra: tuple[str, ...] = ()) -> tuple[float, int, float]:
    """(seconds after the tokenizer is loaded, tokens written, wall seconds of the whole run)."""
    spec = importlib.util.spec_from_file_location("preprocess_tool", os.path.join(REPO_ROOT,
                                                  "tools/datasets/preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    corpus = os.path.join(tmp, "corpus.jsonl")
    if not os.path.exists(corpus):
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    prefix = os.path.join(tmp, f"out{workers}")
    start = time.perf_counter()
    assert tool.main(["--input", corpus, "--output-prefix", prefix, "--append-eod", "--workers", str(workers),
                      "--no-progress", *extra]) == 0
    elapsed = time.perf_counter() - start
    with open(f"{prefix}_text_document.stats.json") as f:
        stats = json.load(f)
    return stats["seconds"], stats["tokens_written"], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=8, help="copies of the demo corpus to process")
    parser.add_argument("--runs", type=int, default=3, help="time each row this many times, keep the best")
    parser.add_argument("--no-report", action="store_true", help="do not append to docs/performance.md")
    args = parser.parse_args()

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    texts, source = load_texts(args.repeat)
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    bare = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PAT_STR,
                             mergeable_ranks=load_tiktoken_bpe(default_llama3_tokenizer_path()), special_tokens={})
    ours = build_tokenizer("Llama3Tokenizer")

    # Best of --runs for every row (other work on a shared machine only ever makes a run slower), rows interleaved.
    tmp_dir = tempfile.TemporaryDirectory()
    tmp = tmp_dir.name
    rows: list[tuple[str, int, object]] = [
        ("bare tiktoken encode_ordinary", 1, lambda: (*time_encode(bare.encode_ordinary, texts), None)),
        ("Llama3Tokenizer.encode (chunking)", 1, lambda: (*time_encode(ours.encode, texts), None)),
        ("Llama3Tokenizer.encode_to_array (what preprocessing uses)", 1,
         lambda: (*time_encode(ours.encode_to_array, texts), None)),
        ("preprocess_data.py end to end", 1, lambda: time_pipeline(texts, 1, tmp)),
        ("preprocess_data.py end to end", 2, lambda: time_pipeline(texts, 2, tmp)),
        ("preprocess_data.py --ftfy", 1, lambda: time_pipeline(texts, 1, tmp, ("--ftfy",))),
        ("preprocess_data.py --remove-repetitions", 1,
         lambda: time_pipeline(texts, 1, tmp, ("--remove-repetitions",))),
    ]
    for encode in (bare.encode_ordinary, ours.encode, ours.encode_to_array):  # warm-up: first-use page faults
        time_encode(encode, texts[:200])
    best: dict[int, tuple] = {}
    for _ in range(args.runs):
        for i, (_name, _workers, run) in enumerate(rows):
            result = run()
            if i not in best or result[0] < best[i][0]:
                best[i] = result
    tmp_dir.cleanup()
    baseline = best[0][1] / best[0][0]
    one_worker = best[3][1] / best[3][0]

    table = [
        f"Corpus: {os.path.relpath(source, REPO_ROOT)} x{args.repeat} = {len(texts):,} documents, {megabytes:.1f} MB; "
        f"best of {args.runs} runs. "
        "End-to-end rows include reading, JSON parsing, BOS/EOD and writing .bin/.idx; their rates use the time "
        "after the tokenizer is loaded (wall time, with Python start-up excluded, in the last column).",
        "",
        "| what | workers | seconds | tokens | tokens/s | tokens/s per worker | MB/s | vs bare tiktoken | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (name, workers, _run) in enumerate(rows):
        seconds, tokens, wall = best[i]
        wall = seconds if wall is None else wall
        rate = tokens / seconds
        table.append(f"| {name} | {workers} | {seconds:.2f} | {tokens:,} | {rate:,.0f} | {rate / workers:,.0f} | "
                     f"{megabytes / seconds:.2f} | {rate / baseline:.2f}x | {wall:.2f} |")
    two = best[4][1] / best[4][0]
    table += [
        "",
        f"2 workers vs 1 worker: {two / one_worker:.2f}x. Cost of cleaning (end-to-end time with 1 worker vs "
        f"without): --ftfy {best[5][0] / best[3][0]:.2f}x, --remove-repetitions {best[6][0] / best[3][0]:.2f}x "
        "(their tokens/s count the tokens written: repetition removal drops documents).",
    ]
    print("\n".join(table))
    if not args.no_report:
        append_report("Preprocessing throughput (benchmarks/bench_preprocess.py)", table)


if __name__ == "__main__":
    main()
