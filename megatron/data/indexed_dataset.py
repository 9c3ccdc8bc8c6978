"""Megatron's memory-mapped indexed dataset: PREFIX.bin (raw tokens) + PREFIX.idx (sequence index).

Byte-compatible with megatron-core's `IndexedDatasetBuilder` / `IndexedDataset` (non-multimodal). Layout of
the .idx file, little-endian:

    b"MMIDIDX\\x00\\x00"   magic (9 bytes)
    u64  version = 1
    u8   dtype code of the tokens in .bin
    u64  N = number of sequences
    u64  D = number of documents + 1
    int32[N]  sequence lengths (tokens)
    int64[N]  byte offset of each sequence in .bin
    int64[D]  document boundaries as sequence indices: 0, ..., N

The .bin file is every sequence's tokens concatenated, with no header. A document is usually one sequence;
multi-sequence documents (e.g. one sequence per sentence) are supported through `add_item`/`end_document`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Optional

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D

DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


class CorruptDatasetError(ValueError):
    """A .bin/.idx pair that cannot be read safely; the message names the offending file."""


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def best_dtype(vocab_size: int) -> type[np.number]:
    """Smallest token dtype for a vocabulary (Megatron's rule: uint16 below 65500 ids, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def check_dataset_exists(prefix: str) -> None:
    """Raise FileNotFoundError naming the prefix and both expected files unless both exist."""
    if not dataset_exists(prefix):
        missing = [p for p in (idx_path(prefix), bin_path(prefix)) if not os.path.isfile(p)]
        raise FileNotFoundError(
            f"indexed dataset {prefix!r} not found: expected {idx_path(prefix)} and {bin_path(prefix)} "
            f"(missing: {', '.join(missing)})"
        )


def write_index_file(
    path: str, dtype: type[np.number] | np.dtype, lengths: Sequence[int] | np.ndarray,
    document_indices: Sequence[int] | np.ndarray,
) -> None:
    """Write an .idx file for sequences of `lengths` tokens stored back to back in the matching .bin."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF_DTYPE[dtype], len(lengths), len(document_indices)))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes())


def _remove_stale_tmp_files(prefix: str) -> None:
    """Delete PREFIX.bin/.idx temporary files left by a writer that was killed (its pid is gone): a rerun would
    otherwise leave a large orphan beside the dataset for each interruption."""
    for final in (bin_path(prefix), idx_path(prefix)):
        directory, base = os.path.split(os.path.abspath(final))
        for name in os.listdir(directory):
            pid = name[len(base) + 5:] if name.startswith(base + ".tmp-") else ""
            if pid.isdigit() and not _pid_alive(int(pid)):
                try:
                    os.remove(os.path.join(directory, name))
                except OSError:
                    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class IndexedDatasetWriter:
    """Streams tokens to PREFIX.bin and writes PREFIX.idx on `finalize()`.

    Both files are written under temporary names and renamed at the end, so an interrupted run never leaves
    a half-written dataset under the final names. Use as a context manager to discard the temporary files
    when an exception escapes.
    """

    def __init__(self, prefix: str, dtype: type[np.number] | np.dtype = np.int32) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {self.dtype}; supported: {sorted(map(str, _CODE_OF_DTYPE))}")
        self._limits = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        _remove_stale_tmp_files(prefix)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = bin_path(prefix) + suffix
        self._tmp_idx = idx_path(prefix) + suffix
        self._bin = open(self._tmp_bin, "wb")
        self._lengths: list[int] = []
        self._document_indices: list[int] = [0]
        self._finalized = False

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence to the current document."""
        array = self._as_tokens(tokens)
        self._bin.write(array.tobytes(order="C"))
        self._lengths.append(len(array))

    def end_document(self) -> None:
        """Close the current document (its sequences are those added since the previous boundary)."""
        self._document_indices.append(len(self._lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int] | None = None) -> None:
        """Append a document: one sequence, or several when `lengths` splits `tokens`."""
        if lengths is None:
            self.add_item(tokens)
        else:
            array = self._as_tokens(tokens)
            if sum(lengths) != len(array):
                raise ValueError(f"lengths sum to {sum(lengths)} but the document has {len(array)} tokens")
            self._bin.write(array.tobytes(order="C"))
            self._lengths.extend(int(n) for n in lengths)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: Sequence[int] | np.ndarray) -> None:
        """Append many single-sequence documents at once: `tokens` is their concatenation (one write)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        array = self._as_tokens(tokens)
        if int(lengths.sum()) != len(array):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(array)} tokens were given")
        self._bin.write(array.tobytes(order="C"))
        base = len(self._lengths)
        self._lengths.extend(lengths.tolist())
        self._document_indices.extend(range(base + 1, base + len(lengths) + 1))

    def add_index(self, prefix: str, on_bytes: Optional[Callable[[int], None]] = None) -> None:
        """Append every document of an existing dataset with the same dtype (used to merge shards); `on_bytes` is
        told each block of the .bin copied (a progress bar)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{prefix}: dtype {other.dtype} differs from the writer's {self.dtype}")
        base = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._document_indices.extend((other.document_indices[1:] + base).tolist())
        with open(bin_path(prefix), "rb") as source:
            while block := source.read(64 << 20):
                self._bin.write(block)
                if on_bytes:
                    on_bytes(len(block))

    @property
    def num_documents(self) -> int:
        return len(self._document_indices) - 1

    def finalize(self) -> None:
        """Write the index and move both files to their final names."""
        if self._finalized:
            raise RuntimeError(f"{self.prefix}: finalize() called twice")
        if self._document_indices[-1] != len(self._lengths):
            self.end_document()  # trailing sequences added with add_item form the last document
        self._bin.close()
        write_index_file(self._tmp_idx, self.dtype, self._lengths, self._document_indices)
        # Drop a previous .idx first so an old index never sits next to the new .bin, then publish .bin before
        # .idx: readers look for the .idx, so a complete dataset appears only once both are in place.
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))
        self._finalized = True

    def abort(self) -> None:
        """Discard the temporary files; the final names are left untouched."""
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._finalized:
            self.abort()

    def _as_tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {array.shape}")
        if array.dtype != self.dtype:
            # A silent wrap-around (e.g. id 70000 into uint16) would corrupt training data: check the range.
            if self._limits is not None and len(array) and (
                array.min() < self._limits.min or array.max() > self._limits.max
            ):
                raise ValueError(f"token ids outside the range of {self.dtype}: min {array.min()}, max {array.max()}")
            array = array.astype(self.dtype)
        return array


