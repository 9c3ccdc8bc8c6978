"""On-disk cache for derived index arrays, with the same guarantees as GPTDataset's sample-index cache.

Arrays are saved as .npy files named by a hash of a JSON description of everything that shapes them, next to a
JSON file written last that records the description, each array's size and CRC-32, and any small JSON payload
(`extra`). A missing, truncated, corrupted or stale cache reads as invalid and is rebuilt. Under
torch.distributed, rank 0 builds while the other ranks wait for it (`rank_zero_first`: if rank 0 fails, every rank
fails with its error); a rank that still finds no valid cache afterwards (a node-local cache directory) builds its
own. Writes are atomic renames, so concurrent builders are safe. An unwritable cache directory falls back to
in-memory arrays with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from megatron.data.indexed_dataset import bin_path, idx_path

logger = logging.getLogger(__name__)

BuildResult = tuple[dict[str, np.ndarray], dict[str, Any]]
T = TypeVar("T")


def rank_zero_first(work: Callable[[], T], what: str) -> T | None:
    """work() on rank 0 while the other ranks wait, which get None; without torch.distributed, just work().

    Rank 0 then broadcasts whether it succeeded, where a bare barrier would leave the other ranks waiting for
    the process-group timeout (30 minutes by default; NCCL does not notice a rank that has exited) whenever
    rank 0 fails: now they raise at once, with rank 0's error, and rank 0 raises its own."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return work()
    result, failure = None, None
    if dist.get_rank() == 0:
        try:
            result = work()
        except Exception as err:  # noqa: BLE001 - every failure must reach the other ranks before we raise it
            failure = err
    outcome = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"{what}: rank 0 failed to build the index, so rank {dist.get_rank()} stops too. "
                           f"Rank 0's error: {outcome[0]}")
    return result


def dataset_file_stats(prefix: str) -> dict[str, Any]:
    """What identifies a .bin/.idx pair's contents cheaply: absolute prefix, sizes and mtimes."""
    return {
        "prefix": os.path.abspath(prefix),
        "files": {os.path.basename(p): [os.path.getsize(p), os.stat(p).st_mtime_ns]
                  for p in (idx_path(prefix), bin_path(prefix))},
    }


def description_key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def _file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return crc


class ArrayCache:
    """The cache files of one named set of arrays under `cache_dir`."""

    def __init__(self, cache_dir: str, name: str, description: dict[str, Any], array_names: Sequence[str]):
        self.cache_dir = cache_dir
        self.description = description
        self.key = description_key(description)
        self.array_names = tuple(array_names)
        stem = os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}_{self.key}")
        self.description_path = stem + "_description.json"
        self.paths = {a: f"{stem}_{a}.npy" for a in self.array_names}

    def read_valid(self) -> dict[str, Any] | None:
        """The stored JSON (with `extra`) if the cache is complete and matches the description, else None."""
        try:
            with open(self.description_path) as f:
                stored = json.load(f)
            if stored.get("description") != self.description:
                return None
            for array, path in self.paths.items():
                meta = stored["arrays"][array]
                if os.path.getsize(path) != meta["bytes"] or _file_crc32(path) != meta["crc32"]:
                    return None
            return stored
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> bool:
        """Write arrays, then the description; False (with a warning) if the directory is not writable."""
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            meta = {}
            for name, path in self.paths.items():
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "wb") as f:
                    np.save(f, arrays[name])
                os.replace(tmp, path)
                meta[name] = {"bytes": os.path.getsize(path), "crc32": _file_crc32(path),
                              "shape": list(arrays[name].shape)}
            tmp = f"{self.description_path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"description": self.description, "arrays": meta, "extra": extra}, f, indent=1)
            os.replace(tmp, self.description_path)
            return True
        except OSError as err:  # a read-only data directory should not stop training
            logger.warning("cannot write index cache in %s (%s); keeping it in memory", self.cache_dir, err)
            return False

    def load(self) -> dict[str, np.ndarray]:
        return {a: np.load(p, mmap_mode="r") for a, p in self.paths.items()}


def load_or_build(cache: ArrayCache, build: Callable[[], BuildResult], what: str) -> BuildResult:
    """(arrays, extra) from `cache`, building them with `build()` where no valid cache exists."""

    def on_rank_zero() -> BuildResult | None:
        if cache.read_valid() is not None:
            return None
        logger.info("%s: building index in %s", what, cache.cache_dir)
        built = build()
        return None if cache.save(*built) else built  # saved: every rank memory-maps the files, rank 0 included

    built = rank_zero_first(on_rank_zero, what)
    stored = None if built is not None else cache.read_valid()
    if built is None and stored is None:
        built = build()
        cache.save(*built)
    if built is not None:
        return built
    return cache.load(), stored["extra"]
