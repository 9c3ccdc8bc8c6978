"""Build train/valid/test datasets from indexed-dataset prefixes, and the data-parallel loader."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from megatron.data.blendable_dataset import BlendableDataset, build_blending_indices
from megatron.data.gpt_dataset import GPTDataset, empty_data_message
from megatron.data.indexed_dataset import IndexedDataset

# Megatron's margin: each blended component gets 0.5% more samples than its share. It no longer decides whether a
# component is large enough (see _blend), but it keeps the component sizes, and so the samples and cached indices,
# of every blend that built before.
_BLEND_MARGIN = 1.005
_SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """'949,50,1' (or '0.9,0.1' or '98/2/0') → three fractions summing to 1."""
    parts = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"split must be up to three non-negative numbers, got {split!r}")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges for train/valid/test, as Megatron cuts them."""
    bounds = [0]
    for fraction in parse_split(split):
        bounds.append(bounds[-1] + int(round(fraction * num_documents)))
    # Rounding may leave the last bound off by one: move every later bound so the ranges end exactly at N.
    diff = bounds[-1] - num_documents
    bounds = [b - diff if i > 0 else b for i, b in enumerate(bounds)]
    bounds = [min(max(b, 0), num_documents) for b in bounds]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def _has_tokens(indexed: IndexedDataset, document_ids: np.ndarray) -> bool:
    """Whether the documents hold at least one token (a split made only of empty documents yields None)."""
    bounds = indexed.document_indices
    return bool(indexed.sequence_lengths[bounds[document_ids[0]] : bounds[document_ids[-1] + 1]].sum() > 0)


@dataclass(frozen=True)
class Packing:
    """pack_impl (megatron/data/packing.py) and the token ids the whole-document modes need."""

    impl: str = "packed"
    eod_id: int | None = None  # pads samples and ends documents
    boundary_id: int | None = None  # end of a message (<|eot_id|>): where an over-long conversation is cut


def _dataset(indexed: IndexedDataset, name: str, num_samples: int, seq_length: int, seed: int,
             cache_dir: str | None, labels: IndexedDataset | None, packing: Packing,
             document_ids: np.ndarray | None = None) -> Any:
    if packing.impl == "packed":
        return GPTDataset(indexed, name, num_samples, seq_length, seed, document_ids=document_ids,
                          cache_dir=cache_dir, labels=labels)
    from megatron.data.packing import PackedDocumentsDataset

    if packing.eod_id is None:
        raise ValueError(f"pack_impl {packing.impl} pads with the EOD token: give the tokenizer's eod_id")
    return PackedDocumentsDataset(indexed, name, num_samples, seq_length, seed, packing.impl, packing.eod_id,
                                  document_ids=document_ids, labels=labels, boundary_id=packing.boundary_id,
                                  cache_dir=cache_dir)


def _blend(
    prefixes: Sequence[str],
    weights: Sequence[float] | None,
    split_name: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    cache_dir: str | None,
    label_prefixes: Sequence[str] | None = None,
    packing: Packing = Packing(),
) -> GPTDataset | BlendableDataset:
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(prefixes)
    if len(weights) != len(prefixes):
        raise ValueError(f"{split_name}: {len(prefixes)} data paths but {len(weights)} weights")
    if label_prefixes is not None and len(label_prefixes) != len(prefixes):
        raise ValueError(f"{split_name}: {len(prefixes)} data paths but {len(label_prefixes)} label data paths")
    labels = [IndexedDataset(p) for p in label_prefixes] if label_prefixes else [None] * len(prefixes)
    if len(prefixes) == 1:
        return _dataset(IndexedDataset(prefixes[0]), f"{split_name}_0", num_samples, seq_length, seed, cache_dir,
                        labels[0], packing)
    total = float(sum(weights))
    # The blend first, then each component sized to hold what the blend takes from it: the margin alone can fall
    # short, because the even merge may take ceil(n * w) + 1 samples from a component whose 0.5% of n * w is
    # under one sample (weights [0.15, 0.65, 0.2], 32 samples: 22 from the second, margin size 21).
    indices = build_blending_indices(weights, num_samples, seed)
    taken = np.bincount(indices[0], minlength=len(prefixes))
    components = [
        _dataset(
            IndexedDataset(prefix),
            f"{split_name}_{i}",
            max(1, math.ceil(num_samples * w / total * _BLEND_MARGIN), int(taken[i])),
            seq_length,
            seed,
            cache_dir,
            label,
            packing,
        )
        for i, (prefix, w, label) in enumerate(zip(prefixes, weights, labels))
    ]
    return BlendableDataset(components, weights, num_samples, seed, indices=indices)


