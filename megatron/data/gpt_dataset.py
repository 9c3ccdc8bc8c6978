"""GPT pretraining samples over an indexed dataset, with Megatron's sampling semantics.

Each epoch visits the chosen documents once, in an order shuffled by (seed, epoch); the epochs are concatenated
into one token stream. Sample j is stream tokens [j*L, (j+1)*L + 1) for L = seq_length, so consecutive samples
share one token (the last input token of sample j is the first of j+1, which lets every position have a label).
Just enough epochs are built for `num_samples` samples, and the order in which samples are served is shuffled.

The three index arrays (document order, sample starts, sample shuffle) are built with vectorised numpy and
cached as .npy files keyed by a hash of everything that shapes them, so later runs (and other ranks) only
memory-map them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib

import numpy as np

from megatron.data.indexed_dataset import IndexedDataset, bin_path, idx_path

logger = logging.getLogger(__name__)

# Bump when the meaning or layout of the cached arrays changes: old caches then simply stop matching.
INDEX_FORMAT_VERSION = 1
_ARRAYS = ("doc_order", "sample_index", "shuffle_index")


def document_token_ranges(indexed: IndexedDataset) -> tuple[np.ndarray, np.ndarray]:
    """Start (in tokens, into the flat .bin) and length of every document. Sequences of a document are
    contiguous in .bin, so a document is one token range."""
    seq_starts = np.zeros(len(indexed) + 1, dtype=np.int64)
    np.cumsum(indexed.sequence_lengths, dtype=np.int64, out=seq_starts[1:])
    bounds = seq_starts[indexed.document_indices]
    return bounds[:-1], np.diff(bounds)


def build_sample_indices(
    doc_lengths: np.ndarray, document_ids: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Build (doc_order, sample_index, shuffle_index).

    doc_order[k]      : document id at position k of the epoch-concatenated stream (int64)
    sample_index[j]   : (k, offset) where sample j starts: token `offset` of the document at stream position k
    shuffle_index[i]  : which sample is served as item i
    """
    tokens_per_epoch = int(doc_lengths[document_ids].sum())
    if tokens_per_epoch == 0:
        raise ValueError("cannot build samples: the selected documents contain no tokens")
    tokens_needed = num_samples * seq_length + 1  # +1: the last sample's label token
    num_epochs = -(-tokens_needed // tokens_per_epoch)

    rng = np.random.Generator(np.random.PCG64(seed))
    # One independent permutation per epoch (a row each), so every epoch covers each document exactly once.
    order = rng.permuted(np.tile(document_ids.astype(np.int64), (num_epochs, 1)), axis=1).reshape(-1)

    starts = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(doc_lengths[order], out=starts[1:])
    sample_starts = np.arange(num_samples, dtype=np.int64) * seq_length
    # side="right" then -1: the last document starting at or before the position, which skips empty documents.
    positions = np.searchsorted(starts, sample_starts, side="right") - 1
    sample_index = np.stack([positions, sample_starts - starts[positions]], axis=1)

    # Keep only the stream prefix that samples reach (the last sample ends one token past its window).
    last_doc = int(np.searchsorted(starts, num_samples * seq_length, side="right")) - 1
    doc_order = order[: last_doc + 1]
    shuffle_index = rng.permutation(num_samples).astype(np.int64)
    return doc_order, sample_index, shuffle_index


def _file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return crc


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
    ) -> None:
        if num_samples <= 0 or seq_length <= 0:
            raise ValueError(f"num_samples ({num_samples}) and seq_length ({seq_length}) must be positive")
        self.indexed = indexed
        self.name = name
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.seed = seed
        self.document_ids = (
            np.arange(indexed.num_documents, dtype=np.int64)
            if document_ids is None
            else np.asarray(document_ids, dtype=np.int64)
        )
        if len(self.document_ids) and (
            self.document_ids.min() < 0 or self.document_ids.max() >= indexed.num_documents
        ):
            raise ValueError(f"{name}: document_ids outside [0, {indexed.num_documents})")
        self.doc_starts, self.doc_lengths = document_token_ranges(indexed)
        self.cache_dir = cache_dir if cache_dir is not None else indexed.prefix + "_cache"
        self.description = self._describe()
        self.cache_key = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:20]
        self.doc_order, self.sample_index, self.shuffle_index = self._load_or_build()

    def _describe(self) -> dict:
        """Everything that shapes the index arrays; its hash names the cache files."""
        stats = {p: [os.path.getsize(p), os.stat(p).st_mtime_ns] for p in (idx_path(self.indexed.prefix),
                                                                          bin_path(self.indexed.prefix))}
        return {
            "format_version": INDEX_FORMAT_VERSION,
            "prefix": os.path.abspath(self.indexed.prefix),
            "files": {os.path.basename(p): s for p, s in stats.items()},
            "name": self.name,
            "num_samples": self.num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
            "num_document_ids": len(self.document_ids),
            "document_ids_sha256": hashlib.sha256(self.document_ids.tobytes()).hexdigest(),
        }

    # ---- cache -------------------------------------------------------------------------------------------

    def _paths(self) -> tuple[str, dict[str, str]]:
        stem = os.path.join(self.cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}_{self.cache_key}")
        return stem + "_description.json", {a: f"{stem}_{a}.npy" for a in _ARRAYS}

    def _cache_is_valid(self) -> bool:
        """The JSON description is written last and records each array's size and CRC, so a partial write,
        a truncated or corrupted array, or a description from another configuration all read as invalid."""
        desc_path, paths = self._paths()
        try:
            with open(desc_path) as f:
                stored = json.load(f)
            if stored.get("description") != self.description:
                return False
            for array, path in paths.items():
                meta = stored["arrays"][array]
                if os.path.getsize(path) != meta["bytes"] or _file_crc32(path) != meta["crc32"]:
                    return False
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def _build_and_save(self) -> tuple[np.ndarray, ...] | None:
        arrays = build_sample_indices(
            self.doc_lengths, self.document_ids, self.num_samples, self.seq_length, self.seed
        )
        desc_path, paths = self._paths()
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            meta = {}
            for (array_name, path), array in zip(paths.items(), arrays):
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, path)
                meta[array_name] = {"bytes": os.path.getsize(path), "crc32": _file_crc32(path),
                                    "shape": list(array.shape)}
            tmp = f"{desc_path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"description": self.description, "arrays": meta}, f, indent=1)
            os.replace(tmp, desc_path)
        except OSError as err:  # a read-only data directory should not stop training
            logger.warning("%s: cannot write index cache in %s (%s); keeping it in memory", self.name,
                           self.cache_dir, err)
            return arrays
        return None

    def _load_or_build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        in_memory, built_here = None, False
        # Rank 0 builds while the others wait; a rank that still sees no valid cache after the barrier (e.g.
        # a node-local cache_dir on another node) builds its own. Writes are atomic renames, so this is safe.
        if not distributed or dist.get_rank() == 0:
            if not self._cache_is_valid():
                logger.info("%s: building sample index (%d samples) in %s", self.name, self.num_samples,
                            self.cache_dir)
                in_memory, built_here = self._build_and_save(), True
        if distributed:
            dist.barrier()
        # The builder just wrote and checksummed the files itself: re-reading them to validate would double the cost.
        if in_memory is None and not built_here and not self._cache_is_valid():
            in_memory = self._build_and_save()
        if in_memory is not None:
            return in_memory
        _, paths = self._paths()
        return tuple(np.load(paths[a], mmap_mode="r") for a in _ARRAYS)  # type: ignore[return-value]

    # ---- samples -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.name} ({self.num_samples} samples)")
        position, offset = (int(v) for v in self.sample_index[int(self.shuffle_index[i])])
        needed = self.seq_length + 1
        tokens = self.indexed.tokens
        pieces = []
        while needed > 0:
            doc = int(self.doc_order[position])
            start = int(self.doc_starts[doc]) + offset
            take = min(needed, int(self.doc_lengths[doc]) - offset)
            pieces.append(tokens[start : start + take])
            needed -= take
            position += 1
            offset = 0
        return {"tokens": np.concatenate(pieces).astype(np.int64)}
