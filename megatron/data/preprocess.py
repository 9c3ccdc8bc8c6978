"""Per-chunk work of tools/datasets/preprocess_data.py: parse, validate, clean and tokenize records.

`process_chunk` runs in worker processes; it returns compact numpy arrays (cheap to send back) plus counters.
Everything order-dependent (exact-duplicate removal, writing) happens in the parent, so the output does not
depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from megatron.data.cleaning import gopher_repetition_reason
from megatron.data.readers import Record
from megatron.data.tokenizer import Tokenizer, build_tokenizer


class BadRecordError(ValueError):
    """A malformed input record, raised instead of counted under --strict."""


@dataclass(frozen=True)
class PreprocessOptions:
    keys: tuple[str, ...] = ("text",)
    tokenizer_type: str = "Llama3Tokenizer"
    vocab_file: str | None = None
    bos: bool = True
    append_eod: bool = False
    ftfy: bool = False
    remove_repetitions: bool = False
    min_chars: int = 0
    dedup: bool = False
    strict: bool = False


@dataclass
class KeyResult:
    """Documents of one JSON key kept in one chunk, and what happened to the others."""

    tokens: np.ndarray
    lengths: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # text hashes, only with --dedup
    dropped: Counter = field(default_factory=Counter)
    bad: Counter = field(default_factory=Counter)
    ftfy_fixed: int = 0
    text_bytes: int = 0


@dataclass
class ChunkResult:
    records: int
    per_key: dict[str, KeyResult]
    bad_examples: list[str]  # "file:line: reason" for the first bad records of the chunk


_MAX_EXAMPLES_PER_CHUNK = 5

# Per-process state, set once by `init_worker` (tokenizers are expensive to build and not all are picklable).
_tokenizer: Tokenizer | None = None
_options: PreprocessOptions | None = None


def init_worker(options: PreprocessOptions) -> Tokenizer:
    global _tokenizer, _options
    _tokenizer = build_tokenizer(options.tokenizer_type, options.vocab_file)
    _options = options
    return _tokenizer


def _parse(record: Record) -> tuple[dict | None, str | None]:
    """(object, None) or (None, reason) for a record."""
    if isinstance(record.payload, dict):
        return record.payload, None
    try:
        line = record.payload.decode("utf-8")
    except UnicodeDecodeError:
        return None, "undecodable"
    try:
        obj = json.loads(line)
    except ValueError:
        return None, "malformed_json"
    if not isinstance(obj, dict):
        return None, "not_an_object"
    return obj, None


def _text_of(obj: dict, key: str) -> tuple[str | None, str | None]:
    if key not in obj:
        return None, "missing_key"
    value = obj[key]
    if not isinstance(value, str):
        return None, "not_a_string"
    try:
        value.encode("utf-8")  # lone surrogates from "\ud800"-style escapes cannot be tokenized
    except UnicodeEncodeError:
        return None, "invalid_unicode"
    return value, None


def _drop_reason(text: str, options: PreprocessOptions) -> str | None:
    if not text.strip():
        return "empty"
    if len(text) < options.min_chars:
        return "min_chars"
    if options.remove_repetitions and (reason := gopher_repetition_reason(text)):
        return f"repetition:{reason}"
    return None


def _pack(token_lists: Sequence[list[int]], options: PreprocessOptions, tokenizer: Tokenizer, dtype: np.dtype
          ) -> tuple[np.ndarray, list[int]]:
    """Concatenate documents (with BOS/EOD) into one array; returns it and the per-document lengths."""
    extra = int(options.bos) + int(options.append_eod)
    lengths = [len(ids) + extra for ids in token_lists]
    out = np.empty(sum(lengths), dtype=dtype)
    pos = 0
    for ids, length in zip(token_lists, lengths):
        if options.bos:
            out[pos] = tokenizer.bos_id
        out[pos + int(options.bos) : pos + int(options.bos) + len(ids)] = ids
        if options.append_eod:
            out[pos + length - 1] = tokenizer.eod_id
        pos += length
    return out, lengths


def process_chunk(records: Sequence[Record], dtype: np.dtype) -> ChunkResult:
    """Parse, validate, clean and tokenize `records` with the state set by `init_worker`."""
    assert _tokenizer is not None and _options is not None, "init_worker() was not called"
    options, tokenizer = _options, _tokenizer
    texts: dict[str, list[str]] = {k: [] for k in options.keys}
    results = {k: KeyResult(tokens=np.zeros(0, dtype)) for k in options.keys}
    examples: list[str] = []
    if options.ftfy:
        from ftfy import fix_text  # imported only when asked for: it takes a noticeable time to load

    def bad(record: Record, reason: str, key: str | None) -> None:
        message = f"{record.source}:{record.line}: {reason}" + (f" (key {key!r})" if key else "")
        if options.strict:
            raise BadRecordError(message)
        if len(examples) < _MAX_EXAMPLES_PER_CHUNK:
            examples.append(message)

    for record in records:
        obj, reason = _parse(record)
        if obj is None:
            bad(record, reason, None)
            for key in options.keys:
                results[key].bad[reason] += 1
            continue
        for key in options.keys:
            result = results[key]
            text, reason = _text_of(obj, key)
            if text is None:
                bad(record, reason, key)
                result.bad[reason] += 1
                continue
            result.text_bytes += len(text.encode("utf-8"))
            if options.ftfy:
                fixed = fix_text(text)
                result.ftfy_fixed += fixed != text
                text = fixed
            if drop := _drop_reason(text, options):
                result.dropped[drop] += 1
                continue
            if options.dedup:
                result.hashes.append(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest())
            texts[key].append(text)

    for key, result in results.items():
        result.tokens, result.lengths = _pack([tokenizer.encode(t) for t in texts[key]], options, tokenizer, dtype)
    return ChunkResult(records=len(records), per_key=results, bad_examples=examples)
