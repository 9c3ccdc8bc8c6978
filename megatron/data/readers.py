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
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, NamedTuple

PARQUET_SUFFIXES = (".parquet", ".pq")


class CorruptInputError(ValueError):
    """An input file that cannot be read to its end: a truncated or damaged .gz, .zst or Parquet file."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: corrupt or truncated input file ({detail}); re-download or re-create it, or "
                         f"leave it out of --input")
        self.path = path


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What the decompressors and the Parquet reader raise on damaged data. Plain OSErrors (a permission or
    disk error) are not among them: they are not a property of the file's contents."""
    errors: list[type[BaseException]] = [EOFError, gzip.BadGzipFile, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


class _ZstdFrames(io.RawIOBase):
    """Decompressed bytes of every frame of a .zst file (`cat a.zst b.zst` makes several).

    zstandard's stream_reader ends quietly where a truncated file ends, so a half-downloaded file would pass for
    a shorter corpus; here a file that ends inside a frame raises EOFError, like gzip's reader."""

    _READ = 1 << 16  # compressed bytes per step: bounds the output held at once even for very compressible text

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompressobj of the current frame
        self._input = b""  # compressed bytes read past the end of the previous frame
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not len(self._out):
            data, self._input = self._input or self._raw.read(self._READ), b""
            if not data:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame")
                return 0
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()
            self._out = memoryview(self._frame.decompress(data))
            if self._frame.eof:
                self._input = self._frame.unused_data
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


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
        with open(path, "rb") as raw:
            yield io.BufferedReader(_ZstdFrames(raw), buffer_size=1 << 20)
    else:
        with open(path, "rb") as f:
            yield f


def iter_jsonl(path: str) -> Iterator[Record]:
    line_no = 0
    try:
        with open_binary(path) as f:
            for line_no, raw in enumerate(f, 1):
                if raw.strip():  # blank lines (often a trailing one) are not records
                    yield Record(path, line_no, raw)
    except _decode_errors() as err:
        raise CorruptInputError(path, f"{type(err).__name__}: {str(err).strip()}, after line {line_no}") from err


def iter_jsonl_chunks(path: str, max_lines: int, max_bytes: int) -> Iterator[RawChunk]:
    """Blocks of at most `max_lines` lines and about `max_bytes` bytes (a block always ends at a line end, so
    a line longer than `max_bytes` makes a longer block)."""
    line = 1
    try:
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
    except _decode_errors() as err:
        raise CorruptInputError(path, f"{type(err).__name__}: {str(err).strip()}, after line {line - 1}") from err


def iter_parquet(path: str, keys: Sequence[str], batch_rows: int = 4096) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        parquet = pq.ParquetFile(path)
        present = [k for k in keys if k in parquet.schema_arrow.names]
        # A file lacking every requested column still yields its rows, so each one is reported as missing the key.
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=present or None):
            columns = {k: batch.column(k).to_pylist() for k in present}
            for i in range(batch.num_rows):
                row += 1
                yield Record(path, row, {k: columns[k][i] for k in present})
    # Arrow reports a damaged footer as ArrowInvalid and damaged metadata or pages as a plain OSError
    # ("Couldn't deserialize thrift"), so here OSError counts too.
    except (pa.ArrowException, OSError, *_decode_errors()) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        raise CorruptInputError(path, f"{type(err).__name__}: {str(err).strip()}, after row {row}") from err


def iter_records(paths: Sequence[str], keys: Sequence[str]) -> Iterator[Record]:
    for path in paths:
        if path.endswith(PARQUET_SUFFIXES):
            yield from iter_parquet(path, keys)
        else:
            yield from iter_jsonl(path)
