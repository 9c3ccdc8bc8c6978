"""Epochs with per-epoch replay (megatron/data/replay.py, docs/replay.md).

Every token id in these corpora is unique and says where it comes from: corpus by range, document by a gap of one
unused id between documents. So most checks read the served samples themselves, not the index arrays.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from data_helpers import run_two_gloo_ranks

from megatron.config import build_config
from megatron.data import replay as replay_mod
from megatron.data.data_utils import make_data_loader
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import IndexedDatasetWriter
from megatron.data.replay import build_replay_train_dataset, build_replay_valid_dataset

L = 8
REPLAY_BASE = 1_000_000  # domain ids lie below, replay ids above


class Corpus:
    """Documents of unique ids: document d is base_d, base_d + 1, ...; one unused id between documents."""

    def __init__(self, prefix, base, n_docs, seed, max_len, empty=()):
        rng = np.random.default_rng(seed)
        lengths = rng.integers(1, max_len, n_docs)
        lengths[list(empty)] = 0
        self.bases = base + np.concatenate([[0], np.cumsum(lengths[:-1] + 1)])
        self.lengths = lengths
        self.prefix = prefix
        with IndexedDatasetWriter(prefix, np.int32) as w:
            for b, n in zip(self.bases, lengths):
                w.add_document(np.arange(b, b + n, dtype=np.int32))
            w.finalize()
        self.lo, self.hi = base, int(self.bases[-1] + lengths[-1])

    def owns(self, tokens):
        return (tokens >= self.lo) & (tokens < self.hi)

    def doc_of(self, tokens):
        return np.searchsorted(self.bases, tokens, side="right") - 1

    @property
    def tokens(self):
        return np.concatenate([np.arange(b, b + n) for b, n in zip(self.bases, self.lengths)])


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    return {
        # Two domain sources (one epoch covers both), with empty documents and a document longer than a sample.
        "a": Corpus(str(d / "a"), 1, 150, seed=1, max_len=70, empty=(3, 40)),
        "b": Corpus(str(d / "b"), 500_000, 80, seed=2, max_len=40),
        "pool": Corpus(str(d / "pool"), REPLAY_BASE, 1500, seed=3, max_len=40, empty=(7,)),  # ~10 epochs of replay
        "small": Corpus(str(d / "small"), 2_000_000, 60, seed=4, max_len=40),  # runs out in epoch 2
        "pool2": Corpus(str(d / "pool2"), 3_000_000, 800, seed=5, max_len=40),
        "valid": Corpus(str(d / "valid"), 4_000_000, 50, seed=6, max_len=40),
        "dir": d,
    }


def build(corpora, tmp_path, pools=("pool",), domain=("a", "b"), **kw):
    args = dict(train_data_paths=[corpora[k].prefix for k in domain],
                replay_data_paths=[corpora[k].prefix for k in pools], fraction=0.1, train_epochs=2.5,
                seq_length=L, seed=7, cache_dir=str(tmp_path / "cache"))
    args.update(kw)
    return build_replay_train_dataset(**args)


def all_samples(ds):
    return np.stack([ds[i]["tokens"] for i in range(len(ds))])


def domain_stream(ds, samples, summary, T):
    """Epoch `summary`'s domain windows, ordered by the position the index gives them, checked to be consecutive
    windows of one stream (each starts where the previous ended), and that stream."""
    lengths = np.asarray(ds.pieces[:, 3])
    piece_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    idx = np.arange(summary.start_sample, summary.end_sample)
    idx = idx[samples[idx, 0] < REPLAY_BASE]
    k, off = np.asarray(ds.sample_index[idx]).T
    positions = piece_starts[k] + off - summary.epoch * T
    order = np.argsort(positions)
    assert np.array_equal(positions[order], np.arange(len(idx)) * L)  # windows tile the epoch from its start
    windows = samples[idx[order]]
    assert np.array_equal(windows[1:, 0], windows[:-1, -1])  # consecutive windows share one token
    return np.concatenate([windows[:, :-1].reshape(-1), windows[-1:, -1]])


def doc_runs(stream, corpora):
    """(corpus name, doc) of each maximal run of consecutive ids, and whether each run is a whole document."""
    breaks = np.flatnonzero(np.diff(stream) != 1) + 1
    runs = []
    for run in np.split(stream, breaks):
        name = next(n for n in ("a", "b") if corpora[n].owns(run[:1])[0])
        c = corpora[name]
        doc = int(c.doc_of(run[:1])[0])
        runs.append((name, doc, run[0] == c.bases[doc], len(run) == c.lengths[doc]))
    return runs


def test_every_domain_document_once_per_epoch_reshuffled_and_fractional_prefix(corpora, tmp_path):
    ds, plan = build(corpora, tmp_path)
    samples = all_samples(ds)
    T = int(corpora["a"].lengths.sum() + corpora["b"].lengths.sum())
    assert plan.domain_tokens_per_epoch == T and len(plan.epochs) == 3
    non_empty = {("a", d) for d in np.flatnonzero(corpora["a"].lengths)} | {("b", d) for d in range(80)}
    orders = []
    for s in plan.epochs[:2]:
        assert s.complete and s.domain_samples == -(-T // L)
        stream = domain_stream(ds, samples, s, T)
        runs = doc_runs(stream[:T], corpora)
        # Each document exactly once, whole and in its own token order; every domain token once as an input.
        assert all(start and whole for _, _, start, whole in runs)
        assert {(n, d) for n, d, _, _ in runs} == non_empty and len(runs) == len(non_empty)
        assert np.array_equal(np.sort(stream[:T]), np.sort(np.concatenate([corpora["a"].tokens,
                                                                            corpora["b"].tokens])))
        orders.append([(n, d) for n, d, _, _ in runs])
    assert orders[0] != orders[1]  # reshuffled per epoch
    assert sum(a == b for a, b in zip(orders[0], orders[1])) < len(orders[0]) // 4

    # The half epoch is a prefix of epoch 3's shuffled order: the same tokens a 3-epoch run starts epoch 3 with.
    last = plan.epochs[2]
    assert not last.complete and last.domain_samples == -(-T // 2 // L)
    partial = domain_stream(ds, samples, last, T)
    ds3, plan3 = build(corpora, tmp_path, train_epochs=3.0)
    full3 = domain_stream(ds3, all_samples(ds3), plan3.epochs[2], T)
    assert np.array_equal(partial, full3[: len(partial)])
    runs = doc_runs(partial, corpora)
    assert all(start for _, _, start, _ in runs) and all(whole for _, _, _, whole in runs[:-1])


def replay_docs(samples, corpus):
    tokens = samples[corpus.owns(samples[:, 0])]
    return set(corpus.doc_of(tokens.reshape(-1)).tolist())


def test_fraction_and_even_spread_in_every_epoch(corpora, tmp_path):
    ds, plan = build(corpora, tmp_path, fraction=0.1)
    samples = all_samples(ds)
    is_replay = samples[:, 0] >= REPLAY_BASE
    assert np.array_equal(is_replay, ds.is_replay())
    assert np.all(samples[is_replay] >= REPLAY_BASE) and np.all(samples[~is_replay] < REPLAY_BASE)  # no mixing
    for s in plan.epochs:
        r = is_replay[s.start_sample : s.end_sample]
        n = len(r)
        assert (s.replay_samples, s.domain_samples) == (r.sum(), n - r.sum())
        assert s.replay_tokens == r.sum() * L and s.domain_tokens == (n - r.sum()) * L
        assert abs(r.sum() - 0.1 * n) <= 1
        if s.complete:
            assert abs(r.mean() - 0.1) <= 0.01 * 0.1  # within 1% of the fraction
        # No window of 10% of the epoch holds more than twice the mean replay share (in fact at most one more).
        width = n // 10
        counts = np.convolve(r, np.ones(width, dtype=int), mode="valid")
        assert counts.max() <= 2 * width * r.mean() and counts.max() <= np.ceil(width * r.mean()) + 1
    # A lower fraction gives proportionally fewer replay samples.
    _, plan5 = build(corpora, tmp_path, fraction=0.05)
    assert plan5.epochs[0].replay_samples == pytest.approx(plan.epochs[0].replay_samples * 0.05 / 0.95 * 0.9 / 0.1,
                                                           abs=1)


def test_replay_documents_disjoint_across_epochs_until_the_pool_runs_out(corpora, tmp_path, caplog):
    ds, plan = build(corpora, tmp_path)
    samples = all_samples(ds)
    pool = corpora["pool"]
    per_epoch = [replay_docs(samples[s.start_sample : s.end_sample], pool) for s in plan.epochs]
    assert all(per_epoch) and all(not (x & y) for i, x in enumerate(per_epoch) for y in per_epoch[i + 1 :])
    assert [s.replay_documents for s in plan.epochs] == [len(x) for x in per_epoch]
    assert all(s.reused_replay_documents == 0 and not s.pool_restarts for s in plan.epochs)
    assert 7 not in set().union(*per_epoch)  # the empty document is never drawn

    # A pool smaller than 1.5 epochs of replay: used up completely before any document repeats, then reused.
    small = corpora["small"]
    with caplog.at_level(logging.INFO, logger="megatron.data.replay"):
        ds, plan = build(corpora, tmp_path, pools=("small",))
    assert "small exhausted in epoch 2" in caplog.text
    samples = all_samples(ds)
    per_epoch = [replay_docs(samples[s.start_sample : s.end_sample], small) for s in plan.epochs]
    assert per_epoch[0] and plan.epochs[0].reused_replay_documents == 0 and not plan.epochs[0].pool_restarts
    assert plan.epochs[1].pool_restarts == ("small",)
    assert plan.epochs[1].reused_replay_documents == len(per_epoch[1] & per_epoch[0]) > 0
    assert per_epoch[0] | per_epoch[1] == set(range(60))  # the whole pool before the first reuse
    assert plan.epochs[2].reused_replay_documents == len(per_epoch[2] & (per_epoch[0] | per_epoch[1]))
    messages = plan.boundary_messages(0, plan.total_samples)
    assert "small exhausted: a new permutation started" in messages[1] and "exhausted" not in messages[0]
    for s in plan.epochs:  # no document twice within an epoch: every replay token is an input at most once
        rows = samples[s.start_sample : s.end_sample]
        inputs = rows[rows[:, 0] >= REPLAY_BASE][:, :-1].reshape(-1)
        assert len(np.unique(inputs)) == len(inputs)

    # fresh_each_epoch: false replays the same documents every epoch.
    ds, plan = build(corpora, tmp_path, fresh_each_epoch=False)
    samples = all_samples(ds)
    per_epoch = [replay_docs(samples[s.start_sample : s.end_sample], pool) for s in plan.epochs]
    assert per_epoch[0] == per_epoch[1] and per_epoch[2] <= per_epoch[0]
    assert plan.epochs[1].reused_replay_documents == len(per_epoch[1])


def test_several_pools_share_replay_by_weight(corpora, tmp_path):
    ds, plan = build(corpora, tmp_path, pools=("pool", "pool2"), replay_data_weights=[3.0, 1.0])
    samples = all_samples(ds)
    for s in plan.epochs:
        rows = samples[s.start_sample : s.end_sample]
        first = sum(corpora["pool"].owns(rows[:, 0]))
        second = sum(corpora["pool2"].owns(rows[:, 0]))
        assert first + second == s.replay_samples
        assert abs(first - 0.75 * s.replay_samples) <= 1
    # Unset weights mean by size (tokens).
    _, plan = build(corpora, tmp_path, pools=("pool", "pool2"))
    sizes = np.array([corpora["pool"].lengths.sum(), corpora["pool2"].lengths.sum()], float)
    assert [p["weight"] for p in plan.pools] == pytest.approx(list(sizes / sizes.sum()))


def test_resume_mid_epoch_continues_the_same_samples_on_every_dp_rank(corpora, tmp_path):
    micro, dp, accumulation = 3, 2, 2
    batch = micro * dp * accumulation
    ds, plan = build(corpora, tmp_path, global_batch_size=batch)
    assert plan.total_samples == len(ds) and plan.total_samples % batch == 0
    assert plan.planned_samples <= plan.total_samples < plan.planned_samples + batch
    assert plan.train_iters() == plan.total_samples // batch
    full = [[b["tokens"] for b in make_data_loader(ds, micro, r, dp, consumed_samples=0)] for r in range(dp)]
    # Together the ranks read every sample once, in order.
    steps = len(full[0])
    assert steps == plan.total_samples // (micro * dp)
    stitched = torch.cat([full[r][s] for s in range(steps) for r in range(dp)])
    assert np.array_equal(stitched.numpy(), all_samples(ds))

    # Resume in the middle of epoch 2 from a fresh process's view: the dataset reopened from its cache.
    mid = plan.epochs[1]
    step = (mid.start_sample + mid.end_sample) // 2 // batch
    consumed = step * batch
    assert mid.start_sample < consumed < mid.end_sample
    reopened, plan2 = build(corpora, tmp_path, global_batch_size=batch)
    assert plan2 == plan
    for r in range(dp):
        resumed = [b["tokens"] for b in make_data_loader(reopened, micro, r, dp, consumed, num_workers=1)]
        done = consumed // (micro * dp)
        assert len(resumed) == steps - done
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[r][done:]))
    # The epoch log of the resumed run reports exactly the epochs that end after the resume point.
    reported = [m for c in range(consumed, plan.total_samples, batch) for m in plan.boundary_messages(c, c + batch)]
    assert len(reported) == 2 and reported[0].startswith("epoch 2/3 (complete)")
    s = plan.epochs[1]
    for part in (f"domain {s.domain_tokens:,} tokens", f"replay {s.replay_tokens:,} tokens",
                 f"{s.replay_documents:,} distinct replay documents", "0 reused from earlier epochs"):
        assert part in reported[0]
    assert reported[1].startswith("epoch 3/3 (")


def test_deterministic_cached_and_seed_dependent(corpora, tmp_path, monkeypatch):
    ds1, plan1 = build(corpora, tmp_path / "x")
    ds2, plan2 = build(corpora, tmp_path / "y")  # separate caches: built twice
    assert plan1 == plan2
    assert np.array_equal(ds1.pieces, ds2.pieces) and np.array_equal(ds1.sample_index, ds2.sample_index)
    other, _ = build(corpora, tmp_path / "x", seed=8)
    assert not np.array_equal(all_samples(other), all_samples(ds1))

    # Later builds memory-map the cache; a corrupted or stale cache is rebuilt.
    def refuse(*a, **k):
        raise AssertionError("rebuilt although the cache is valid")

    real = replay_mod.build_epoch_indices
    monkeypatch.setattr(replay_mod, "build_epoch_indices", refuse)
    cached, plan3 = build(corpora, tmp_path / "x")
    assert isinstance(cached.sample_index, np.memmap) and plan3 == plan1
    monkeypatch.setattr(replay_mod, "build_epoch_indices", real)
    cache_files = sorted((tmp_path / "x" / "cache").glob("train_epochs_*_sample_index.npy"))
    assert len(cache_files) == 2  # one per seed
    path = next(p for p in cache_files if p.stat().st_size == np.asarray(ds1.sample_index).nbytes + 128)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    rebuilt, _ = build(corpora, tmp_path / "x")
    assert np.array_equal(rebuilt.sample_index, ds2.sample_index)  # ds1 maps the file just corrupted
    desc = json.loads(next((tmp_path / "x" / "cache").glob("train_epochs_*_description.json")).read_text())
    assert desc["extra"]["total_samples"] == len(ds1)
    # A cache directory that cannot be created keeps the arrays in memory.
    (tmp_path / "file").write_text("")
    in_memory, _ = build(corpora, tmp_path, cache_dir=str(tmp_path / "file" / "cache"))
    assert not isinstance(in_memory.sample_index, np.memmap)
    assert np.array_equal(in_memory.sample_index, ds2.sample_index)


def test_epochs_without_replay_and_data_path_split(corpora, tmp_path):
    # train_epochs alone: plain epochs over the train split of data_path (its first 80% of documents here).
    ds, plan = build_replay_train_dataset(data_path=corpora["a"].prefix, split="80,20,0", train_epochs=2,
                                          seq_length=L, seed=1, global_batch_size=5, cache_dir=str(tmp_path))
    a = corpora["a"]
    samples = all_samples(ds)
    assert not ds.is_replay().any() and plan.pools == ()
    T = int(a.lengths[:120].sum())
    for s in plan.epochs[:2]:
        stream = domain_stream(ds, samples, s, T)[:T]
        assert np.array_equal(np.sort(stream), np.sort(np.concatenate([np.arange(b, b + n) for b, n in
                                                                       zip(a.bases[:120], a.lengths[:120])])))
    # Rounding up to whole steps spills the few extra samples into a third epoch's prefix.
    if plan.total_samples > plan.planned_samples:
        assert len(plan.epochs) == 3 and plan.epochs[2].domain_samples == plan.total_samples - plan.planned_samples


def test_bad_inputs_are_refused(corpora, tmp_path):
    missing = str(tmp_path / "fineweb_text_document")
    with pytest.raises(FileNotFoundError) as info:
        build(corpora, tmp_path, replay_data_paths=[missing])
    assert missing + ".bin" in str(info.value) and missing + ".idx" in str(info.value)
    with pytest.raises(ValueError, match="weights"):
        build(corpora, tmp_path, replay_data_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="fraction"):
        build(corpora, tmp_path, fraction=0.0)
    with pytest.raises(ValueError, match="one of them"):
        build(corpora, tmp_path, data_path=corpora["a"].prefix)


def test_replay_validation_set_and_config_entry_point(corpora, tmp_path):
    valid = build_replay_valid_dataset(valid_data_paths=[corpora["valid"].prefix], seq_length=L, seed=1,
                                       num_samples=20, cache_dir=str(tmp_path))
    assert isinstance(valid, GPTDataset) and len(valid) == 20 and valid.name.startswith("valid_replay")
    assert all(corpora["valid"].owns(valid[i]["tokens"]).all() for i in range(20))

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yml").read_text())
    raw.update(seq_length=L, seed=7, train_epochs=2.5, data_cache_dir=str(tmp_path / "cache"),
               train_data_paths=[corpora["a"].prefix, corpora["b"].prefix],
               replay={"data_paths": [corpora["pool"].prefix], "fraction": 0.1,
                       "valid_data_paths": [corpora["valid"].prefix]})
    data = replay_mod.build_epoch_datasets(build_config(raw), global_batch_size=4, replay_valid_num_samples=8)
    direct, plan = build(corpora, tmp_path, global_batch_size=4)
    assert data.plan == plan and np.array_equal(data.train.sample_index, direct.sample_index)
    assert len(data.replay_valid) == 8 and corpora["valid"].owns(data.replay_valid[0]["tokens"]).all()


def test_large_plan_builds_fast():
    import time

    rng = np.random.default_rng(0)

    def table(n, top):
        lengths = rng.integers(1, top, n).astype(np.int64)
        return np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths

    domain, pool = table(500_000, 800), table(1_000_000, 2000)  # ~200M domain tokens, ~1B pool tokens
    start = time.perf_counter()
    arrays, plan = replay_mod.build_epoch_indices([(*domain, np.arange(500_000))], [pool], [1.0], ["fw"], 0.1, 2.5,
                                                  2048, 0, True, 512)
    assert time.perf_counter() - start < 10
    assert len(arrays["sample_index"]) == plan["total_samples"] > 2.5 * 200e6 / 2048


def _rank_main(rank, port, paths, cache, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:  # only rank 0 may build; rank 1 waits for it at the barrier, then memory-maps the cache
            def fail(*args, **kwargs):
                raise AssertionError("rank 1 built the index")

            replay_mod.build_epoch_indices = fail
        ds, _ = build_replay_train_dataset(train_data_paths=paths[:1], replay_data_paths=paths[1:], fraction=0.1,
                                           train_epochs=1.5, seq_length=L, seed=3, cache_dir=cache)
        assert isinstance(ds.sample_index, np.memmap)
        np.save(f"{out}_{rank}.npy", all_samples(ds))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_rank_zero_builds_the_plan_others_wait(corpora, tmp_path):
    out = str(tmp_path / "samples")
    paths = [corpora["a"].prefix, corpora["pool"].prefix]
    run_two_gloo_ranks(_rank_main, paths, str(tmp_path / "c"), out)
    assert np.array_equal(np.load(out + "_0.npy"), np.load(out + "_1.npy"))
