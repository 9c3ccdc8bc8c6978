"""Per-chunk work of tools/datasets/preprocess_data.py: parse, validate, clean and tokenize records.

`process_chunk` runs in worker processes. A JSONL chunk arrives as one `RawChunk` (a block of whole lines as a
single bytes object: the parent does no per-line work and pickles one object), a Parquet chunk as a list of
`Record`s. The result is one numpy token array per key, already packed with BOS/EOD, plus per-document
lengths and counters, so nothing is sent back as Python lists of ints. Everything order-dependent
(exact-duplicate removal, writing) happens in the parent, so the output does not depend on the number of
workers or on how the input is cut into chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from megatron.data.cleaning import gopher_repetition_reason
from megatron.data.readers import RawChunk, Record
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


def records_of(chunk: RawChunk | Sequence[Record]) -> Iterator[Record]:
    """The records of a chunk; blank lines are not records (as in readers.iter_jsonl)."""
    if not isinstance(chunk, RawChunk):
        yield from chunk
        return
    lines = chunk.data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # after the final newline
    for i, raw in enumerate(lines):
        if raw.strip():
            yield Record(chunk.source, chunk.first_line + i, raw)


@dataclass
class KeyResult:
    """Documents of one JSON key kept in one chunk, and what happened to the others."""

    tokens: np.ndarray
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
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


# As many as the parent keeps in total, so the examples are the first bad records of the input whatever the
# chunking or the number of workers.
_MAX_EXAMPLES_PER_CHUNK = 100

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


def _text_of(obj: dict, key: str) -> tuple[str | None, str | int]:
    """(text, its UTF-8 size in bytes) or (None, reason)."""
    if key not in obj:
        return None, "missing_key"
    value = obj[key]
    if not isinstance(value, str):
        return None, "not_a_string"
    if value.isascii():  # O(1) for str: no surrogates, one byte per character
        return value, len(value)
    try:
        return value, len(value.encode("utf-8"))  # lone surrogates from "\ud800"-style escapes cannot be tokenized
    except UnicodeEncodeError:
        return None, "invalid_unicode"


def _drop_reason(text: str, options: PreprocessOptions) -> str | None:
    if not text or text.isspace():  # as `not text.strip()`, without copying the text
        return "empty"
    if len(text) < options.min_chars:
        return "min_chars"
    if options.remove_repetitions and (reason := gopher_repetition_reason(text)):
        return f"repetition:{reason}"
    return None


def writes_bos(options: PreprocessOptions, tokenizer: Tokenizer) -> bool:
    """Whether documents start with the tokenizer's BOS.

    A tokenizer without a BOS of its own reports its EOD as bos_id (GPT-2 style vocabularies). With --append-eod
    every document already ends with that id, and a leading one as well would put two EODs between documents
    (under reset_attention_mask the second becomes a one-token document), so it is left out. Without
    --append-eod the leading EOD is the only separator between documents, so it stays."""
    return options.bos and not (options.append_eod and tokenizer.bos_id == tokenizer.eod_id)


def bos_note(options: PreprocessOptions, tokenizer: Tokenizer) -> str | None:
    """What the tool tells the user when the tokenizer has no BOS distinct from its EOD."""
    if not options.bos or tokenizer.bos_id != tokenizer.eod_id:
        return None
    if writes_bos(options, tokenizer):
        return (f"note: {tokenizer.name} has no BOS token distinct from its EOD (id {tokenizer.eod_id}); without "
                f"--append-eod every document starts with that EOD, as the separator between documents")
    return (f"note: {tokenizer.name} has no BOS token distinct from its EOD (id {tokenizer.eod_id}); documents "
            f"get only the EOD at their end (--append-eod), not a second one at their start")


def _pack(texts: Sequence[str], options: PreprocessOptions, tokenizer: Tokenizer, dtype: np.dtype
          ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents and concatenate them (with BOS/EOD) into one array; returns it and the per-document
    lengths. Ids are below the vocabulary size, which chose `dtype`, so the cast cannot wrap."""
    bos = np.array([tokenizer.bos_id], dtype=dtype) if writes_bos(options, tokenizer) else None
    eod = np.array([tokenizer.eod_id], dtype=dtype) if options.append_eod else None
    extra = int(bos is not None) + int(options.append_eod)
    pieces: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        ids = tokenizer.encode_to_array(text)
        if bos is not None:
            pieces.append(bos)
        pieces.append(ids)
        if eod is not None:
            pieces.append(eod)
        lengths[i] = len(ids) + extra
    if not pieces:
        return np.zeros(0, dtype), lengths
    return np.concatenate(pieces, dtype=dtype, casting="unsafe"), lengths


def process_chunk(chunk: RawChunk | Sequence[Record], dtype: np.dtype) -> ChunkResult:
    """Parse, validate, clean and tokenize the records of `chunk` with the state set by `init_worker`."""
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

    records = 0
    for record in records_of(chunk):
        records += 1
        obj, reason = _parse(record)
        if obj is None:
            bad(record, reason, None)
            for key in options.keys:
                results[key].bad[reason] += 1
            continue
        for key in options.keys:
            result = results[key]
            text, size = _text_of(obj, key)
            if text is None:
                bad(record, size, key)
                result.bad[size] += 1
                continue
            result.text_bytes += size
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
        result.tokens, result.lengths = _pack(texts[key], options, tokenizer, dtype)
    return ChunkResult(records=records, per_key=results, bad_examples=examples)
