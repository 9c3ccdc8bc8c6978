"""Samples made of whole documents (GPT-NeoX's `pack_impl`), for SFT conversations above all.

`packed` (megatron/data/gpt_dataset.py) cuts one token stream into samples: a conversation may start in one
sample and end in the next, whose first tokens are then assistant answers without their question. The modes here
never split a document:

* `best_fit` (the default for label datasets): each epoch's documents are placed, longest first, into the sample
  with the least room that still holds them (best-fit decreasing), then the samples are shuffled;
* `pack_until_overflow`: documents in shuffled order fill a sample until the next one would overflow it;
* `unpacked`: one document per sample.

A sample holds seq_length + 1 tokens (the last one is only a label). After its documents it is padded with the
EOD token, whose label is -100; a document that does not end with EOD gets one appended (label -100), so the
model's document masks (reset_position_ids / reset_attention_mask, switched on for these modes: see
LlamaConfig.from_neox) restart positions and attention at every document and every padding token.

A document longer than seq_length + 1 tokens: with labels (chat data) it is cut after its last end-of-message
token (`<|eot_id|>`, `boundary_id`) such that it and an appended EOD fit, if the kept part still holds a loss
token; otherwise it is dropped. Without labels it is cut to seq_length tokens plus EOD. Both are counted
(`stats`) and logged.

Every epoch packs all documents once (shuffled by (seed, epoch)), epochs follow each other, and the dataset holds
the first `num_samples` samples of that sequence, so `samples_per_epoch` lets train_epochs with label datasets
become train_iters. The packing (a few seconds per million documents and epoch; a pure function of the lengths and
the seed) is built once by rank 0 and cached on disk with the other index caches; later starts memory-map it.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np

from megatron.data.gpt_dataset import check_labels_match, document_token_ranges
from megatron.data.index_cache import ArrayCache, dataset_file_stats, load_or_build
from megatron.data.indexed_dataset import IndexedDataset

PACK_IMPLS = ("packed", "pack_until_overflow", "unpacked", "best_fit")
IGNORE_INDEX = -100


def pack(lengths: np.ndarray, capacity: int, impl: str) -> list[np.ndarray]:
    """Bins (arrays of indices into `lengths`, in placement order) holding every item, each bin's lengths
    summing to at most `capacity`; items are taken in the given order (already shuffled by the caller)."""
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"an item of {int(lengths.max())} tokens exceeds the capacity {capacity}")
    if impl == "unpacked":
        return [np.array([i]) for i in range(len(lengths))]
    bins: list[list[int]] = []
    if impl == "pack_until_overflow":
        room = 0
        for i, n in enumerate(lengths.tolist()):
            if not bins or n > room:
                bins.append([])
                room = capacity
            bins[-1].append(i)
            room -= n
        return [np.array(b) for b in bins]
    if impl != "best_fit":
        raise ValueError(f"pack_impl must be one of {PACK_IMPLS[1:]} here, got {impl!r}")
    # Best-fit decreasing: `open_rooms` is sorted (room left, bin), so the fullest bin that fits is one bisect away.
    open_rooms: list[tuple[int, int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(open_rooms, (n, -1))
        if k < len(open_rooms):
            room, b = open_rooms.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(open_rooms, (room - n, b))
    return [np.array(b) for b in bins]


def cut_point(tokens: np.ndarray, labels: np.ndarray, room: int, boundary_id: int | None) -> int:
    """How many tokens of an over-long labelled document are kept: up to just after its last end-of-message
    token (`boundary_id`) within `room` tokens, if they hold a loss token; 0 (dropped) otherwise."""
    if boundary_id is None:
        return 0
    tokens, labels = tokens[:room], labels[:room]
    for cut in (np.flatnonzero(tokens == boundary_id) + 1)[::-1].tolist():
        if np.any(labels[:cut] != IGNORE_INDEX):
            return cut
    return 0


@dataclass
class PackingStats:
    capacity: int = 0  # tokens per sample
    documents: int = 0
    truncated: int = 0
    dropped: int = 0
    samples_per_epoch: int = 0
    tokens_per_epoch: int = 0  # document tokens placed (with appended EODs)

    @property
    def padding_share(self) -> float:
        """Share of the sample tokens that are padding."""
        total = self.samples_per_epoch * self.capacity
        return 1.0 - self.tokens_per_epoch / total if total else 0.0


# Bump when the meaning or layout of the cached packing arrays changes: old caches then simply stop matching.
FORMAT_VERSION = 1
_ARRAYS = ("doc_ids", "keep", "append", "members", "offsets")


class PackedDocumentsDataset:
    """`num_samples` samples of whole documents (see the module docstring); items carry "tokens" and "labels".

    The packing is cached like GPTDataset's sample index (megatron/data/index_cache.py: .npy files under
    `cache_dir`, default PREFIX_cache, named by a hash of everything that shapes them, checksummed, rank 0 builds
    while the others wait): a restart memory-maps it instead of packing again (a few seconds per million
    documents and epoch, on every rank)."""

    def __init__(self, indexed: IndexedDataset, name: str, num_samples: int, seq_length: int, seed: int,
                 impl: str, eod_id: int, document_ids: np.ndarray | None = None,
                 labels: IndexedDataset | None = None, boundary_id: int | None = None,
                 cache_dir: str | None = None) -> None:
        if labels is not None:
            check_labels_match(indexed, labels)
        self.indexed, self.labels, self.name = indexed, labels, name
        self.seq_length, self.seed, self.impl, self.eod_id = seq_length, seed, impl, eod_id
        self.num_samples = num_samples
        ids = np.arange(indexed.num_documents) if document_ids is None else np.asarray(document_ids, np.int64)
        description = {
            "format_version": FORMAT_VERSION, "name": name, "impl": impl, "num_samples": num_samples,
            "seq_length": seq_length, "seed": seed, "eod_id": eod_id, "boundary_id": boundary_id,
            "tokens": dataset_file_stats(indexed.prefix),
            "labels": None if labels is None else dataset_file_stats(labels.prefix),
            "num_document_ids": len(ids), "document_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
        }
        cache = ArrayCache(cache_dir if cache_dir is not None else indexed.prefix + "_cache", f"{name}_{impl}",
                           description, _ARRAYS)
        arrays, stats = load_or_build(cache, lambda: self._pack(ids, boundary_id), f"{name} ({impl} packing)")
        self.doc_ids, self.keep, self.append = arrays["doc_ids"], arrays["keep"], arrays["append"]
        self.members, self.offsets = arrays["members"], arrays["offsets"]
        self.stats = PackingStats(**stats)

    def _pack(self, ids: np.ndarray, boundary_id: int | None) -> tuple[dict[str, np.ndarray], dict]:
        """The packing itself: (arrays, stats as a dict) for the cache."""
        indexed, capacity, seed, impl = self.indexed, self.seq_length + 1, self.seed, self.impl
        starts, lengths = document_token_ranges(indexed)
        ids = ids[lengths[ids] > 0]
        flat = indexed.tokens
        ends_with_eod = flat[starts[ids] + lengths[ids] - 1] == self.eod_id
        # Tokens each document keeps, and whether an EOD is appended after them.
        keep = lengths[ids].astype(np.int64)
        append = ~ends_with_eod
        stats = PackingStats(capacity=capacity, documents=len(ids))
        for j in np.flatnonzero(keep + append > capacity).tolist():
            cut = self._cut(int(ids[j]), capacity - 1, boundary_id)
            if cut == 0:
                stats.dropped += 1
            else:
                stats.truncated += 1
            keep[j], append[j] = cut, True
        placed = keep > 0
        doc_ids, keep, append = ids[placed], keep[placed], append[placed]
        if not len(doc_ids):
            raise ValueError(f"{self.name}: no document fits in seq_length {self.seq_length} (+1) tokens "
                             f"({stats.dropped:,} dropped)")
        sizes = keep + append
        stats.tokens_per_epoch = int(sizes.sum())
        # Epochs until num_samples: each a packing of every document in an order shuffled by (seed, epoch).
        # Kept flat (sample i holds members[offsets[i]:offsets[i + 1]]): a list of one small array per sample
        # would cost ~100 bytes of Python object per sample, gigabytes per rank for tens of millions of them.
        members, counts, placed_samples, epoch = [], [], 0, 0
        while placed_samples < self.num_samples:
            rng = np.random.Generator(np.random.PCG64([seed, epoch]))
            order = rng.permutation(len(doc_ids))
            bins = [order[b] for b in pack(sizes[order], capacity, impl)]
            if impl == "best_fit":
                bins = [bins[k] for k in rng.permutation(len(bins))]
            if epoch == 0:
                stats.samples_per_epoch = len(bins)
            bins = bins[:self.num_samples - placed_samples]
            members.append(np.concatenate(bins).astype(np.int64))
            counts.append(np.fromiter((len(b) for b in bins), np.int64, len(bins)))
            placed_samples += len(bins)
            epoch += 1
        arrays = {"doc_ids": doc_ids.astype(np.int64), "keep": keep, "append": append.astype(np.bool_),
                  "members": np.concatenate(members) if members else np.zeros(0, np.int64),
                  "offsets": (np.concatenate([[0], np.cumsum(np.concatenate(counts))]) if counts
                              else np.zeros(1, np.int64))}
        return arrays, asdict(stats)

    def _cut(self, doc: int, room: int, boundary_id: int | None) -> int:
        """Tokens kept of an over-long document so that they and an EOD fit (see the module docstring)."""
        if self.labels is None:
            return room
        return cut_point(self.indexed.document_tokens(doc), self.labels.document_tokens(doc), room, boundary_id)

    def summary(self) -> str:
        s = self.stats
        return (f"{self.name}: {self.impl} packing of {s.documents:,} documents into {s.samples_per_epoch:,} "
                f"samples per epoch of {self.seq_length + 1} tokens, {100 * s.padding_share:.1f}% padding; "
                f"{s.truncated:,} truncated, {s.dropped:,} dropped (longer than a sample)")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.name} ({self.num_samples} samples)")
        tokens = np.full(self.seq_length + 1, self.eod_id, dtype=np.int64)
        labels = np.full(self.seq_length + 1, IGNORE_INDEX, dtype=np.int64)
        at = 0
        i %= self.num_samples  # a negative index counts from the end, as for a list
        for k in self.members[self.offsets[i]:self.offsets[i + 1]].tolist():
            doc, n = int(self.doc_ids[k]), int(self.keep[k])
            tokens[at : at + n] = self.indexed.document_tokens(doc)[:n]
            labels[at : at + n] = (self.labels.document_tokens(doc) if self.labels is not None
                                   else tokens[at : at + n])[:n]
            at += n + int(self.append[k])  # the appended EOD is already there, with label -100
        return {"tokens": tokens, "labels": labels}


def packing_summaries(dataset) -> list[str]:
    """The packing line of each whole-document dataset in `dataset` (itself, or a blend's components)."""
    parts = getattr(dataset, "datasets", [dataset])
    return [d.summary() for d in parts if isinstance(d, PackedDocumentsDataset)]


@dataclass(frozen=True)
class EpochPlan:
    """train_epochs with label datasets: each training path's samples per epoch (its documents packed once),
    the blend weights that serve each path once per epoch, and the steps for `epochs` epochs."""

    samples_per_epoch: tuple[int, ...]
    epochs: float
    global_batch: int

    @property
    def weights(self) -> list[float]:
        return [float(n) for n in self.samples_per_epoch]

    def train_iters(self) -> int:
        return max(1, math.ceil(self.epochs * sum(self.samples_per_epoch) / self.global_batch))

    def summary(self) -> str:
        total = sum(self.samples_per_epoch)
        return (f"train_epochs {self.epochs:g}: {total:,} packed samples per epoch, global batch {self.global_batch} "
                f"-> train_iters {self.train_iters()}")


def plan_label_epochs(cfg, global_batch: int, eod_id: int, boundary_id: int | None) -> EpochPlan:
    """EpochPlan for cfg.train_data_paths / train_label_data_paths under cfg.resolved_pack_impl."""
    counts = []
    for i, (prefix, label_prefix) in enumerate(zip(cfg.train_data_paths, cfg.train_label_data_paths)):
        dataset = PackedDocumentsDataset(IndexedDataset(prefix), f"train_{i}", 1, cfg.seq_length, cfg.seed,
                                         cfg.resolved_pack_impl, eod_id, labels=IndexedDataset(label_prefix),
                                         boundary_id=boundary_id, cache_dir=cfg.data_cache_dir)
        counts.append(dataset.stats.samples_per_epoch)
    return EpochPlan(tuple(counts), float(cfg.train_epochs), global_batch)
