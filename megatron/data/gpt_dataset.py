"""GPT pretraining samples over an indexed dataset, with Megatron's sampling semantics.

Each epoch visits the chosen documents once, in an order shuffled by (seed, epoch); the epochs are concatenated
into one token stream. Sample j is stream tokens [j*L, (j+1)*L + 1) for L = seq_length, so consecutive samples
share one token (the last input token of sample j is the first of j+1, which lets every position have a label).
Just enough epochs are built for `num_samples` samples, and the order in which samples are served is shuffled.

The three index arrays (document order, sample starts, sample shuffle) are built with vectorised numpy (the
sample starts with megatron-core's compiled `build_sample_idx` when it can be loaded; same result) and cached as
.npy files keyed by a hash of everything that shapes them, so later runs (and other ranks) only memory-map them.
Each cached file's size and a checksum of its full contents (xxh3-64, or CRC-32 without the xxhash package),
computed from the in-memory array while writing, are recorded; a load re-checks them over the memory map, so a
truncated, corrupted or stale cache is rebuilt.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import mmap
import os
import re
import sys
import zlib
from typing import Any

import numpy as np

from megatron.data.index_cache import rank_zero_first
from megatron.data.indexed_dataset import CorruptDatasetError, IndexedDataset, bin_path, idx_path

logger = logging.getLogger(__name__)

# Bump when the meaning or layout of the cached arrays changes: old caches then simply stop matching.
INDEX_FORMAT_VERSION = 2
_ARRAYS = ("doc_order", "sample_index", "shuffle_index")


def document_token_ranges(indexed: IndexedDataset) -> tuple[np.ndarray, np.ndarray]:
    """Start (in tokens, into the flat .bin) and length of every document. Sequences of a document are
    contiguous in .bin, so a document is one token range."""
    docs = indexed.document_indices
    if len(docs) == len(indexed) + 1 and np.array_equal(docs, np.arange(len(docs))):
        # One sequence per document (what preprocess_data.py writes): the validated byte pointers give the starts.
        return indexed.sequence_pointers // indexed.dtype.itemsize, indexed.sequence_lengths.astype(np.int64)
    seq_starts = np.zeros(len(indexed) + 1, dtype=np.int64)
    np.cumsum(indexed.sequence_lengths, dtype=np.int64, out=seq_starts[1:])
    bounds = seq_starts[indexed.document_indices]
    return bounds[:-1], np.diff(bounds)


def build_sample_indices(
    doc_lengths: np.ndarray, document_ids: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build (doc_order, sample_index, shuffle_index).

    doc_order[k]      : document id at position k of the epoch-concatenated stream (int32, or int64 for 2**31
                        documents or more)
    sample_index[j]   : (k, offset) where sample j starts: token `offset` of the document at stream position k
    shuffle_index[i]  : which sample is served as item i
    """
    document_ids = np.asarray(document_ids, dtype=np.int64)
    tokens_per_epoch = int(doc_lengths[document_ids].sum())
    if tokens_per_epoch == 0:
        raise ValueError("cannot build samples: the selected documents contain no tokens")
    tokens_needed = num_samples * seq_length + 1  # +1: the last sample's label token
    num_epochs = -(-tokens_needed // tokens_per_epoch)

    rng = np.random.Generator(np.random.PCG64(seed))
    # One independent permutation per epoch (a row each), so every epoch covers each document exactly once.
    order = rng.permuted(np.tile(document_ids, (num_epochs, 1)), axis=1).reshape(-1)
    if len(doc_lengths) < np.iinfo(np.int32).max:
        order = order.astype(np.int32)  # half the bytes to write, checksum and map (and what build_sample_idx takes)

    fast = _sample_index_compiled(doc_lengths, order, num_samples, seq_length, num_epochs, tokens_per_epoch)
    if fast is not None:
        sample_index, last_doc = fast
    else:
        sample_index, last_doc = _sample_index_numpy(doc_lengths, order, num_samples, seq_length)
    # Keep only the stream prefix that samples reach (the last sample ends one token past its window).
    doc_order = order[: last_doc + 1]
    shuffle_index = rng.permutation(num_samples).astype(np.int64)
    return doc_order, sample_index, shuffle_index


def _sample_index_numpy(doc_lengths: np.ndarray, order: np.ndarray, num_samples: int, seq_length: int
                        ) -> tuple[np.ndarray, int]:
    """(sample_index, stream position of the document holding token num_samples * seq_length)."""
    starts = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(doc_lengths[order], out=starts[1:])
    sample_starts = np.arange(num_samples, dtype=np.int64) * seq_length
    # side="right" then -1: the last document starting at or before the position, which skips empty documents.
    positions = np.searchsorted(starts, sample_starts, side="right") - 1
    sample_index = np.stack([positions, sample_starts - starts[positions]], axis=1)
    last_doc = int(np.searchsorted(starts, num_samples * seq_length, side="right")) - 1
    return sample_index, last_doc


_helpers: Any = False  # megatron-core's compiled helpers: False = not looked for yet, None = unavailable


def _megatron_core_helpers() -> Any:
    """megatron-core's helpers_cpp extension, loaded straight from its file: importing it the usual way would
    first import the whole `megatron.core` package (seconds). None when it is not installed or does not load."""
    global _helpers
    if _helpers is False:
        _helpers = sys.modules.get("megatron.core.datasets.helpers_cpp")
        if _helpers is None:
            try:
                spec = importlib.util.find_spec("megatron")
                locations = list(spec.submodule_search_locations or []) if spec else []
                files = [f for loc in locations for f in
                         sorted(glob.glob(os.path.join(loc, "core", "datasets", "helpers_cpp*.so")))]
                if files:
                    name = "megatron.core.datasets.helpers_cpp"
                    loader = importlib.machinery.ExtensionFileLoader(name, files[0])
                    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
                        name, files[0], loader=loader))
                    loader.exec_module(module)
                    _helpers = module if hasattr(module, "build_sample_idx_int64") else None
            except Exception as err:  # a wheel built for another Python, a missing libstdc++ ...
                logger.debug("megatron-core helpers_cpp unavailable (%s); using numpy", err)
                _helpers = None
    return _helpers