def build_train_valid_test_datasets(
    *,
    train_data_paths: Sequence[str] | None = None,
    train_data_weights: Sequence[float] | None = None,
    valid_data_paths: Sequence[str] | None = None,
    valid_data_weights: Sequence[float] | None = None,
    test_data_paths: Sequence[str] | None = None,
    test_data_weights: Sequence[float] | None = None,
    train_label_data_paths: Sequence[str] | None = None,
    valid_label_data_paths: Sequence[str] | None = None,
    test_label_data_paths: Sequence[str] | None = None,
    data_path: str | None = None,
    split: str = "969,30,1",
    seq_length: int,
    seed: int,
    train_num_samples: int,
    valid_num_samples: int = 0,
    test_num_samples: int = 0,
    cache_dir: str | None = None,
    packing: Packing = Packing(),
) -> tuple[Any | None, Any | None, Any | None]:
    """(train, valid, test) datasets; a split with no data or no requested samples is None.

    Either `data_path` (one corpus, cut into contiguous document ranges by `split`) or `*_data_paths` (separate
    corpora per split, blended by `*_data_weights`, equal by default), the latter optionally with
    `*_label_data_paths` (one label dataset per data path: samples then carry "labels" beside "tokens").
    """
    num_samples = (train_num_samples, valid_num_samples, test_num_samples)
    label_paths = (train_label_data_paths, valid_label_data_paths, test_label_data_paths)
    if data_path is not None:
        if any(label_paths):
            raise ValueError("label data paths go with train/valid/test_data_paths, not with data_path")
        if train_data_paths or valid_data_paths or test_data_paths:
            raise ValueError("give either data_path (with split) or train/valid/test_data_paths, not both")
        indexed = IndexedDataset(data_path)
        ranges = split_document_ranges(indexed.num_documents, split)
        out = []
        for name, (start, end), n in zip(_SPLIT_NAMES, ranges, num_samples):
            ids = np.arange(start, end, dtype=np.int64)
            has_tokens = end > start and _has_tokens(indexed, ids)
            if name == "train" and n > 0 and not has_tokens:  # None would only fail later, without a reason
                raise ValueError(empty_data_message(f"train split {split!r} (documents [{start}, {end}))",
                                                    [indexed], len(ids)))
            out.append(
                _dataset(indexed, name, n, seq_length, seed, cache_dir, None, packing, document_ids=ids)
                if n > 0 and has_tokens
                else None
            )
        return out[0], out[1], out[2]

    paths = (train_data_paths, valid_data_paths, test_data_paths)
    if not train_data_paths:
        raise ValueError("no training data: set data_path or train_data_paths")
    weights = (train_data_weights, valid_data_weights, test_data_weights)
    out = [
        _blend(list(p), w, name, n, seq_length, seed, cache_dir, labels, packing) if p and n > 0 else None
        for name, p, w, n, labels in zip(_SPLIT_NAMES, paths, weights, num_samples, label_paths)
    ]
    return out[0], out[1], out[2]


def train_samples_needed(train_iters: int, iteration: int, consumed_samples: int, global_batch_size: int) -> int:
    """Training samples a run at `iteration` with `consumed_samples` behind it needs to reach `train_iters`.

    A fresh run, or one resumed with the global batch it was saved with, needs train_iters x global batch. A run
    resumed with another global batch consumed its first `iteration` steps at the old one, so it needs what it
    consumed plus its remaining steps at the new one: more than train_iters x global batch when the batch got
    smaller. Never less than a fresh run's count, so a resumed run with an unchanged or larger batch builds the
    same dataset (and cache) as a fresh one."""
    remaining = max(0, train_iters - iteration)
    return max(train_iters * global_batch_size, consumed_samples + remaining * global_batch_size)


class MicroBatchSampler(Sampler[list[int]]):
    """Index lists for one data-parallel rank: global micro-batch b covers samples
    [c + b*M*R, c + (b+1)*M*R) for c = consumed_samples, M = micro batch, R = dp size; rank r takes the r-th
    block of M. Deterministic and resumable: restart with the consumed_samples of the checkpoint."""

    def __init__(
        self, total_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        if micro_batch_size <= 0 or dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler setup: micro_batch_size={micro_batch_size} dp={dp_rank}/{dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if consumed_samples > total_samples:
            # An empty loader here would leave a trainer with steps to run and no data for them.
            raise ValueError(
                f"consumed_samples {consumed_samples:,} is past the end of the dataset ({total_samples:,} samples; "
                f"global micro-batch {micro_batch_size} x {dp_size} data-parallel ranks). The checkpoint has "
                f"consumed more samples than this dataset was built for, as when a run is resumed with a smaller "
                f"global batch than it was saved with: build the dataset for consumed_samples + remaining steps x "
                f"global batch (train_samples_needed), or resume with the checkpoint's global batch.")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.global_micro_batch = micro_batch_size * dp_size

    def __len__(self) -> int:
        return max(0, (self.total_samples - self.consumed_samples) // self.global_micro_batch)

    def __iter__(self) -> Iterator[list[int]]:
        first = self.dp_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples - self.global_micro_batch + 1,
                           self.global_micro_batch):
            yield list(range(start + first, start + first + self.micro_batch_size))


class DataExhaustedError(RuntimeError):
    """A data loader ran out before the run's last step (the trainer never restarts one: see _lm_batches)."""

    @classmethod
    def for_loader(cls, loader: Any, served: int) -> DataExhaustedError:
        sampler = getattr(loader, "batch_sampler", None)
        where = f"after {served} micro-batches"
        if isinstance(sampler, MicroBatchSampler):
            end = sampler.consumed_samples + served * sampler.global_micro_batch
            where = (f"at sample {end:,} of a dataset of {sampler.total_samples:,} samples (this loader started at "
                     f"consumed_samples {sampler.consumed_samples:,})")
        return cls(
            f"the data ran out {where}, but the run asked for another batch: it needs more samples than its "
            f"dataset was built for. A run resumed with another global batch than it was saved with needs "
            f"consumed_samples + (train_iters - iteration) x global batch (train_samples_needed); resume with the "
            f"checkpoint's global batch (with fewer data-parallel ranks, raise gradient_accumulation_steps to keep "
            f"it), or build the dataset for that many samples.")


def collate_tokens(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stacks each field of the samples ("tokens", and "labels" with label datasets)."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])).long() for key in samples[0]}


def make_data_loader(
    dataset: Any,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader yielding {"tokens": LongTensor[micro_batch_size, seq_length + 1]} (and "labels" alike, with
    label datasets) for this DP rank."""
    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_tokens)
