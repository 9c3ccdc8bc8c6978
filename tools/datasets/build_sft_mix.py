#!/usr/bin/env python3
"""Mix chat datasets for SFT: deduplicate across sources, set each source's amount, shuffle, hold out a
validation split, and write the token and label datasets the trainer reads.

Example (the AstroSage SFT mix: astronomy Q&A at about 30% of the conversations):
    python tools/datasets/build_sft_mix.py --output-prefix data/sft/mix --seq-length 8192 \\
        --source data/sft/astro_qa.jsonl share=0.3 \\
        --source data/sft/openhermes.jsonl \\
        --source data/sft/nemotron_science.jsonl count=50000

Each --source is a file (.jsonl, .jsonl.gz, .jsonl.zst, .parquet; a glob or comma list counts as one source)
in any shape the chat tool reads (OpenAI messages, ShareGPT conversations, Llama-Nemotron rows; --format auto
detects per record), followed by at most one amount:
  (none)      every unique conversation once
  count=N     N conversations drawn without repetition
  weight=W    W x its unique conversations (2 = each twice, 0.5 = a random half)
  share=S     S of the mix's conversations (0 < S < 1; the other sources' amounts fix the total)

Conversations are deduplicated across all sources by a hash of their normalised text (roles and contents,
whitespace collapsed): the first occurrence, in --source order, is kept. The mix is shuffled with --seed and
--valid-fraction of it (at least one conversation) goes to the validation split. Written, each only when
complete: PREFIX_train_messages_document.{bin,idx} + PREFIX_train_messages_label_document.{bin,idx}, the same for
_valid_, and PREFIX_report.json with, per source: rows read, bad rows skipped, duplicates dropped, unique, kept
(train + valid), tokens, loss tokens and their share, and with --seq-length the conversations longer than a
sample (cut at a message end or dropped by whole-conversation packing, as the trainer will).

A bad record stops the run with `error: FILE:LINE: what is wrong` and exit 2, nothing written; --skip-bad counts
such records instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megatron.data import chat  # noqa: E402
from megatron.data.indexed_dataset import IndexedDatasetWriter, best_dtype  # noqa: E402
from megatron.data.packing import cut_point  # noqa: E402
from megatron.data.preprocess import _parse  # noqa: E402
from megatron.data.readers import CorruptInputError, expand_inputs, iter_records  # noqa: E402

AMOUNTS = ("count", "weight", "share")


class MixError(ValueError):
    """Bad input or options: printed as `error: ...`, exit 2."""


@dataclass
class Source:
    spec: str
    paths: list[str]
    kind: str | None = None  # one of AMOUNTS, or None: every unique conversation once
    value: float = 1.0


@dataclass
class SourceReport:
    source: str
    rows_read: int = 0
    bad_skipped: int = 0
    duplicates_dropped: int = 0
    unique: int = 0
    kept: int = 0
    train: int = 0
    valid: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    share_of_conversations: float = 0.0
    share_of_loss_tokens: float = 0.0
    longer_than_sample: int = 0
    truncated_for_length: int = 0
    dropped_for_length: int = 0


def parse_sources(groups: Sequence[Sequence[str]]) -> list[Source]:
    sources = []
    for group in groups:
        path, *amounts = group
        if len(amounts) > 1:
            raise MixError(f"--source {' '.join(group)}: give at most one of {', '.join(a + '=' for a in AMOUNTS)}")
        try:
            paths = expand_inputs([path])
        except (FileNotFoundError, ValueError) as err:
            raise MixError(f"--source {path}: {err}") from None
        source = Source(path, paths)
        if amounts:
            kind, _, value = amounts[0].partition("=")
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if kind not in AMOUNTS or not math.isfinite(number) or number <= 0 or (kind == "share" and number >= 1) \
                    or (kind == "count" and number != int(number)):
                raise MixError(f"--source {path} {amounts[0]}: expected count=N (a positive integer), weight=W "
                               f"(> 0) or share=S (0 < S < 1)")
            source.kind, source.value = kind, number
        sources.append(source)
    if sum(s.value for s in sources if s.kind == "share") >= 1:
        raise MixError("the share= values add up to 1 or more: leave room for the other sources")
    if sources and all(s.kind == "share" for s in sources):
        raise MixError("every source has a share=: give at least one source a count=, a weight= or no amount, "
                       "which fixes the mix's size")
    return sources


def normalised_hash(messages: Sequence[tuple[str, str]]) -> bytes:
    text = "\x1e".join(f"{role}\x1f{' '.join(content.split())}" for role, content in messages)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def read_source(source: Source, report: SourceReport, seen: set, fmt: str, key: str, skip_bad: bool
                ) -> list[list[tuple[str, str]]]:
    """The source's conversations not seen before (in file order)."""
    out = []
    for record in iter_records(source.paths, [key, *chat.RECORD_KEYS]):
        report.rows_read += 1
        obj, reason = _parse(record)
        try:
            if obj is None:
                raise chat.ConversationError(reason, {"undecodable": "not valid UTF-8", "malformed_json":
                                                      "malformed JSON", "not_an_object": "not a JSON object"}[reason])
            messages = chat.parse_record(obj, fmt, key)
        except chat.ConversationError as err:
            if not skip_bad:
                raise MixError(f"{record.source}:{record.line}: {err} (--skip-bad counts and skips such rows)")
            report.bad_skipped += 1
            continue
        digest = normalised_hash(messages)
        if digest in seen:
            report.duplicates_dropped += 1
            continue
        seen.add(digest)
        out.append(messages)
    report.unique = len(out)
    return out