class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/PREFIX.idx; item i is the i-th sequence."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        check_dataset_exists(prefix)
        self._open()

    def _open(self) -> None:
        path = idx_path(self.prefix)
        size = os.path.getsize(path)
        if size < _HEADER.size:
            raise CorruptDatasetError(f"{path}: truncated index ({size} bytes, header alone is {_HEADER.size})")
        with open(path, "rb") as f:
            magic, version, code, n, d = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise CorruptDatasetError(f"{path}: not a Megatron mmap index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise CorruptDatasetError(f"{path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise CorruptDatasetError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPE_CODES)})")
        if np.dtype(DTYPE_CODES[code]).kind not in "iu":
            # Token ids are integers: a float code is a corrupt header or another tool's file; read as tokens
            # it would train on garbage (every value cast to an id).
            raise CorruptDatasetError(f"{path}: dtype code {code} means {np.dtype(DTYPE_CODES[code])}, not an "
                                      "integer token type; re-run tools/datasets/preprocess_data.py on the source")
        expected = _HEADER.size + 12 * n + 8 * d
        if size != expected:
            raise CorruptDatasetError(
                f"{path}: index is {size} bytes but its header ({n} sequences, {d - 1} documents) implies {expected}"
            )
        self._dtype = np.dtype(DTYPE_CODES[code])
        self._idx_map = np.memmap(path, mode="r", dtype=np.uint8)
        buffer = memoryview(self._idx_map)
        self._lengths = np.frombuffer(buffer, dtype=np.int32, count=n, offset=_HEADER.size)
        self._pointers = np.frombuffer(buffer, dtype=np.int64, count=n, offset=_HEADER.size + 4 * n)
        self._doc_indices = np.frombuffer(buffer, dtype=np.int64, count=d, offset=_HEADER.size + 12 * n)
        self._validate_index(path, n)

        data_path = bin_path(self.prefix)
        bin_size = os.path.getsize(data_path)
        expected_bin = self.num_tokens * self._dtype.itemsize
        if bin_size != expected_bin:
            raise CorruptDatasetError(
                f"{data_path}: data file is {bin_size} bytes but {path} describes {self.num_tokens} tokens of "
                f"{self._dtype} ({expected_bin} bytes); the pair is truncated or mismatched"
            )
        # np.memmap cannot map an empty file.
        self._bin_map = np.memmap(data_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)
        self._tokens = np.frombuffer(memoryview(self._bin_map), dtype=self._dtype)

    def _validate_index(self, path: str, n: int) -> None:
        # Vectorised checks: O(N) but only a few ms for millions of sequences.
        docs = self._doc_indices
        if len(docs) == 0 or docs[0] != 0 or docs[-1] != n or bool((docs[1:] < docs[:-1]).any()):
            first, last = (int(docs[0]), int(docs[-1])) if len(docs) else (None, None)
            raise CorruptDatasetError(
                f"{path}: inconsistent document index (must rise from 0 to {n} sequences; "
                f"starts at {first}, ends at {last})"
            )
        if n == 0:
            return
        if int(self._lengths.min()) < 0:
            raise CorruptDatasetError(f"{path}: negative sequence length")
        # In place, without temporaries: this runs on every open (a warm start of training included).
        expected = np.empty(n, dtype=np.int64)
        expected[0] = 0
        np.cumsum(self._lengths[:-1], dtype=np.int64, out=expected[1:])
        expected *= self._dtype.itemsize
        if not np.array_equal(expected, self._pointers):
            bad = int(np.argmax(expected != self._pointers))
            raise CorruptDatasetError(
                f"{path}: sequence {bad} points to byte {int(self._pointers[bad])}, expected {int(expected[bad])}"
            )

    # Pickling re-opens the files: memory maps cannot cross process boundaries (DataLoader workers, spawn).
    def __getstate__(self) -> str:
        return self.prefix

    def __setstate__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i (a read-only view into the memory map)."""
        n = len(self._lengths)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        i %= n
        size = int(self._lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {i} of length {size}")
        start = int(self._pointers[i]) // self._dtype.itemsize + offset
        return self._tokens[start : start + length]

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        return self._doc_indices

    @property
    def num_documents(self) -> int:
        return len(self._doc_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self._lengths.sum(dtype=np.int64))

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the .bin file as one flat memory-mapped array."""
        return self._tokens

    def document_tokens(self, doc: int) -> np.ndarray:
        """Tokens of every sequence of document `doc`, concatenated (a view: sequences are contiguous)."""
        first, last = int(self._doc_indices[doc]), int(self._doc_indices[doc + 1])
        if first == last:
            return self._tokens[:0]
        start = int(self._pointers[first]) // self._dtype.itemsize
        end = int(self._pointers[last - 1]) // self._dtype.itemsize + int(self._lengths[last - 1])
        return self._tokens[start:end]

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
            f"tokens={self.num_tokens}, dtype={self._dtype})"
        )
