"""Stream raw records out of corpus files: JSONL (plain, .gz, .zst) and Parquet.

Records are not parsed here: JSONL lines stay bytes, so decoding and JSON errors are found (and counted with
their file and line) in the worker processes that also tokenize them. `iter_jsonl_chunks` does not even split
lines: it cuts the file into blocks of whole lines, so the reading process does a few calls per block, not per
line.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, NamedTuple

PARQUET_SUFFIXES = (".parquet", ".pq")


class Record(NamedTuple):
    source: str  # file path
    line: int  # 1-based line number (JSONL) or row number (Parquet)
    payload: bytes | dict[str, Any]  # a raw JSONL line, or a Parquet row restricted to the requested keys


class RawChunk(NamedTuple):
    """Consecutive JSONL lines of one file: `data` holds whole lines ('\\n'-terminated except perhaps at the
    end of the file), the first of which is line `first_line` (1-based)."""

    source: str
    first_line: int
    data: bytes


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Accept repeated and comma-separated --input values; check every file exists."""
    paths = [p for value in inputs for p in value.split(",") if p]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    if not paths:
        raise ValueError("no input files given")
    return paths


@contextmanager
def open_binary(path: str) -> Iterator[IO[bytes]]:
    """Open a possibly compressed file for reading decompressed bytes line by line."""
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif path.endswith((".zst", ".zstd")):
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            yield io.BufferedReader(stream, buffer_size=1 << 20)  # type: ignore[arg-type]
    else:
        with open(path, "rb") as f:
            yield f


def iter_jsonl(path: str) -> Iterator[Record]:
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():  # blank lines (often a trailing one) are not records
                yield Record(path, line_no, raw)


def iter_jsonl_chunks(path: str, max_lines: int, max_bytes: int) -> Iterator[RawChunk]:
    """Blocks of at most `max_lines` lines and about `max_bytes` bytes (a block always ends at a line end, so
    a line longer than `max_bytes` makes a longer block)."""
    line = 1
    with open_binary(path) as f:
        while block := f.read(max_bytes):
            if not block.endswith(b"\n"):
                block += f.readline()  # complete the last line
            pos = 0
            while pos < len(block):
                end = pos
                for _ in range(max_lines):
                    end = block.find(b"\n", end) + 1
                    if end == 0 or end >= len(block):
                        end = len(block)
                        break
                yield RawChunk(path, line, block[pos:end])
                line += block.count(b"\n", pos, end)
                pos = end


def iter_parquet(path: str, keys: Sequence[str], batch_rows: int = 4096) -> Iterator[Record]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    present = [k for k in keys if k in parquet.schema_arrow.names]
    row = 0
    # A file lacking every requested column still yields its rows, so each one is reported as missing the key.
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=present or None):
        columns = {k: batch.column(k).to_pylist() for k in present}
        for i in range(batch.num_rows):
            row += 1
            yield Record(path, row, {k: columns[k][i] for k in present})


def iter_records(paths: Sequence[str], keys: Sequence[str]) -> Iterator[Record]:
    for path in paths:
        if path.endswith(PARQUET_SUFFIXES):
            yield from iter_parquet(path, keys)
        else:
            yield from iter_jsonl(path)
