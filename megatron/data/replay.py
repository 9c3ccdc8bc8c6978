"""Epoch-structured training samples with per-epoch replay of general text (the AstroSage CPT recipe).

The domain corpus (every document of `train_data_paths`, or the train split of `data_path`) is read in epochs.
Epoch e visits every domain document once, in an order shuffled by (seed, e); its documents are concatenated
and cut into ceil(T / L) windows of L + 1 tokens (T = domain tokens per epoch, L = seq_length; consecutive
windows share one token, as in GPTDataset), so every domain token is an input exactly once per epoch. The last
window of an epoch borrows the few tokens it lacks from the start of the next epoch's order. A fractional last
epoch takes ceil(frac * T / L) windows: a prefix of its shuffled order.

Each epoch adds R = round(D * f / (1 - f)) replay samples for D domain samples, so replay is `fraction` f of the
epoch's training tokens (to half a sample). Replay and domain samples are interleaved on an even (Bresenham)
schedule with a seeded phase: any run of n consecutive samples of an epoch holds n * R / (D + R) replay samples,
rounded down or up. Replay samples of an epoch are windows of that epoch's own replay documents, concatenated:
documents are taken in order from a seeded permutation of each replay pool (without replacement) until the
epoch's replay windows are covered. With `fresh_each_epoch` the next epoch continues that permutation, so epochs
get disjoint documents; when a pool runs out a new permutation starts (documents already drawn in the current
epoch go to its end, so an epoch repeats none unless the pool is smaller than one epoch's replay). Without it,
every epoch draws from the start of the same permutation. Several pools share the replay samples by weight
(tokens by default), blended evenly.

Within an epoch, domain windows and replay windows are each served in a shuffled order (so consecutive windows
of one long document do not land in one batch); epochs follow each other, so epoch e occupies a contiguous
range of sample indices and a resumed run (make_data_loader with consumed_samples) continues the same sequence.
The total is rounded up to a multiple of the global batch; the extra samples (< one batch) continue the plan
into the next epoch's prefix. The index arrays and the per-epoch summaries are cached like GPTDataset's.

Trainer integration: see docs/replay.md and `build_epoch_datasets`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron.data.blendable_dataset import build_blending_indices
from megatron.data.gpt_dataset import document_token_ranges, empty_data_message
from megatron.data.index_cache import ArrayCache, dataset_file_stats, load_or_build
from megatron.data.indexed_dataset import IndexedDataset

logger = logging.getLogger(__name__)

# Bump when the meaning of the cached arrays or summaries changes: old caches then stop matching.
FORMAT_VERSION = 1
_ARRAYS = ("pieces", "sample_index")
# Independent random streams: one purpose tag each, so e.g. the domain order of epoch 2 does not depend on how
# many replay pools there are.
_DOMAIN_ORDER, _PHASE, _DOMAIN_SHUFFLE, _POOL_PERMUTATION, _POOL_BLEND, _REPLAY_SHUFFLE = range(1, 7)
# Columns of `pieces`: one row per document occurrence in the concatenated streams.
_DATASET, _DOC, _START, _LENGTH = range(4)


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *tags])))


def replay_pattern(num_samples: int, num_replay: int, phase: int) -> np.ndarray:
    """Bool mask of the replay slots among `num_samples`: exactly `num_replay` of them, Bresenham-spaced, so
    any n consecutive slots hold floor or ceil of n * num_replay / num_samples replay slots."""
    if num_samples == 0:
        return np.zeros(0, dtype=bool)
    t = np.arange(num_samples + 1, dtype=np.int64)
    return np.diff((t * num_replay + phase) // num_samples) == 1


# ------------------------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class EpochSummary:
    """One epoch of the plan; samples [start_sample, end_sample) of the dataset."""

    epoch: int  # 0-based
    start_sample: int
    end_sample: int
    epoch_fraction: float  # domain windows of this epoch / those of a full epoch
    domain_samples: int
    replay_samples: int
    seq_length: int
    replay_documents: int  # distinct replay documents drawn for this epoch
    reused_replay_documents: int  # of those, documents drawn in an earlier epoch
    pool_restarts: tuple[str, ...] = ()  # pools whose permutation ran out (a new one started) in this epoch

    @property
    def complete(self) -> bool:
        return self.epoch_fraction >= 1.0

    @property
    def domain_tokens(self) -> int:
        return self.domain_samples * self.seq_length

    @property
    def replay_tokens(self) -> int:
        return self.replay_samples * self.seq_length

    @property
    def replay_fraction(self) -> float:
        total = self.domain_samples + self.replay_samples
        return self.replay_samples / total if total else 0.0

    def metrics(self) -> dict[str, float]:
        """Numbers for TensorBoard/wandb (log them under e.g. prefix "epoch")."""
        return {"epoch": self.epoch + 1, "domain_tokens": self.domain_tokens, "replay_tokens": self.replay_tokens,
                "replay_fraction": self.replay_fraction, "replay_documents": self.replay_documents,
                "reused_replay_documents": self.reused_replay_documents,
                "replay_pool_restarts": len(self.pool_restarts)}

    def format(self, num_epochs: int | None = None) -> str:
        of = f"/{num_epochs}" if num_epochs else ""
        part = "complete" if self.complete else f"{self.epoch_fraction:.3f} of an epoch"
        line = (f"epoch {self.epoch + 1}{of} ({part}) ended at sample {self.end_sample:,}: "
                f"domain {self.domain_tokens:,} tokens | replay {self.replay_tokens:,} tokens "
                f"({100 * self.replay_fraction:.2f}%) | {self.replay_documents:,} distinct replay documents, "
                f"{self.reused_replay_documents:,} reused from earlier epochs")
        for pool in self.pool_restarts:
            line += f" | replay pool {pool} exhausted: a new permutation started"
        return line

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pool_restarts"] = list(self.pool_restarts)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EpochSummary:
        return cls(**{**d, "pool_restarts": tuple(d["pool_restarts"])})


@dataclass(frozen=True)
class ReplayPlan:
    """What the dataset holds, epoch by epoch; the trainer derives train_iters and its epoch log from it."""

    total_samples: int  # len(dataset): a multiple of global_batch_size
    planned_samples: int  # exactly train_epochs of domain windows plus their replay, before rounding up
    global_batch_size: int
    seq_length: int
    train_epochs: float
    fraction: float
    fresh_each_epoch: bool
    domain_documents: int
    domain_tokens_per_epoch: int
    pools: tuple[dict[str, Any], ...]  # {"name", "prefix", "documents", "tokens", "weight"} per replay pool
    epochs: tuple[EpochSummary, ...]

    def train_iters(self, global_batch_size: int | None = None) -> int:
        """Optimizer steps that consume the plan: ceil(total_samples / global batch)."""
        return -(-self.total_samples // (global_batch_size or self.global_batch_size))

    def check_resume(self, consumed_samples: int, iteration: int, train_iters: int, global_batch_size: int
                     ) -> str | None:
        """For a run resumed at `iteration` with `consumed_samples` behind it: ValueError when the steps left
        (to train_iters, at this global batch) need more samples than the plan holds, a note when they end before
        it does, else None.

        Steps left normally need exactly the plan's rest. They need more or fewer when the checkpoint was saved
        with another global batch: the plan's length is fixed by train_epochs and train_iters by this global
        batch, so the steps left ask for consumed_samples - iteration x global batch samples more (or fewer) than
        the plan has. Raising train_epochs cannot make up for that (it raises train_iters too), and growing the
        plan would train more epochs than asked for, so a shortfall is refused."""
        remaining = max(0, train_iters - iteration)
        needed = consumed_samples + remaining * global_batch_size
        same_batch = consumed_samples == iteration * global_batch_size
        before = (f"{consumed_samples:,} samples in {iteration} steps (global batch "
                  f"{consumed_samples / max(1, iteration):g})")
        if needed > self.total_samples and same_batch:  # only when no step is left: a longer run's checkpoint
            raise ValueError(
                f"cannot resume: the checkpoint consumed {before}, past the end of this {self.train_epochs:g}-epoch "
                f"plan ({self.total_samples:,} samples). It was saved by a run with more epochs: resume with its "
                f"train_epochs.")
        if needed > self.total_samples:
            raise ValueError(
                f"cannot resume this {self.train_epochs:g}-epoch run with global batch {global_batch_size}: the "
                f"checkpoint consumed {before}, and the {remaining} steps left to train_iters {train_iters} need "
                f"{needed:,} samples in all, but the plan holds {self.total_samples:,}. Resume with the "
                f"checkpoint's global batch (with fewer data-parallel ranks, raise gradient_accumulation_steps to "
                f"keep it).")
        if needed < self.total_samples and not same_batch:
            return (f"note: resumed with global batch {global_batch_size} after {before}: train_iters "
                    f"{train_iters} ends at sample {needed:,}, so the last {self.total_samples - needed:,} samples of "
                    f"the {self.total_samples:,}-sample plan are not trained (resume with the checkpoint's global "
                    f"batch to train them)")
        return None

    def epoch_at(self, sample: int) -> EpochSummary:
        for summary in self.epochs:
            if sample < summary.end_sample:
                return summary
        return self.epochs[-1]

    def completed_between(self, previous_consumed: int, consumed: int) -> list[EpochSummary]:
        """Epochs whose last sample lies in (previous_consumed, consumed]."""
        return [s for s in self.epochs if previous_consumed < s.end_sample <= consumed]

    def boundary_messages(self, previous_consumed: int, consumed: int) -> list[str]:
        """Log lines for the epochs that ended in (previous_consumed, consumed]; call once per step."""
        return [s.format(len(self.epochs)) for s in self.completed_between(previous_consumed, consumed)]

    def summary_lines(self) -> list[str]:
        """What will be trained, for the log at start-up."""
        lines = [f"epoch plan: {self.train_epochs:g} epochs over {self.domain_documents:,} domain documents "
                 f"({self.domain_tokens_per_epoch:,} tokens per epoch)"
                 + (f", {100 * self.fraction:g}% replay per epoch "
                    f"({'fresh documents each epoch' if self.fresh_each_epoch else 'the same documents each epoch'})"
                    if self.pools else "")]
        for pool in self.pools:
            lines.append(f"  replay pool {pool['name']}: {pool['documents']:,} documents, {pool['tokens']:,} tokens, "
                         f"weight {pool['weight']:.4g}")
        rounded = self.total_samples - self.planned_samples
        lines.append(f"  {self.total_samples:,} samples = {self.train_iters()} steps of {self.global_batch_size}"
                     + (f" ({rounded} more than {self.train_epochs:g} epochs: rounded up to whole steps)"
                        if rounded else ""))
        for s in self.epochs:
            restarts = "".join(f"; pool {p} runs out and restarts" for p in s.pool_restarts)
            lines.append(f"  epoch {s.epoch + 1}: samples [{s.start_sample:,}, {s.end_sample:,}) "
                         f"{s.epoch_fraction:.3f} epoch, {s.domain_samples:,} domain + {s.replay_samples:,} replay "
                         f"({100 * s.replay_fraction:.2f}%), {s.replay_documents:,} replay documents "
                         f"({s.reused_replay_documents:,} reused){restarts}")
        return lines

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pools"] = [dict(p) for p in self.pools]
        d["epochs"] = [s.to_json() for s in self.epochs]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReplayPlan:
        return cls(**{**d, "pools": tuple(d["pools"]), "epochs": tuple(EpochSummary.from_json(s) for s in d["epochs"])})


# ------------------------------------------------------------------------------------------------- the index


class _PoolDrawer:
    """Documents of one replay pool, taken in order from seeded permutations, a new one when one runs out."""

    def __init__(self, lengths: np.ndarray, seed: int, pool: int) -> None:
        self.lengths = lengths  # of the pool's non-empty documents
        self.mean = float(lengths.mean())
        self.seed, self.pool = seed, pool
        self.reset()

    def reset(self) -> None:
        self.generation = 0
        self.order = self._permutation(0)
        self.cursor = 0

    def _permutation(self, generation: int) -> np.ndarray:
        return _rng(self.seed, _POOL_PERMUTATION, self.pool, generation).permutation(len(self.lengths))

    def draw(self, tokens: int) -> tuple[np.ndarray, int]:
        """Documents (indices into `lengths`) holding at least `tokens` tokens, and how many permutations
        ran out on the way."""
        taken: list[np.ndarray] = []
        restarts = 0
        while tokens > 0:
            rest = self.order[self.cursor :]
            # Cumulate only as far as needed: a pool may hold far more documents than one epoch uses.
            size = min(len(rest), int(tokens / self.mean * 1.25) + 64)
            while True:
                cum = np.cumsum(self.lengths[rest[:size]])
                if size == len(rest) or cum[-1] >= tokens:
                    break
                size = min(len(rest), 2 * size)
            n = int(np.searchsorted(cum, tokens, side="left")) + 1 if len(cum) else 1
            if n <= len(cum):
                taken.append(rest[:n])
                self.cursor += n
                break
            if len(rest):
                taken.append(rest)
                tokens -= int(cum[-1])
            self.generation += 1
            restarts += 1
            order = self._permutation(self.generation)
            if taken:  # what this epoch already has goes last, so the epoch repeats nothing while it can
                in_epoch = np.zeros(len(self.lengths), dtype=bool)
                in_epoch[np.concatenate(taken)] = True
                order = np.concatenate([order[~in_epoch[order]], order[in_epoch[order]]])
            self.order, self.cursor = order, 0
        return (np.concatenate(taken) if taken else np.zeros(0, np.int64)), restarts


def _windows(starts: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(piece, offset) of each token position in a concatenation whose pieces start at `starts`."""
    # side="right" then -1: the last piece starting at or before the position, which skips empty pieces.
    piece = np.searchsorted(starts, positions, side="right") - 1
    return np.stack([piece, positions - starts[piece]], axis=1)


