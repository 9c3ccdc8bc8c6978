#!/usr/bin/env python3
"""Tokenize chat conversations (JSONL) in the Llama-3.1 chat format, with labels for SFT.

Example:
    python tools/datasets/preprocess_data_with_chat_template.py --input data/sft/chat.jsonl \\
        --output-prefix data/sft/chat --workers 4

Each line is one conversation in one of three shapes (--format, default auto: detected per record):
  openai    `messages` (--jsonl-key) is a list of {"role": "system" | "user" | "assistant" | "ipython" | "tool",
            "content": str};
  sharegpt  `conversations` is a list of {"from": "system" | "human" | "gpt" | "tool", "value": str}
            (OpenHermes-2.5, SlimOrca);
  nemotron  Llama-Nemotron post-training rows: `input` (a message list, or a string with the Llama-3 template
            applied), `output` (the assistant reply, <think>...</think> kept and trained), `system_prompt`
            ("detailed thinking on" / "off": the system turn; else from `reasoning` "on" / "off"). One document per conversation goes to PREFIX_KEY_document.{bin,idx}
(<|begin_of_text|>, then <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|> per message, exactly as
llama-models' ChatFormat renders it, then <|end_of_text|>), and its labels (int32, same lengths) to
PREFIX_KEY_label_document.{bin,idx}: the token id on assistant content and its <|eot_id|>, -100 elsewhere.
Train with `train_data_paths: [PREFIX_KEY_document]` and `train_label_data_paths: [PREFIX_KEY_label_document]`.

A bad record (malformed JSON, missing key, unknown role, non-string content, no assistant message, ...) stops
the run with `error: FILE:LINE: what is wrong` and no output; with --skip-bad such records are counted and
reported instead, as tools/datasets/preprocess_data.py does by default. Inputs are read with that tool's reader
(.jsonl, .jsonl.gz, .jsonl.zst, .parquet); outputs appear under their final names only when complete, with a
summary in PREFIX_KEY_document.stats.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing
TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
if TOOLS_DIR not in sys.path:
    sys.path.insert(0, TOOLS_DIR)  # for the plain tool's chunking, worker pool and reporting, reused below

import numpy as np  # noqa: E402
import preprocess_data as plain  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron.data import chat  # noqa: E402
from megatron.data.indexed_dataset import IndexedDatasetWriter, best_dtype  # noqa: E402
from megatron.data.preprocess import BadRecordError  # noqa: E402
from megatron.data.readers import CorruptInputError  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input / output")
    io.add_argument("--input", action="append", required=True,
                    help="input file(s): .jsonl, .jsonl.gz, .jsonl.zst or .parquet; comma-separated or repeated")
    io.add_argument("--jsonl-key", default="messages",
                    help="key holding the OpenAI message list, also naming the outputs (default: messages)")
    io.add_argument("--format", choices=chat.FORMATS, default="auto",
                    help="record shape: openai, sharegpt, nemotron, or auto (detected per record; default)")
    io.add_argument("--output-prefix", required=True,
                    help="writes PREFIX_KEY_document.{bin,idx,stats.json} and PREFIX_KEY_label_document.{bin,idx}")
    io.add_argument("--vocab-file", default=None,
                    help="Llama-3 tokenizer.model (default: the one bundled with llama-models)")
    lab = p.add_argument_group("labels")
    lab.add_argument("--train-on", choices=chat.TRAIN_ON, default="all-assistant",
                     help="assistant messages whose content and <|eot_id|> are trained on (default: all)")
    lab.add_argument("--only-last", dest="train_on", action="store_const", const="last-assistant",
                     help="same as --train-on last-assistant (GPT-NeoX's name)")
    lab.add_argument("--no-mask", dest="mask", action="store_false",
                     help="labels equal the tokens everywhere (train on the whole conversation, for comparison)")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    run.add_argument("--chunk-size", type=int, default=256,
                     help="records (JSONL lines) per work unit at most; a unit also closes at 256 KiB of input")
    run.add_argument("--skip-bad", action="store_true",
                     help="count and report bad records (file:line) and go on, instead of stopping at the first")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.workers < 1 or args.chunk_size < 1:
        p.error("--workers and --chunk-size must be at least 1")
    return args


def output_prefixes(prefix: str, key: str) -> tuple[str, str]:
    """(token dataset, label dataset) prefixes."""
    return plain.output_prefix(prefix, key), f"{prefix}_{key}_label_document"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = plain.inputs_or_none(args.input)
    if inputs is None:
        return 2
    options = chat.ChatOptions(key=args.jsonl_key, vocab_file=args.vocab_file, train_on=args.train_on,
                               mask=args.mask, skip_bad=args.skip_bad, format=args.format)
    encoder = chat.init_worker(options)  # fail fast on a bad tokenizer file
    tokenizer = encoder.tokenizer
    dtype = np.dtype(best_dtype(tokenizer.vocab_size))
    token_prefix, label_prefix = output_prefixes(args.output_prefix, args.jsonl_key)
    records = conversations = tokens = trained = text_bytes = 0
    bad: Counter = Counter()
    bad_examples: list[str] = []
    start = time.perf_counter()

    with ExitStack() as stack:
        token_writer = stack.enter_context(IndexedDatasetWriter(token_prefix, dtype))
        label_writer = stack.enter_context(IndexedDatasetWriter(label_prefix, chat.LABEL_DTYPE))
        bar = stack.enter_context(tqdm(unit=" conv", unit_scale=True, mininterval=0.5, disable=not args.progress,
                                       desc="chat preprocess"))
        try:
            chunks = plain.iter_chunks(inputs, [args.jsonl_key, *chat.RECORD_KEYS], args.chunk_size)
            for result in plain.run_chunks(chunks, dtype, args.workers, process=chat.process_chunk):
                token_writer.add_documents(result.tokens, result.lengths)
                label_writer.add_documents(result.labels, result.lengths)
                records += result.records
                conversations += len(result.lengths)
                tokens += int(result.lengths.sum())
                trained += result.trained
                text_bytes += result.text_bytes
                bad.update(result.bad)
                plain.report_bad(result.bad_examples, bad_examples, what="skipped bad record")
                elapsed = time.perf_counter() - start
                bar.update(result.records)
                bar.set_postfix_str(f"{tokens / elapsed / 1e3:.1f}k tok/s", refresh=False)
        except BadRecordError as err:
            bar.close()  # ends the bar's line, so the error starts on its own
            print(f"error: bad record {err}; no output written (--skip-bad counts and skips such records)",
                  file=sys.stderr)
            return 1
        except CorruptInputError as err:
            bar.close()
            print(f"error: {err}; no output written", file=sys.stderr)
            return 1
        if conversations == 0:
            bar.close()
            print(f"error: no conversation to write ({records:,} records read, {sum(bad.values()):,} bad); "
                  f"no output written", file=sys.stderr)
            return 1
        label_writer.finalize()
        token_writer.finalize()

    elapsed = time.perf_counter() - start
    summary = {
        "output_prefix": token_prefix,
        "label_prefix": label_prefix,
        "inputs": inputs,
        "key": args.jsonl_key,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "dtype": str(dtype),
        "label_dtype": str(np.dtype(chat.LABEL_DTYPE)),
        "options": {k: v for k, v in vars(options).items() if k != "key"},
        "records_read": records,
        "conversations": conversations,
        "tokens_written": tokens,
        "trained_tokens": trained,
        "skipped": sum(bad.values()),
        "bad_records": dict(sorted(bad.items())),
        "text_bytes": text_bytes,
        "seconds": round(elapsed, 3),
        "bad_record_examples": bad_examples,
    }
    plain.write_stats(token_prefix, summary)
    print(format_summary(summary, elapsed))
    return 0


def format_summary(summary: dict, elapsed: float) -> str:
    mode = "no mask" if not summary["options"]["mask"] else summary["options"]["train_on"]
    lines = [
        f"{summary['output_prefix']}.{{bin,idx}} + {summary['label_prefix']}.{{bin,idx}}: "
        f"{summary['conversations']:,} conversations, {summary['tokens_written']:,} tokens ({summary['dtype']}), "
        f"{summary['trained_tokens']:,} trained ({100 * summary['trained_tokens'] / summary['tokens_written']:.1f}%,"
        f" {mode}), {summary['skipped']:,} skipped, in {elapsed:.1f}s"
    ]
    if summary["bad_records"]:
        lines.append("  bad records: " + ", ".join(f"{reason} {n:,}" for reason, n in summary["bad_records"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
