#!/usr/bin/env python3
"""Tokenize JSONL / Parquet corpora into Megatron's mmap indexed dataset (PREFIX_KEY_document.{bin,idx}).

Example:
    python tools/datasets/preprocess_data.py --input data/demo/python_docs.jsonl \\
        --output-prefix data/demo/python_docs --append-eod --workers 2

Each document gets <|begin_of_text|> first (Llama-3 expects it; --no-bos to disable) and, with --append-eod,
<|end_of_text|> last. Bad records (undecodable bytes, malformed JSON, missing key, non-string value) are counted
and reported with file and line, or stop the run with --strict. Outputs are written under temporary names and
renamed only when complete; a summary is printed and saved as PREFIX_KEY_document.stats.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron.data import preprocess  # noqa: E402
from megatron.data.indexed_dataset import IndexedDatasetWriter, best_dtype  # noqa: E402
from megatron.data.preprocess import BadRecordError, ChunkResult, PreprocessOptions  # noqa: E402
from megatron.data.readers import (PARQUET_SUFFIXES, CorruptInputError, RawChunk, Record, expand_inputs,  # noqa: E402
                                   iter_jsonl_chunks, iter_parquet)
from megatron.data.tokenizer import TOKENIZER_TYPES  # noqa: E402

# A chunk closes at this much raw input or at --chunk-size records. Small enough that the last chunks, which
# only some workers get, cost little (~20 ms of tokenizing each), large enough that the per-chunk overhead
# (one pickled bytes object each way plus a few calls) is well under 1%.
_CHUNK_BYTES = 256 << 10
_IN_FLIGHT_PER_WORKER = 4
_MAX_PRINTED_BAD = 20
_MAX_STORED_BAD = 100


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--input", action="append", required=True,
                    help="input file(s): .jsonl, .jsonl.gz, .jsonl.zst or .parquet; comma-separated or repeated")
    io.add_argument("--jsonl-keys", nargs="+", default=["text"], help="keys to tokenize (one output per key)")
    io.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.{bin,idx,stats.json}")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer-type", default="Llama3Tokenizer", choices=TOKENIZER_TYPES)
    tok.add_argument("--vocab-file", default=None, help="tokenizer file (default for Llama-3: the bundled one)")
    tok.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    tok.add_argument("--no-bos", dest="bos", action="store_false", help="do not prepend the BOS token")
    clean = p.add_argument_group("cleaning (each optional; drops are counted per reason)")
    clean.add_argument("--ftfy", action="store_true", help="repair mojibake and broken Unicode with ftfy")
    clean.add_argument("--remove-repetitions", action="store_true",
                       help="drop documents failing the Gopher repetition rules (datatrove-compatible: the top "
                            "n-gram rules also drop most documents under ~40 words)")
    clean.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this")
    clean.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (by text hash)")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    run.add_argument("--chunk-size", type=int, default=256,
                     help="records (JSONL lines) per work unit at most; a unit also closes at 256 KiB of input")
    run.add_argument("--strict", action="store_true", help="stop at the first bad record instead of counting it")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.workers < 1 or args.chunk_size < 1:
        p.error("--workers and --chunk-size must be at least 1")
    return args


def chunked(records: Iterator[Record], max_records: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    size = 0
    for record in records:
        chunk.append(record)
        # A Parquet row's size is unknown without walking it: count a nominal 256 bytes.
        size += len(record.payload) if isinstance(record.payload, bytes) else 256
        if len(chunk) >= max_records or size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def iter_chunks(paths: Sequence[str], keys: Sequence[str], max_records: int) -> Iterator[RawChunk | list[Record]]:
    """Work units in input order: blocks of raw JSONL lines (no per-line work here), lists of Parquet rows."""
    for path in paths:
        if path.endswith(PARQUET_SUFFIXES):
            yield from chunked(iter_parquet(path, keys), max_records)
        else:
            yield from iter_jsonl_chunks(path, max_records, _CHUNK_BYTES)


def run_chunks(chunks: Iterator[RawChunk | list[Record]], dtype: np.dtype, workers: int,
               process: Callable[[RawChunk | list[Record], np.dtype], Any] = preprocess.process_chunk
               ) -> Iterator[ChunkResult]:
    """`process(chunk, dtype)`'s results in input order. With several workers, at most a few chunks per worker are
    in flight, so memory stays bounded however large the input (Pool.imap would read the whole input ahead).
    `main` has set up this process with the worker state `process` needs (`preprocess.init_worker`, or
    `chat.init_worker` for the chat tool); forked workers inherit it instead of loading the tokenizer again.
    Workers parse, clean and tokenize; this process only reads blocks and writes results."""
    if workers == 1:
        for chunk in chunks:
            yield process(chunk, dtype)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(process, (chunk, dtype)))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class KeyStats:
    """Running totals for one output (one JSON key)."""

    def __init__(self) -> None:
        self.read = self.kept = self.tokens = self.text_bytes = self.ftfy_fixed = 0
        self.dropped: Counter = Counter()
        self.bad: Counter = Counter()
        self.seen: set[bytes] = set()

    def as_dict(self) -> dict:
        return {
            "documents_read": self.read,
            "documents_kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "bad_records": dict(sorted(self.bad.items())),
            "ftfy_fixed": self.ftfy_fixed,
            "tokens_written": self.tokens,
            "text_bytes": self.text_bytes,
        }


def write_key(writer: IndexedDatasetWriter, stats: KeyStats, result: preprocess.KeyResult, records: int,
              dedup: bool) -> None:
    """Append one chunk's documents for one key, dropping exact duplicates of earlier documents."""
    stats.read += records
    stats.bad.update(result.bad)
    stats.dropped.update(result.dropped)
    stats.ftfy_fixed += result.ftfy_fixed
    stats.text_bytes += result.text_bytes
    tokens, lengths = result.tokens, np.asarray(result.lengths, dtype=np.int64)
    if dedup and len(lengths):
        keep = np.ones(len(lengths), dtype=bool)
        for i, digest in enumerate(result.hashes):
            if digest in stats.seen:
                keep[i] = False
            else:
                stats.seen.add(digest)
        stats.dropped["duplicate"] += int((~keep).sum())
        tokens, lengths = tokens[np.repeat(keep, lengths)], lengths[keep]
    writer.add_documents(tokens, lengths)
    stats.kept += len(lengths)
    stats.tokens += int(lengths.sum())