def _sample_index_compiled(doc_lengths: np.ndarray, order: np.ndarray, num_samples: int, seq_length: int,
                           num_epochs: int, tokens_per_epoch: int) -> tuple[np.ndarray, int] | None:
    """`_sample_index_numpy` with megatron-core's C++ `build_sample_idx` (one linear pass instead of a gather,
    a cumsum over the stream and a binary search per sample; ~4x faster). Same arrays: tests compare the two.

    build_sample_idx walks the stream in windows of seq_length + 1 tokens overlapping by one, and records where
    each window starts as (stream position, offset), always inside a non-empty document, exactly like the numpy
    search, except for sample 0, which it puts at (0, 0) even if the stream starts with empty documents."""
    helpers = _megatron_core_helpers()
    i32 = np.iinfo(np.int32).max
    if (helpers is None or seq_length < 2 or tokens_per_epoch < 2 or num_epochs > i32 or seq_length >= i32
            or len(order) >= i32 or len(doc_lengths) >= i32 or (len(doc_lengths) and doc_lengths.max() >= i32)):
        return None
    sizes = doc_lengths.astype(np.int32)
    # Every sample of the num_epochs epochs; the first num_samples rows are ours.
    built = helpers.build_sample_idx_int64(sizes, order.astype(np.int32, copy=False), seq_length, num_epochs,
                                           tokens_per_epoch, True, 1)
    sample_index = np.ascontiguousarray(built[:num_samples])
    sample_index[0] = (_first_nonempty(doc_lengths, order, 0), 0)
    # The document holding token num_samples * seq_length (the last label): walk on from the last sample's start
    # (a few documents); row num_samples of `built` may be the end-of-stream marker instead.
    position, offset = (int(v) for v in sample_index[-1])
    offset += seq_length
    while position + 1 < len(order) and offset >= doc_lengths[order[position]]:
        offset -= int(doc_lengths[order[position]])
        position += 1
    return sample_index, position


