import glob
import os

import numpy as np
import pytest
from data_helpers import random_docs, run_two_gloo_ranks, write_dataset

from megatron.data import gpt_dataset
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import IndexedDataset

SEQ = 16


@pytest.fixture
def corpus(tmp_path):
    # Include empty documents and documents longer than a sample.
    docs = random_docs(40, seed=7, max_len=50)
    docs[3] = np.zeros(0, np.int32)
    docs[10] = np.arange(100, dtype=np.int32)
    prefix = write_dataset(str(tmp_path / "corpus"), docs)
    return IndexedDataset(prefix), docs


def stream_of(ds: GPTDataset, docs) -> np.ndarray:
    return np.concatenate([docs[d] for d in ds.doc_order])


def test_samples_are_overlapping_windows_of_the_shuffled_stream(corpus, tmp_path):
    indexed, docs = corpus
    ds = GPTDataset(indexed, "train", num_samples=300, seq_length=SEQ, seed=1, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 300
    stream = stream_of(ds, docs)
    assert len(stream) >= 300 * SEQ + 1
    assert sorted(ds.shuffle_index.tolist()) == list(range(300))
    for i in range(len(ds)):
        tokens = ds[i]["tokens"]
        j = int(ds.shuffle_index[i])
        assert tokens.dtype == np.int64 and tokens.shape == (SEQ + 1,)
        assert np.array_equal(tokens, stream[j * SEQ : (j + 1) * SEQ + 1])
    assert not np.array_equal(ds.shuffle_index, np.arange(300))


def test_each_document_once_per_epoch(corpus, tmp_path):
    indexed, docs = corpus
    ds = GPTDataset(indexed, "train", num_samples=400, seq_length=SEQ, seed=3, cache_dir=str(tmp_path / "c"))
    n = len(docs)
    tokens_per_epoch = sum(map(len, docs))
    epochs = -(-(400 * SEQ + 1) // tokens_per_epoch)
    assert epochs >= 3
    order = np.asarray(ds.doc_order)
    for e in range(epochs - 1):  # full epochs: a permutation each, and different from each other
        assert sorted(order[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not np.array_equal(order[:n], order[n : 2 * n])
    last = order[(epochs - 1) * n :]
    assert len(set(last.tolist())) == len(last) and len(last) <= n


def test_document_subset(corpus, tmp_path):
    indexed, docs = corpus
    ids = np.arange(20, 30)
    ds = GPTDataset(indexed, "valid", 50, SEQ, seed=0, document_ids=ids, cache_dir=str(tmp_path / "c"))
    assert set(np.asarray(ds.doc_order).tolist()) <= set(ids.tolist())
    stream = stream_of(ds, docs)
    j = int(ds.shuffle_index[0])
    assert np.array_equal(ds[0]["tokens"], stream[j * SEQ : (j + 1) * SEQ + 1])


def test_deterministic_and_seed_dependent(corpus, tmp_path):
    indexed, _ = corpus
    a = GPTDataset(indexed, "t", 200, SEQ, seed=5, cache_dir=str(tmp_path / "a"))
    b = GPTDataset(indexed, "t", 200, SEQ, seed=5, cache_dir=str(tmp_path / "b"))
    c = GPTDataset(indexed, "t", 200, SEQ, seed=6, cache_dir=str(tmp_path / "a"))
    assert all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(200))
    assert not all(np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(200))
    assert a.cache_key == b.cache_key != c.cache_key


def test_cache_is_reused(corpus, tmp_path, monkeypatch):
    indexed, _ = corpus
    cache = str(tmp_path / "cache")
    first = GPTDataset(indexed, "t", 100, SEQ, seed=0, cache_dir=cache)
    assert len(glob.glob(os.path.join(cache, "t_*"))) == 4  # 3 arrays + description

    def fail(*args, **kwargs):
        raise AssertionError("index rebuilt although the cache is valid")

    monkeypatch.setattr(gpt_dataset, "build_sample_indices", fail)
    second = GPTDataset(indexed, "t", 100, SEQ, seed=0, cache_dir=cache)
    assert isinstance(second.sample_index, np.memmap)
    assert all(np.array_equal(first[i]["tokens"], second[i]["tokens"]) for i in range(100))


def test_default_cache_dir_next_to_data(corpus):
    indexed, _ = corpus
    GPTDataset(indexed, "t", 10, SEQ, seed=0)
    assert glob.glob(indexed.prefix + "_cache/t_*_description.json")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "description"])
def test_corrupt_cache_is_rebuilt(corpus, tmp_path, damage):
    indexed, _ = corpus
    cache = str(tmp_path / "cache")
    good = GPTDataset(indexed, "t", 100, SEQ, seed=0, cache_dir=cache)
    expected = [good[i]["tokens"] for i in range(100)]
    del good
    target = glob.glob(os.path.join(cache, "t_*_sample_index.npy"))[0]
    if damage == "truncate":
        os.truncate(target, os.path.getsize(target) - 16)
    elif damage == "flip":
        with open(target, "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"\xff\xff\xff")
    elif damage == "delete":
        os.remove(target)
    else:
        with open(glob.glob(os.path.join(cache, "t_*_description.json"))[0], "w") as f:
            f.write("{not json")
    rebuilt = GPTDataset(indexed, "t", 100, SEQ, seed=0, cache_dir=cache)
    assert all(np.array_equal(rebuilt[i]["tokens"], e) for i, e in enumerate(expected))
    assert GPTDataset(indexed, "t", 100, SEQ, seed=0, cache_dir=cache)._cache_is_valid()


def test_changed_data_gets_a_new_cache(tmp_path):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, random_docs(20, seed=1))
    old = GPTDataset(IndexedDataset(prefix), "t", 20, SEQ, seed=0, cache_dir=str(tmp_path / "c"))
    write_dataset(prefix, random_docs(25, seed=2))
    os.utime(prefix + ".idx", ns=(1, 1))  # even with an equal size, mtime changes the key
    new = GPTDataset(IndexedDataset(prefix), "t", 20, SEQ, seed=0, cache_dir=str(tmp_path / "c"))
    assert new.cache_key != old.cache_key


def test_errors(corpus, tmp_path):
    indexed, _ = corpus
    with pytest.raises(ValueError, match="no tokens"):
        GPTDataset(indexed, "t", 10, SEQ, seed=0, document_ids=np.array([3]), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="document_ids outside"):
        GPTDataset(indexed, "t", 10, SEQ, seed=0, document_ids=np.array([40]), cache_dir=str(tmp_path))
    with pytest.raises(IndexError):
        GPTDataset(indexed, "t", 10, SEQ, seed=0, cache_dir=str(tmp_path))[10]


def test_data_without_tokens_is_named(tmp_path):
    """Every way to build samples from data with no tokens says which files, and how to look at them."""
    from megatron.data.data_utils import build_train_valid_test_datasets
    from megatron.data.replay import build_replay_train_dataset

    empty = write_dataset(str(tmp_path / "empty_text_document"), [])
    blank = write_dataset(str(tmp_path / "blank_text_document"), [np.zeros(0, np.int32)] * 3)
    good = write_dataset(str(tmp_path / "good_text_document"), random_docs(10, seed=1))
    cache = str(tmp_path / "c")
    attempts = {
        empty: lambda: build_train_valid_test_datasets(train_data_paths=[empty], seq_length=SEQ, seed=1,
                                                       train_num_samples=4, cache_dir=cache),
        blank: lambda: build_train_valid_test_datasets(data_path=blank, split="100,0,0", seq_length=SEQ, seed=1,
                                                       train_num_samples=4, cache_dir=cache),
    }
    for prefix in (empty, blank):  # the epoch path: a domain corpus, then a replay pool without tokens
        attempts[prefix + " (epochs)"] = lambda p=prefix: build_replay_train_dataset(
            train_data_paths=[p], train_epochs=1, seq_length=SEQ, seed=1, cache_dir=cache)
        attempts[prefix + " (pool)"] = lambda p=prefix: build_replay_train_dataset(
            train_data_paths=[good], replay_data_paths=[p], fraction=0.1, train_epochs=1, seq_length=SEQ, seed=1,
            cache_dir=cache)
    for what, attempt in attempts.items():
        with pytest.raises(ValueError) as info:
            attempt()
        message = str(info.value)
        prefix = what.split(" ")[0]
        assert "no tokens" in message, what
        assert f"tools/datasets/inspect_dataset.py {prefix}`" in message, what


def test_large_index_build_is_fast():
    import time

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 400, 1_000_000).astype(np.int64)  # ~200M tokens
    start = time.perf_counter()
    doc_order, sample_index, shuffle = gpt_dataset.build_sample_indices(
        lengths, np.arange(len(lengths)), num_samples=150_000, seq_length=2048, seed=0
    )
    assert time.perf_counter() - start < 10
    assert sample_index.shape == (150_000, 2) and len(shuffle) == 150_000


