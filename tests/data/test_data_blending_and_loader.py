import numpy as np
import pytest
import torch
from data_helpers import random_docs, write_dataset

from megatron.data.blendable_dataset import BlendableDataset, build_blending_indices
from megatron.data.data_utils import (
    build_train_valid_test_datasets,
    make_data_loader,
    split_document_ranges,
)
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import IndexedDataset

SEQ = 8


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1], [0.9, 0.05, 0.05], [3, 0, 1], [0.01, 0.99]])
def test_blend_proportions(weights):
    n = 10_000
    index, sample_index = build_blending_indices(weights, n, seed=1)
    w = np.asarray(weights, float) / sum(weights)
    counts = np.bincount(index, minlength=len(w))
    assert np.all(np.abs(counts / n - w) < 0.01)
    assert np.all(np.abs(counts - w * n) <= len(w))  # in fact exact to a sample or two
    # Every prefix is close to the target mix, and each dataset's samples are taken in order 0, 1, 2, ...
    running = np.zeros(len(w))
    for i, (d, k) in enumerate(zip(index, sample_index)):
        assert k == running[d]
        running[d] += 1
        if i % 97 == 0:
            assert np.all(np.abs(running - w * (i + 1)) <= len(w))
    assert counts[w == 0].sum() == 0


class Dummy:
    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        return (self.tag, i)


def test_blendable_dataset_maps_samples():
    ds = BlendableDataset([Dummy("a", 700), Dummy("b", 400)], [0.6, 0.4], num_samples=1000, seed=0)
    items = [ds[i] for i in range(len(ds))]
    a = [i for t, i in items if t == "a"]
    assert a == list(range(len(a))) and abs(len(a) - 600) <= 2
    with pytest.raises(ValueError, match="only 100"):
        BlendableDataset([Dummy("a", 100), Dummy("b", 1000)], [0.5, 0.5], num_samples=1000, seed=0)
    with pytest.raises(ValueError, match="weights"):
        BlendableDataset([Dummy("a", 10)], [-1], num_samples=5, seed=0)


def test_split_ranges_like_megatron():
    assert split_document_ranges(1000, "949,50,1") == [(0, 949), (949, 999), (999, 1000)]
    assert split_document_ranges(10, "98,2,0") == [(0, 10), (10, 10), (10, 10)]
    assert split_document_ranges(7, "1,1,1") == [(0, 3), (3, 5), (5, 7)]  # Megatron shifts the rounding error
    with pytest.raises(ValueError):
        split_document_ranges(10, "1,2,3,4")


@pytest.fixture
def corpora(tmp_path):
    return [write_dataset(str(tmp_path / f"c{i}"), random_docs(100, seed=i, vocab=50 + 1000 * i)) for i in range(2)]


def test_build_from_data_path_split(corpora, tmp_path):
    train, valid, test = build_train_valid_test_datasets(
        data_path=corpora[0], split="80,20,0", seq_length=SEQ, seed=1,
        train_num_samples=100, valid_num_samples=20, test_num_samples=5, cache_dir=str(tmp_path / "cache"),
    )
    assert test is None
    assert isinstance(train, GPTDataset) and len(train) == 100 and len(valid) == 20
    assert set(np.asarray(train.doc_order).tolist()) <= set(range(80))
    assert set(np.asarray(valid.doc_order).tolist()) <= set(range(80, 100))
    assert train[0]["tokens"].shape == (SEQ + 1,)


def test_build_blended_paths(corpora, tmp_path):
    train, valid, test = build_train_valid_test_datasets(
        train_data_paths=corpora, train_data_weights=[3, 1], valid_data_paths=[corpora[1]],
        seq_length=SEQ, seed=1, train_num_samples=1000, valid_num_samples=10, cache_dir=str(tmp_path / "cache"),
    )
    assert isinstance(train, BlendableDataset) and len(train) == 1000 and test is None
    from_second = sum(int(train[i]["tokens"].max()) >= 50 for i in range(1000))  # corpus 0 ids are < 50
    assert abs(from_second - 250) <= 10
    assert isinstance(valid, GPTDataset) and len(valid) == 10


def test_missing_prefix_names_both_files(tmp_path):
    prefix = str(tmp_path / "nothing_text_document")
    with pytest.raises(FileNotFoundError) as info:
        build_train_valid_test_datasets(train_data_paths=[prefix], seq_length=SEQ, seed=0, train_num_samples=1)
    assert prefix + ".bin" in str(info.value) and prefix + ".idx" in str(info.value)


def test_loader_partitions_global_batches_and_resumes(corpora, tmp_path):
    ds = GPTDataset(IndexedDataset(corpora[0]), "t", 64, SEQ, seed=0, cache_dir=str(tmp_path / "cache"))
    micro, dp = 2, 3
    loaders = [make_data_loader(ds, micro, r, dp, consumed_samples=0) for r in range(dp)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == 64 // (micro * dp) == 10
    for step in range(10):
        for r in range(dp):
            tokens = batches[r][step]["tokens"]
            assert tokens.dtype == torch.int64 and tokens.shape == (micro, SEQ + 1)
            first = step * micro * dp + r * micro
            expected = np.stack([ds[first + k]["tokens"] for k in range(micro)])
            assert np.array_equal(tokens.numpy(), expected)
    # Resuming after 4 global micro-batches continues exactly where the full run was.
    resumed = list(make_data_loader(ds, micro, 1, dp, consumed_samples=4 * micro * dp, num_workers=2))
    assert len(resumed) == 6
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(resumed, batches[1][4:]))


def test_blend_builds_where_the_margin_falls_short(tmp_path):
    # The even merge takes 22 of these 32 samples from the second corpus; its 0.5% margin alone gave it 21.
    paths = [write_dataset(str(tmp_path / f"b{i}"), random_docs(50, seed=i)) for i in range(3)]
    train, _, _ = build_train_valid_test_datasets(
        train_data_paths=paths, train_data_weights=[0.15, 0.65, 0.2], seq_length=16, seed=1234,
        train_num_samples=32, cache_dir=str(tmp_path / "cache"))
    assert np.bincount(train.dataset_index).tolist() == [4, 22, 6]
    assert [len(d) for d in train.datasets] == [5, 22, 7]  # the margin's sizes, but 22 where it gave 21
    assert all(train[i]["tokens"].shape == (17,) for i in range(32))


def test_blend_components_hold_what_the_blend_takes(monkeypatch):
    """Random weights (some zero) and sizes: every component has at least the samples the blend takes from it."""
    import megatron.data.data_utils as data_utils

    class Component:  # stands in for GPTDataset: only its length matters to the blend
        def __init__(self, indexed, name, num_samples, *args, **kwargs):
            self.num_samples = num_samples

        def __len__(self):
            return self.num_samples

    monkeypatch.setattr(data_utils, "IndexedDataset", lambda prefix: prefix)
    monkeypatch.setattr(data_utils, "GPTDataset", Component)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        k = int(rng.integers(2, 6))
        weights = rng.dirichlet(np.ones(k)) * rng.uniform(0.1, 10)
        if rng.random() < 0.2:
            weights[rng.integers(k)] = 0.0
        n, seed = int(rng.integers(1, 300)), int(rng.integers(2**31))
        blend = data_utils._blend([f"p{i}" for i in range(k)], list(weights), "train", n, SEQ, seed, None)
        taken = np.bincount(blend.dataset_index, minlength=k)
        assert np.all(taken <= [len(d) for d in blend.datasets]) and len(blend) == n