def amounts(sources: Sequence[Source], unique: Sequence[int]) -> list[int]:
    """Conversations taken from each source (see the module docstring)."""
    fixed = {}
    for i, (s, n) in enumerate(zip(sources, unique)):
        if s.kind is None:
            fixed[i] = n
        elif s.kind == "count":
            if s.value > n:
                raise MixError(f"--source {s.spec} count={int(s.value)}: only {n:,} unique conversations")
            fixed[i] = int(s.value)
        elif s.kind == "weight":
            fixed[i] = int(round(s.value * n))
    share = sum(s.value for s in sources if s.kind == "share")
    total = sum(fixed.values()) / (1 - share)
    out = []
    for i, (s, n) in enumerate(zip(sources, unique)):
        if s.kind != "share":
            out.append(fixed[i])
            continue
        want = int(round(s.value * total))
        if want > n:
            raise MixError(f"--source {s.spec} share={s.value:g}: needs {want:,} conversations, the source has "
                           f"{n:,} unique ones; lower the share, or shrink the other sources (count=, weight=)")
        out.append(want)
    return out


def take(conversations: list, n: int, rng: random.Random) -> list:
    """n conversations: whole copies of the list, then a random sample of the rest (no repeat within it)."""
    copies, rest = divmod(n, len(conversations)) if conversations else (0, 0)
    return conversations * copies + rng.sample(conversations, rest)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", nargs="+", action="append", required=True, metavar="PATH [AMOUNT]",
                   help="a source file and optionally count=N, weight=W or share=S (repeat per source)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--valid-fraction", type=float, default=0.02, help="share of the mix held out (default 0.02)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seq-length", type=int, default=None,
                   help="the training seq_length: report conversations longer than a sample (cut or dropped)")
    p.add_argument("--format", choices=chat.FORMATS, default="auto")
    p.add_argument("--jsonl-key", default="messages", help="key of OpenAI-style message lists (default messages)")
    p.add_argument("--train-on", choices=chat.TRAIN_ON, default="all-assistant")
    p.add_argument("--vocab-file", default=None, help="Llama-3 tokenizer.model (default: llama-models' own)")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad rows instead of stopping")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if not 0 <= args.valid_fraction < 1:
        p.error("--valid-fraction must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (MixError, CorruptInputError) as err:
        print(f"error: {err}; nothing written", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    sources = parse_sources(args.source)
    seen: set = set()
    reports = [SourceReport(s.spec) for s in sources]
    pools = [read_source(s, r, seen, args.format, args.jsonl_key, args.skip_bad) for s, r in zip(sources, reports)]
    for s, pool in zip(sources, pools):
        if not pool:
            raise MixError(f"--source {s.spec}: no conversation left (bad rows or all duplicates)")
    rng = random.Random(args.seed)
    counts = amounts(sources, [len(p) for p in pools])
    mix = [(i, conv) for i, (pool, n) in enumerate(zip(pools, counts)) for conv in take(pool, n, rng)]
    rng.shuffle(mix)
    n_valid = max(1, int(round(args.valid_fraction * len(mix)))) if args.valid_fraction > 0 else 0
    splits = {"valid": mix[:n_valid], "train": mix[n_valid:]} if n_valid else {"train": mix}

    encoder = chat.init_worker(chat.ChatOptions(vocab_file=args.vocab_file, train_on=args.train_on))
    dtype = np.dtype(best_dtype(encoder.tokenizer.vocab_size))
    with ExitStack() as stack:  # a writer not finalized removes its temporary files: nothing half-written
        writers = []
        for split, items in splits.items():
            prefix = f"{args.output_prefix}_{split}_messages"
            tokens_out = stack.enter_context(IndexedDatasetWriter(prefix + "_document", dtype))
            labels_out = stack.enter_context(IndexedDatasetWriter(prefix + "_label_document", chat.LABEL_DTYPE))
            writers += [labels_out, tokens_out]
            for i, conv in tqdm(items, desc=f"tokenize {split}", unit=" conv", disable=not args.progress):
                ids, labels = encoder.encode(conv, args.train_on)
                tokens_out.add_document(ids.astype(dtype))
                labels_out.add_document(labels)
                r = reports[i]
                setattr(r, split, getattr(r, split) + 1)
                r.kept += 1
                r.tokens += len(ids)
                r.loss_tokens += int(np.count_nonzero(labels != chat.IGNORE_INDEX))
                if args.seq_length is not None and len(ids) > args.seq_length + 1:
                    r.longer_than_sample += 1
                    if cut_point(ids, labels, args.seq_length, encoder.eot_id):
                        r.truncated_for_length += 1
                    else:
                        r.dropped_for_length += 1
        for writer in writers:  # labels before tokens: a token dataset appears only with its labels
            writer.finalize()
    total_conv = sum(r.kept for r in reports)
    total_loss = sum(r.loss_tokens for r in reports)
    for r in reports:
        r.share_of_conversations = r.kept / total_conv
        r.share_of_loss_tokens = r.loss_tokens / max(1, total_loss)
    report = {"output_prefix": args.output_prefix, "seed": args.seed, "valid_fraction": args.valid_fraction,
              "seq_length": args.seq_length, "train_conversations": len(splits["train"]),
              "valid_conversations": n_valid, "sources": [asdict(r) for r in reports],
              "train_data_paths": [f"{args.output_prefix}_train_messages_document"],
              "train_label_data_paths": [f"{args.output_prefix}_train_messages_label_document"]}
    if n_valid:
        report["valid_data_paths"] = [f"{args.output_prefix}_valid_messages_document"]
        report["valid_label_data_paths"] = [f"{args.output_prefix}_valid_messages_label_document"]
    tmp = f"{args.output_prefix}_report.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, f"{args.output_prefix}_report.json")
    print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    head = (f"{'source':<40} {'read':>8} {'bad':>5} {'dups':>6} {'kept':>8} {'share':>6} {'tokens':>11} "
            f"{'loss tok':>11} {'loss %':>6} {'long':>5} {'cut':>5} {'drop':>5}")
    lines = [head, "-" * len(head)]
    for r in report["sources"]:
        name = r["source"] if len(r["source"]) <= 40 else "..." + r["source"][-37:]
        lines.append(f"{name:<40} {r['rows_read']:>8,} {r['bad_skipped']:>5,} {r['duplicates_dropped']:>6,} "
                     f"{r['kept']:>8,} {100 * r['share_of_conversations']:>5.1f}% {r['tokens']:>11,} "
                     f"{r['loss_tokens']:>11,} {100 * r['share_of_loss_tokens']:>5.1f}% "
                     f"{r['longer_than_sample']:>5,} {r['truncated_for_length']:>5,} {r['dropped_for_length']:>5,}")
    lines.append(f"train {report['train_conversations']:,} / valid {report['valid_conversations']:,} conversations "
                 f"-> {report['output_prefix']}_{{train,valid}}_messages_{{,label_}}document; "
                 f"report {report['output_prefix']}_report.json")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