def _rank_main(rank: int, port: int, prefix: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:  # only rank 0 may build; rank 1 must wait for it at the barrier and then load
            def fail(*args, **kwargs):
                raise AssertionError("rank 1 built the index")

            gpt_dataset.build_sample_indices = fail
        ds = GPTDataset(IndexedDataset(prefix), "t", 50, SEQ, seed=0, cache_dir=cache)
        np.save(f"{out}_{rank}.npy", np.stack([ds[i]["tokens"] for i in range(50)]))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_rank_zero_builds_others_wait(tmp_path):
    prefix = write_dataset(str(tmp_path / "d"), random_docs(30, seed=9))
    out = str(tmp_path / "samples")
    run_two_gloo_ranks(_rank_main, prefix, str(tmp_path / "c"), out)
    assert np.array_equal(np.load(out + "_0.npy"), np.load(out + "_1.npy"))


def _failing_rank_main(rank: int, port: int, prefix: str, cache: str, out: str) -> None:
    """Both index builders on data without tokens: rank 0 fails to build; rank 1 must fail at once with rank 0's
    error. Rank 0 stays alive until then (as an NCCL peer would look to the others), so rank 1 cannot get away
    with noticing that rank 0 has exited."""
    import datetime
    import time

    import torch.distributed as dist

    from megatron.data.replay import build_replay_train_dataset

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    builders = {
        "gpt": lambda: GPTDataset(IndexedDataset(prefix), "t", 10, SEQ, seed=0, cache_dir=cache),
        "epochs": lambda: build_replay_train_dataset(train_data_paths=[prefix], train_epochs=1, seq_length=SEQ,
                                                     seed=0, cache_dir=cache),
    }
    try:
        for name, build in builders.items():
            start = time.perf_counter()
            try:
                build()
                message = "built"
            except Exception as err:  # noqa: BLE001 - the test compares what each rank raised
                message = f"{type(err).__name__}: {err}"
            with open(f"{out}_{name}_{rank}.txt", "w") as f:
                f.write(f"{time.perf_counter() - start:.3f}\n{message}")
            if rank == 0:  # wait until rank 1 has failed too (or give up after 5 s)
                deadline = time.time() + 5
                while not os.path.exists(f"{out}_{name}_1.txt") and time.time() < deadline:
                    time.sleep(0.01)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_rank_zero_failure_reaches_every_rank_at_once(tmp_path):
    prefix = write_dataset(str(tmp_path / "empty_text_document"), [])
    out = str(tmp_path / "result")
    run_two_gloo_ranks(_failing_rank_main, prefix, str(tmp_path / "c"), out, timeout=40)
    for name in ("gpt", "epochs"):
        seconds, error = open(f"{out}_{name}_1.txt").read().split("\n", 1)
        rank0_error = open(f"{out}_{name}_0.txt").read().split("\n", 1)[1]
        assert rank0_error.startswith("ValueError: ") and "no tokens" in rank0_error
        assert error.startswith("RuntimeError: ") and rank0_error in error and "rank 0 failed" in error
        assert float(seconds) < 3


def test_multi_sequence_documents_are_one_token_range(tmp_path):
    from megatron.data.indexed_dataset import IndexedDatasetWriter

    prefix = str(tmp_path / "multi")
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        writer.add_document(np.arange(0, 10), lengths=[3, 7])
        writer.add_document(np.arange(100, 105))
        writer.add_document(np.arange(200, 230), lengths=[10, 0, 20])
        writer.finalize()
    indexed = IndexedDataset(prefix)
    starts, lengths = gpt_dataset.document_token_ranges(indexed)
    assert starts.tolist() == [0, 10, 15] and lengths.tolist() == [10, 5, 30]
    ds = GPTDataset(indexed, "t", 10, 4, seed=0, cache_dir=str(tmp_path / "c"))
    docs = [np.arange(0, 10), np.arange(100, 105), np.arange(200, 230)]
    stream = stream_of(ds, docs)
    for i in range(10):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i]["tokens"], stream[j * 4 : j * 4 + 5])