def report_bad(messages: Sequence[str], kept: list[str], what: str = "bad record") -> None:
    """Warn about a chunk's bad records (the first _MAX_PRINTED_BAD of the run) and keep examples for the stats."""
    for message in messages:
        if len(kept) < _MAX_PRINTED_BAD:
            tqdm.write(f"warning: {what} {message}", file=sys.stderr)
        if len(kept) < _MAX_STORED_BAD:
            kept.append(message)


def write_stats(prefix: str, summary: dict) -> None:
    """PREFIX.stats.json, written under a temporary name and renamed."""
    tmp = f"{prefix}.stats.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, f"{prefix}.stats.json")


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def inputs_or_none(patterns: Sequence[str]) -> list[str] | None:
    """The --input files, or None after saying on stderr which pattern matched nothing (the tools exit 2)."""
    try:
        return expand_inputs(patterns)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = inputs_or_none(args.input)
    if inputs is None:
        return 2
    options = PreprocessOptions(
        keys=tuple(args.jsonl_keys), tokenizer_type=args.tokenizer_type, vocab_file=args.vocab_file,
        bos=args.bos, append_eod=args.append_eod, ftfy=args.ftfy, remove_repetitions=args.remove_repetitions,
        min_chars=args.min_chars, dedup=args.dedup, strict=args.strict,
    )
    tokenizer = preprocess.init_worker(options)  # fail fast on a bad tokenizer; learn its vocabulary size
    if note := preprocess.bos_note(options, tokenizer):
        print(note, file=sys.stderr)
    dtype = np.dtype(best_dtype(tokenizer.vocab_size))
    stats = {key: KeyStats() for key in options.keys}
    bad_examples: list[str] = []
    start = time.perf_counter()

    with ExitStack() as stack:
        writers = {key: stack.enter_context(IndexedDatasetWriter(output_prefix(args.output_prefix, key), dtype))
                   for key in options.keys}
        bar = stack.enter_context(tqdm(unit=" docs", unit_scale=True, mininterval=0.5, disable=not args.progress,
                                       desc="preprocess"))
        chunks = iter_chunks(inputs, options.keys, args.chunk_size)
        try:
            for result in run_chunks(chunks, dtype, args.workers):
                for key, key_result in result.per_key.items():
                    write_key(writers[key], stats[key], key_result, result.records, options.dedup)
                report_bad(result.bad_examples, bad_examples)
                elapsed = time.perf_counter() - start
                first = stats[options.keys[0]]
                bar.update(result.records)
                bar.set_postfix_str(f"{first.text_bytes / elapsed / 1e6:.2f} MB/s, "
                                    f"{sum(s.tokens for s in stats.values()) / elapsed / 1e3:.1f}k tok/s",
                                    refresh=False)
        except BadRecordError as err:
            print(f"error: bad record {err} (--strict); no output written", file=sys.stderr)
            return 1
        except CorruptInputError as err:
            print(f"error: {err}; no output written", file=sys.stderr)
            return 1
        for writer in writers.values():
            writer.finalize()

    elapsed = time.perf_counter() - start
    for key in options.keys:
        prefix = output_prefix(args.output_prefix, key)
        summary = {
            "output_prefix": prefix,
            "inputs": inputs,
            "key": key,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "dtype": str(dtype),
            "options": {k: v for k, v in vars(options).items() if k != "keys"},
            **stats[key].as_dict(),
            "seconds": round(elapsed, 3),
            "bad_record_examples": bad_examples,
        }
        write_stats(prefix, summary)
        print(format_summary(summary, elapsed))
    return 0


def format_summary(summary: dict, elapsed: float) -> str:
    lines = [
        f"{summary['output_prefix']}.{{bin,idx}}: {summary['documents_kept']:,} of {summary['documents_read']:,} "
        f"documents kept, {summary['tokens_written']:,} tokens ({summary['dtype']}) in {elapsed:.1f}s "
        f"({summary['text_bytes'] / max(elapsed, 1e-9) / 1e6:.2f} MB/s, "
        f"{summary['tokens_written'] / max(elapsed, 1e-9) / 1e3:.1f}k tokens/s)"
    ]
    for label, counts in (("dropped", summary["dropped"]), ("bad records", summary["bad_records"])):
        if counts:
            lines.append(f"  {label}: " + ", ".join(f"{reason} {n:,}" for reason, n in counts.items()))
    if summary["options"]["ftfy"]:
        lines.append(f"  ftfy fixed: {summary['ftfy_fixed']:,}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