def _first_nonempty(doc_lengths: np.ndarray, order: np.ndarray, start: int) -> int:
    """Stream position of the first non-empty document at or after `start` (looked at in small blocks)."""
    block = 256
    while start < len(order):
        nonempty = np.flatnonzero(doc_lengths[order[start : start + block]])
        if len(nonempty):
            return start + int(nonempty[0])
        start, block = start + block, block * 2
    raise ValueError("no non-empty document in the stream")


def _checksum_algorithm() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def _checksum(buffers: list, algorithm: str) -> int:
    """Checksum of the concatenated buffers; ValueError for an algorithm this installation lacks."""
    if algorithm == "xxh3_64":
        try:
            import xxhash
        except ImportError as err:
            raise ValueError("xxhash is not installed") from err
        h = xxhash.xxh3_64()
        for b in buffers:
            h.update(b)
        return h.intdigest()
    if algorithm == "crc32":
        crc = 0
        for b in buffers:
            crc = zlib.crc32(b, crc)
        return crc
    raise ValueError(f"unknown checksum {algorithm!r}")


def _file_checksum(path: str, algorithm: str) -> int:
    """Checksum of a whole file, read through a memory map (no copy into Python bytes)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return _checksum([b""], algorithm)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _checksum([view], algorithm)
            finally:
                view.release()


def _save_with_checksum(path: str, array: np.ndarray, algorithm: str) -> tuple[int, int]:
    """np.save `array` to `path`; (file size, checksum of the whole file) computed from the header bytes and
    the in-memory array, not by reading the data back."""
    array = np.ascontiguousarray(array)
    with open(path, "wb") as f:
        np.save(f, array)
        size = f.tell()
    with open(path, "rb") as f:
        header = f.read(size - array.nbytes)
    return size, _checksum([header, memoryview(array).cast("B")], algorithm)


def empty_data_message(name: str, datasets: list[IndexedDataset], selected: int | None = None) -> str:
    """Why `name` has no samples to build, naming the files and the tool that shows what they hold."""
    prefixes = ", ".join(ix.prefix for ix in datasets)
    which = f"the {selected:,} selected documents of" if selected is not None else "the documents of"
    totals = "; ".join(f"{ix.prefix}: {ix.num_documents:,} documents, {ix.num_tokens:,} tokens" for ix in datasets)
    return (f"{name}: cannot build samples: {which} {prefixes} contain no tokens ({totals}). Look at the data "
            f"with `python tools/datasets/inspect_dataset.py {datasets[0].prefix}`; an empty dataset usually "
            f"means preprocessing kept no documents (see its .stats.json).")


def check_labels_match(indexed: IndexedDataset, labels: IndexedDataset) -> None:
    """A label dataset must have its token dataset's documents and sequence lengths, position for position."""
    problem = None
    if labels.num_documents != indexed.num_documents:
        problem = f"{labels.num_documents:,} documents, the tokens {indexed.num_documents:,}"
    elif not np.array_equal(labels.document_indices, indexed.document_indices):
        problem = "its documents are split into sequences differently"
    elif not np.array_equal(labels.sequence_lengths, indexed.sequence_lengths):
        bad = int(np.flatnonzero(labels.sequence_lengths != indexed.sequence_lengths)[0])
        problem = (f"sequence {bad} holds {int(labels.sequence_lengths[bad])} labels for "
                   f"{int(indexed.sequence_lengths[bad])} tokens")
    if problem:
        raise CorruptDatasetError(f"label dataset {labels.prefix} does not match token dataset {indexed.prefix}: "
                                  f"{problem}. Write both with the same preprocessing run "
                                  "(tools/datasets/preprocess_data_with_chat_template.py).")