def build_epoch_indices(
    domain: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    pools: Sequence[tuple[np.ndarray, np.ndarray]],
    pool_weights: Sequence[float],
    pool_names: Sequence[str],
    fraction: float,
    train_epochs: float,
    seq_length: int,
    seed: int,
    fresh_each_epoch: bool = True,
    global_batch_size: int = 1,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The index arrays and the plan (as JSON) for the dataset of the module docstring.

    domain: (doc_starts, doc_lengths, document_ids) per domain source; pools: (doc_starts, doc_lengths) per replay
    pool. Dataset numbers in `pieces` are the domain sources first, then the pools.

    pieces[k]       = (dataset, document, token start in the dataset's .bin, length): the k-th document of the
                      concatenated streams (the domain epochs back to back, then each pool's per-epoch draws)
    sample_index[i] = (k, offset): sample i is L + 1 tokens from token `offset` of piece k onwards
    """
    L = seq_length
    if not 0 <= fraction < 1:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    if bool(pools) != (fraction > 0):
        raise ValueError("replay needs both data paths and a fraction > 0 (or neither)")
    if train_epochs <= 0 or L <= 0 or global_batch_size <= 0:
        raise ValueError(f"train_epochs ({train_epochs}), seq_length ({L}) and global batch ({global_batch_size}) "
                         "must be positive")

    # ---- the domain: one table over all sources
    dom_dataset = np.concatenate([np.full(len(ids), s, np.int64) for s, (_, _, ids) in enumerate(domain)])
    dom_doc = np.concatenate([ids.astype(np.int64) for _, _, ids in domain])
    dom_start = np.concatenate([starts[ids] for starts, _, ids in domain])
    dom_len = np.concatenate([lengths[ids] for _, lengths, ids in domain])
    T = int(dom_len.sum())
    if T == 0:
        raise ValueError("the training documents contain no tokens")

    # ---- how many samples each epoch gets
    nd_full = -(-T // L)
    nr_full = round(nd_full * fraction / (1 - fraction))
    n_full = nd_full + nr_full
    full_epochs = math.floor(train_epochs + 1e-9)
    frac = max(0.0, train_epochs - full_epochs)
    nd_last = min(nd_full, math.ceil(frac * T / L - 1e-9)) if frac > 1e-9 else 0
    phases = {}

    def pattern(e: int) -> np.ndarray:
        if e not in phases:
            phases[e] = int(_rng(seed, _PHASE, e).integers(n_full))
        return replay_pattern(n_full, nr_full, phases[e])

    w = np.asarray(pool_weights, dtype=np.float64)
    for name, (_, lengths), share in zip(pool_names, pools, w / max(w.sum(), 1e-300)):
        if nr_full * share * L > lengths.sum():
            logger.warning("replay pool %s (%d tokens) is smaller than its share of one epoch's replay (%d tokens): "
                           "its documents repeat within an epoch", name, lengths.sum(), nr_full * share * L)

    planned = full_epochs * n_full
    if nd_last:  # the prefix of the pattern up to and including the nd_last-th domain sample
        planned += int(np.flatnonzero(~pattern(full_epochs))[nd_last - 1]) + 1
    total = -(-planned // global_batch_size) * global_batch_size
    epoch_lengths = [n_full] * (total // n_full) + ([total % n_full] if total % n_full else [])

    # ---- domain stream: epoch permutations back to back (epoch e starts at token e*T)
    slots = [pattern(e)[:m] for e, m in enumerate(epoch_lengths)]
    domain_counts = [int(np.count_nonzero(~s)) for s in slots]
    stream_end = max(e * T + nd * L + 1 for e, nd in enumerate(domain_counts))
    perms = [_rng(seed, _DOMAIN_ORDER, e).permutation(len(dom_len)) for e in range(-(-stream_end // T))]
    order = np.concatenate(perms)
    starts = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(dom_len[order], out=starts[1:])
    order = order[: int(np.searchsorted(starts, stream_end - 1, side="right"))]  # the prefix samples reach
    pieces = [np.stack([dom_dataset[order], dom_doc[order], dom_start[order], dom_len[order]], axis=1)]
    num_pieces = len(order)
    starts = starts[: len(order)]

    sample_index = np.zeros((total, 2), dtype=np.int64)
    drawers = [_PoolDrawer(lengths[lengths > 0], seed, p) for p, (_, lengths) in enumerate(pools)]
    pool_ids = [np.flatnonzero(lengths > 0) for _, lengths in pools]
    seen = [np.zeros(len(ids), dtype=bool) for ids in pool_ids]
    summaries = []
    first = 0
    for e, slot in enumerate(slots):
        dom_slots, rep_slots = np.flatnonzero(~slot), np.flatnonzero(slot)
        nd = len(dom_slots)
        windows = _rng(seed, _DOMAIN_SHUFFLE, e).permutation(nd).astype(np.int64)
        sample_index[first + dom_slots] = _windows(starts, e * T + windows * L)

        distinct = reused = 0
        restarted = []
        if len(rep_slots):
            blend_seed = int(_rng(seed, _POOL_BLEND, e).integers(2**62))
            owner, rank = build_blending_indices(w, len(rep_slots), blend_seed)
            for p, drawer in enumerate(drawers):
                mine = owner == p
                k = int(np.count_nonzero(mine))
                if k == 0:
                    continue
                if not fresh_each_epoch:
                    drawer.reset()
                drawn, restarts = drawer.draw(k * L + 1)
                if restarts:
                    restarted.append(pool_names[p])
                    logger.info("replay pool %s exhausted in epoch %d: a new permutation started", pool_names[p],
                                e + 1)
                unique = np.unique(drawn)
                distinct += len(unique)
                reused += int(np.count_nonzero(seen[p][unique]))
                seen[p][unique] = True
                starts_p, lengths_p = pools[p]
                docs = pool_ids[p][drawn]
                section = np.stack([np.full(len(docs), len(domain) + p, np.int64), docs, starts_p[docs],
                                    lengths_p[docs]], axis=1)
                section_starts = np.zeros(len(docs), dtype=np.int64)
                np.cumsum(section[:-1, _LENGTH], out=section_starts[1:])
                shuffled = _rng(seed, _REPLAY_SHUFFLE, p, e).permutation(k).astype(np.int64)
                local = _windows(section_starts, shuffled[rank[mine]] * L)
                local[:, 0] += num_pieces
                sample_index[first + rep_slots[mine]] = local
                pieces.append(section)
                num_pieces += len(docs)
        summaries.append(EpochSummary(
            epoch=e, start_sample=first, end_sample=first + len(slot), epoch_fraction=nd / nd_full,
            domain_samples=nd, replay_samples=len(rep_slots), seq_length=L, replay_documents=distinct,
            reused_replay_documents=reused, pool_restarts=tuple(restarted)))
        first += len(slot)

    plan = ReplayPlan(
        total_samples=total, planned_samples=planned, global_batch_size=global_batch_size, seq_length=L,
        train_epochs=float(train_epochs), fraction=float(fraction), fresh_each_epoch=fresh_each_epoch,
        domain_documents=len(dom_len), domain_tokens_per_epoch=T,
        pools=tuple({"name": name, "documents": int(len(ids)), "tokens": int(lengths.sum()), "weight": float(wp)}
                    for name, ids, (_, lengths), wp in zip(pool_names, pool_ids, pools, w / max(w.sum(), 1e-300))),
        epochs=tuple(summaries),
    )
    return {"pieces": np.concatenate(pieces).astype(np.int64), "sample_index": sample_index}, plan.to_json()


# ------------------------------------------------------------------------------------------------- the dataset


class EpochReplayDataset:
    """Sample i is {"tokens": int64[seq_length + 1]} (GPTDataset's format), laid out by a ReplayPlan."""

    def __init__(self, datasets: Sequence[IndexedDataset], num_domain_sources: int, pieces: np.ndarray,
                 sample_index: np.ndarray, seq_length: int, name: str = "train") -> None:
        self.datasets = list(datasets)
        self.num_domain_sources = num_domain_sources
        self.pieces = pieces
        self.sample_index = sample_index
        self.seq_length = seq_length
        self.name = name

    def __len__(self) -> int:
        return len(self.sample_index)

    def sample_sources(self) -> np.ndarray:
        """Dataset number of every sample (domain sources first, then replay pools)."""
        return np.asarray(self.pieces[np.asarray(self.sample_index[:, 0]), _DATASET])

    def is_replay(self) -> np.ndarray:
        return self.sample_sources() >= self.num_domain_sources

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = len(self.sample_index)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.name} ({n} samples)")
        k, offset = (int(v) for v in self.sample_index[i])
        needed = self.seq_length + 1
        out = []
        while needed > 0:
            dataset, _, start, length = (int(v) for v in self.pieces[k])
            take = min(needed, length - offset)
            out.append(self.datasets[dataset].tokens[start + offset : start + offset + take])
            needed -= take
            k += 1
            offset = 0
        return {"tokens": np.concatenate(out).astype(np.int64)}


def _pool_name(prefix: str) -> str:
    return prefix.rstrip("/").rsplit("/", 1)[-1]


def build_replay_train_dataset(
    *,
    train_data_paths: Sequence[str] | None = None,
    data_path: str | None = None,
    split: str = "969,30,1",
    replay_data_paths: Sequence[str] | None = None,
    replay_data_weights: Sequence[float] | None = None,
    fraction: float = 0.0,
    fresh_each_epoch: bool = True,
    train_epochs: float,
    seq_length: int,
    seed: int,
    global_batch_size: int = 1,
    cache_dir: str | None = None,
    name: str = "train",
) -> tuple[EpochReplayDataset, ReplayPlan]:
    """The training dataset for `train_epochs` epochs of the domain corpus with per-epoch replay, and its plan.

    The domain corpus is every document of `train_data_paths` (several sources form one epoch; weights do not
    apply: list a path twice to see its documents twice per epoch) or the train split of `data_path`. Without
    replay paths (fraction 0) this is plain epoch-based training. len(dataset) == plan.total_samples, a multiple
    of `global_batch_size`; train for plan.train_iters() steps.
    """
    from megatron.data.data_utils import split_document_ranges

    if bool(train_data_paths) == bool(data_path):
        raise ValueError("give the domain corpus as train_data_paths or as data_path (+ split), one of them")
    replay_data_paths = list(replay_data_paths or [])
    if replay_data_weights is not None and len(replay_data_weights) != len(replay_data_paths):
        raise ValueError(f"{len(replay_data_paths)} replay data paths but {len(replay_data_weights)} weights")

    if data_path:
        indexed = IndexedDataset(data_path)
        begin, end = split_document_ranges(indexed.num_documents, split)[0]
        sources = [(indexed, np.arange(begin, end, dtype=np.int64))]
    else:
        sources = [(ix, np.arange(ix.num_documents, dtype=np.int64))
                   for ix in (IndexedDataset(p) for p in train_data_paths)]
    pools = [IndexedDataset(p) for p in replay_data_paths]  # FileNotFoundError names a missing prefix

    description = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "domain": [{**dataset_file_stats(ix.prefix), "num_document_ids": len(ids),
                    "document_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
                   for ix, ids in sources],
        "pools": [dataset_file_stats(ix.prefix) for ix in pools],
        "pool_weights": None if replay_data_weights is None else [float(x) for x in replay_data_weights],
        "fraction": float(fraction),
        "fresh_each_epoch": bool(fresh_each_epoch),
        "train_epochs": float(train_epochs),
        "seq_length": seq_length,
        "seed": seed,
        "global_batch_size": global_batch_size,
    }
    cache = ArrayCache(cache_dir if cache_dir is not None else sources[0][0].prefix + "_cache",
                       f"{name}_epochs", description, _ARRAYS)

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        domain = [(*document_token_ranges(ix), ids) for ix, ids in sources]
        if not any(lengths[ids].any() for _, lengths, ids in domain):
            raise ValueError(empty_data_message(
                name, [ix for ix, _ in sources], sum(len(ids) for _, ids in sources) if data_path else None))
        pool_ranges = [document_token_ranges(ix) for ix in pools]
        for pool, (_, lengths) in zip(pools, pool_ranges):
            if lengths.sum() == 0:
                raise ValueError("replay pool " + empty_data_message(_pool_name(pool.prefix), [pool]))
        weights = (list(replay_data_weights) if replay_data_weights is not None
                   else [float(lengths.sum()) for _, lengths in pool_ranges])  # by size
        return build_epoch_indices(domain, pool_ranges, weights, [_pool_name(p) for p in replay_data_paths],
                                   fraction, train_epochs, seq_length, seed, fresh_each_epoch, global_batch_size)

    arrays, plan_json = load_or_build(cache, build, f"{name} (epochs with replay)")
    plan = ReplayPlan.from_json(plan_json)
    dataset = EpochReplayDataset([ix for ix, _ in sources] + pools, len(sources), arrays["pieces"],
                                 arrays["sample_index"], seq_length, name)
    return dataset, plan


def build_replay_valid_dataset(
    *,
    valid_data_paths: Sequence[str],
    valid_data_weights: Sequence[float] | None = None,
    seq_length: int,
    seed: int,
    num_samples: int,
    cache_dir: str | None = None,
):
    """Held-out general text for the separate replay validation loss: the same GPTDataset/BlendableDataset as
    any validation split, under its own name so its cache files do not mix with the domain validation set."""
    from megatron.data.data_utils import _blend

    return _blend(list(valid_data_paths), valid_data_weights, "valid_replay", num_samples, seq_length, seed,
                  cache_dir)


@dataclass
class EpochData:
    train: EpochReplayDataset
    plan: ReplayPlan
    replay_valid: Any | None  # GPTDataset/BlendableDataset, or None without replay.valid_data_paths


def build_epoch_datasets(cfg: Any, global_batch_size: int, replay_valid_num_samples: int = 0) -> EpochData:
    """From a NeoXConfig with train_epochs set (and optionally replay): the training dataset, its plan and the
    replay validation dataset. Call on every rank (rank 0 builds the cache while the others wait)."""
    if cfg.train_epochs is None:
        raise ValueError("build_epoch_datasets needs train_epochs")
    replay = cfg.replay
    train, plan = build_replay_train_dataset(
        train_data_paths=cfg.train_data_paths, data_path=None if cfg.train_data_paths else cfg.data_path,
        split=cfg.split, replay_data_paths=replay.data_paths if replay else None,
        replay_data_weights=replay.data_weights if replay else None, fraction=replay.fraction if replay else 0.0,
        fresh_each_epoch=replay.fresh_each_epoch if replay else True, train_epochs=cfg.train_epochs,
        seq_length=cfg.seq_length, seed=cfg.seed, global_batch_size=global_batch_size, cache_dir=cfg.data_cache_dir,
    )
    replay_valid = None
    if replay is not None and replay.valid_data_paths and replay_valid_num_samples > 0:
        replay_valid = build_replay_valid_dataset(
            valid_data_paths=replay.valid_data_paths, valid_data_weights=replay.valid_data_weights,
            seq_length=cfg.seq_length, seed=cfg.seed, num_samples=replay_valid_num_samples,
            cache_dir=cfg.data_cache_dir)
    return EpochData(train, plan, replay_valid)