class GPTDataset:
    """`num_samples` samples of `seq_length + 1` tokens from `indexed` (see the module docstring)."""

    def __init__(
        self,
        indexed: IndexedDataset,
        name: str,
        num_samples: int,
        seq_length: int,
        seed: int,
        document_ids: np.ndarray | None = None,
        cache_dir: str | None = None,
        labels: IndexedDataset | None = None,
    ) -> None:
        if num_samples <= 0 or seq_length <= 0:
            raise ValueError(f"num_samples ({num_samples}) and seq_length ({seq_length}) must be positive")
        if labels is not None:
            check_labels_match(indexed, labels)
        self.indexed = indexed
        self.labels = labels  # SFT: per-token targets, -100 where no loss is taken; read at the tokens' positions
        self.name = name
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.seed = seed
        self._all_documents = document_ids is None
        self.document_ids = (
            np.arange(indexed.num_documents, dtype=np.int64)
            if document_ids is None
            else np.asarray(document_ids, dtype=np.int64)
        )
        if not self._all_documents and len(self.document_ids) and (
            self.document_ids.min() < 0 or self.document_ids.max() >= indexed.num_documents
        ):
            raise ValueError(f"{name}: document_ids outside [0, {indexed.num_documents})")
        self._ranges: tuple[np.ndarray, np.ndarray] | None = None  # document_token_ranges, computed when needed
        self.cache_dir = cache_dir if cache_dir is not None else indexed.prefix + "_cache"
        self.description = self._describe()
        self.cache_key = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:20]
        self.doc_order, self.sample_index, self.shuffle_index = self._load_or_build()

    # Start and length of every document, only needed to build the index (a loaded index reads documents
    # through IndexedDataset.document_tokens instead: O(1) each, so a warm start does no O(documents) work here).
    @property
    def doc_starts(self) -> np.ndarray:
        if self._ranges is None:
            self._ranges = document_token_ranges(self.indexed)
        return self._ranges[0]

    @property
    def doc_lengths(self) -> np.ndarray:
        if self._ranges is None:
            self._ranges = document_token_ranges(self.indexed)
        return self._ranges[1]

    def _describe(self) -> dict:
        """Everything that shapes the index arrays; its hash names the cache files."""
        stats = {p: [os.path.getsize(p), os.stat(p).st_mtime_ns] for p in (idx_path(self.indexed.prefix),
                                                                          bin_path(self.indexed.prefix))}
        ids = self.document_ids
        # A contiguous range (all documents, or a split's block) is described by its ends instead of a hash of
        # the whole array (a few ms for millions of documents).
        if self._all_documents or (len(ids) and int(ids[-1]) - int(ids[0]) == len(ids) - 1
                                   and bool(np.all(np.diff(ids) == 1))):
            selection = {"document_range": [int(ids[0]), int(ids[-1]) + 1] if len(ids) else [0, 0]}
        else:
            selection = {"document_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
        return {
            "format_version": INDEX_FORMAT_VERSION,
            "prefix": os.path.abspath(self.indexed.prefix),
            "files": {os.path.basename(p): s for p, s in stats.items()},
            "name": self.name,
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
            "num_document_ids": len(ids),
            **selection,
        }

    # ---- cache -------------------------------------------------------------------------------------------

    def _paths(self) -> tuple[str, dict[str, str]]:
        stem = os.path.join(self.cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}_{self.cache_key}")
        return stem + "_description.json", {a: f"{stem}_{a}.npy" for a in _ARRAYS}

    def _load_valid_cache(self) -> tuple[np.ndarray, ...] | None:
        """The cached arrays (memory-mapped), or None when the cache is missing, stale or damaged.

        The JSON description is written last and records each file's size and checksum, so a partial write, a
        truncated or corrupted array, or a description from another configuration all read as invalid. The
        checksums cover every byte of each file (header included) and are recomputed over the memory map at
        each load: with xxh3 that costs well under a millisecond per 10 MB."""
        desc_path, paths = self._paths()
        try:
            with open(desc_path) as f:
                stored = json.load(f)
            if stored.get("description") != self.description:
                return None
            algorithm = stored["checksum"]
            arrays = []
            for array, path in paths.items():
                meta = stored["arrays"][array]
                if os.path.getsize(path) != meta["bytes"] or _file_checksum(path, algorithm) != meta["checksum"]:
                    return None
                loaded = np.load(path, mmap_mode="r")
                if list(loaded.shape) != meta["shape"]:
                    return None
                arrays.append(loaded)
            return tuple(arrays)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _cache_is_valid(self) -> bool:
        return self._load_valid_cache() is not None

    def _build_and_save(self) -> tuple[np.ndarray, ...]:
        if not self.doc_lengths[self.document_ids].any():
            raise ValueError(empty_data_message(self.name, [self.indexed], None if self._all_documents
                                                else len(self.document_ids)))
        arrays = build_sample_indices(
            self.doc_lengths, self.document_ids, self.num_samples, self.seq_length, self.seed
        )
        desc_path, paths = self._paths()
        algorithm = _checksum_algorithm()
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            meta = {}
            for (array_name, path), array in zip(paths.items(), arrays):
                tmp = f"{path}.tmp-{os.getpid()}"
                size, checksum = _save_with_checksum(tmp, array, algorithm)
                os.replace(tmp, path)
                meta[array_name] = {"bytes": size, "checksum": checksum, "shape": list(array.shape)}
            tmp = f"{desc_path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"description": self.description, "checksum": algorithm, "arrays": meta}, f, indent=1)
            os.replace(tmp, desc_path)
            # Serve the files just written and checksummed (memory-mapped, like any later load: page cache
            # rather than private memory, which matters for very large corpora).
            return tuple(np.load(paths[a], mmap_mode="r") for a in _ARRAYS)
        except OSError as err:  # a read-only data directory should not stop training
            logger.warning("%s: cannot write index cache in %s (%s); keeping it in memory", self.name,
                           self.cache_dir, err)
        return arrays

    def _load_or_build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Rank 0 builds while the others wait (if it fails, they all fail with its error); a rank that still sees
        # no valid cache afterwards (e.g. a node-local cache_dir on another node) builds its own. Writes are
        # atomic renames, so this is safe.
        def on_rank_zero() -> tuple[np.ndarray, ...]:
            arrays = self._load_valid_cache()
            if arrays is None:
                logger.info("%s: building sample index (%d samples) in %s", self.name, self.num_samples,
                            self.cache_dir)
                arrays = self._build_and_save()
            return arrays

        arrays = rank_zero_first(on_rank_zero, self.name)
        if arrays is None:
            arrays = self._load_valid_cache()
        if arrays is None:
            arrays = self._build_and_save()
        return arrays  # type: ignore[return-value]

    # ---- samples -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.name} ({self.num_samples} samples)")
        position, offset = (int(v) for v in self.sample_index[int(self.shuffle_index[i])])
        needed = self.seq_length + 1
        pieces, label_pieces = [], []
        while needed > 0:
            doc = int(self.doc_order[position])
            document = self.indexed.document_tokens(doc)
            take = min(needed, len(document) - offset)
            pieces.append(document[offset : offset + take])
            if self.labels is not None:
                label_pieces.append(self.labels.document_tokens(doc)[offset : offset + take])
            needed -= take
            position += 1
            offset = 0
        sample = {"tokens": np.concatenate(pieces).astype(np.int64)}
        if self.labels is not None:
            sample["labels"] = np.concatenate(label_pieces).astype(np.int64)
        return sample
