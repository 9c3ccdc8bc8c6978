import os
import struct

import numpy as np
import pytest
import torch
from data_helpers import random_docs, write_dataset

from megatron.data.indexed_dataset import (
    CorruptDatasetError,
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
)


def test_roundtrip_with_multi_sequence_documents(tmp_path):
    prefix = str(tmp_path / "ds")
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
        writer.add_item([4, 5])
        writer.add_item([])
        writer.add_item([6])
        writer.end_document()
        writer.add_document(np.arange(10, 20), lengths=[4, 6])
        writer.add_documents(np.array([7, 8, 9], np.uint16), [1, 2])
        writer.finalize()
    ds = IndexedDataset(prefix)
    assert len(ds) == 8 and ds.num_documents == 5 and ds.num_tokens == 19 and ds.dtype == np.uint16
    assert ds.sequence_lengths.tolist() == [3, 2, 0, 1, 4, 6, 1, 2]
    assert ds.sequence_pointers.tolist() == [0, 6, 10, 10, 12, 20, 32, 34]
    assert ds.document_indices.tolist() == [0, 1, 4, 6, 7, 8]
    assert ds[1].tolist() == [4, 5] and ds[-1].tolist() == [8, 9]
    assert ds.get(5, offset=2, length=3).tolist() == [16, 17, 18]
    assert ds.get(5, offset=4).tolist() == [18, 19]
    assert ds.document_tokens(1).tolist() == [4, 5, 6]
    with pytest.raises(IndexError):
        ds[8]
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)


def test_pickle_reopens(tmp_path):
    import pickle

    ds = IndexedDataset(write_dataset(str(tmp_path / "p"), random_docs(5)))
    copy = pickle.loads(pickle.dumps(ds))
    assert all(np.array_equal(ds[i], copy[i]) for i in range(len(ds)))


def test_best_dtype():
    assert best_dtype(50257) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(128256) == np.int32


def test_out_of_range_ids_rejected(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as writer:
        with pytest.raises(ValueError, match="outside the range"):
            writer.add_document([1, 70000])
        with pytest.raises(ValueError, match="outside the range"):
            writer.add_document(np.array([-1]))


def test_interrupted_writer_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.int32) as writer:
            writer.add_document([1, 2, 3])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_add_index_merges(tmp_path):
    a = write_dataset(str(tmp_path / "a"), random_docs(7, seed=1))
    b = write_dataset(str(tmp_path / "b"), random_docs(5, seed=2))
    with IndexedDatasetWriter(str(tmp_path / "m"), np.int32) as writer:
        writer.add_index(a)
        writer.add_index(b)
        writer.finalize()
    merged, da, db = IndexedDataset(str(tmp_path / "m")), IndexedDataset(a), IndexedDataset(b)
    assert merged.num_documents == 12 and len(merged) == 12
    expected = [da[i] for i in range(7)] + [db[i] for i in range(5)]
    assert all(np.array_equal(merged[i], e) for i, e in enumerate(expected))


# ---- byte compatibility with megatron-core -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_byte_identical_to_megatron_core(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MCoreDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = random_docs(50, seed=3)
    ours = write_dataset(str(tmp_path / "ours"), docs, dtype)

    theirs = str(tmp_path / "theirs")
    builder = IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(theirs + ".idx")

    for ext in (".bin", ".idx"):
        with open(ours + ext, "rb") as f1, open(theirs + ext, "rb") as f2:
            assert f1.read() == f2.read(), ext

    # Each reads the other's files.
    mcore = MCoreDataset(ours)
    mine = IndexedDataset(theirs)
    assert len(mcore) == len(mine) == 50
    assert np.array_equal(mcore.document_indices, mine.document_indices)
    for i, doc in enumerate(docs):
        assert np.array_equal(mcore[i], doc) and np.array_equal(mine[i], doc)


def test_reads_megatron_core_multi_sequence_documents(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "mc")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    builder.add_document(torch.arange(10), [3, 7])
    builder.add_item(torch.tensor([42, 43]))
    builder.end_document()
    builder.finalize(prefix + ".idx")
    ds = IndexedDataset(prefix)
    assert ds.sequence_lengths.tolist() == [3, 7, 2] and ds.document_indices.tolist() == [0, 2, 3]
    assert ds.document_tokens(0).tolist() == list(range(10))


# ---- corruption ------------------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(str(tmp_path / "c"), random_docs(10, seed=4, max_len=30) + [np.arange(5, dtype=np.int32)])


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def corruptions():
    def magic(p):
        patch(p + ".idx", 0, b"XXIDIDX\x00\x00")

    def version(p):
        patch(p + ".idx", 9, struct.pack("<Q", 2))

    def dtype_code(p):
        patch(p + ".idx", 17, struct.pack("<B", 9))

    def truncated_bin(p):
        os.truncate(p + ".bin", os.path.getsize(p + ".bin") - 4)

    def truncated_idx(p):
        os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8)

    def tiny_idx(p):
        os.truncate(p + ".idx", 20)

    def doc_index_end(p):
        patch(p + ".idx", os.path.getsize(p + ".idx") - 8, struct.pack("<q", 99))

    def doc_index_start(p):
        n = struct.unpack("<Q", open(p + ".idx", "rb").read()[18:26])[0]
        patch(p + ".idx", 34 + 12 * n, struct.pack("<q", 1))

    def doc_index_order(p):
        n = struct.unpack("<Q", open(p + ".idx", "rb").read()[18:26])[0]
        patch(p + ".idx", 34 + 12 * n + 8 * 3, struct.pack("<q", 9))

    def pointer(p):
        patch(p + ".idx", 34 + 4 * 11 + 8 * 2, struct.pack("<q", 3))

    def length(p):
        patch(p + ".idx", 34 + 4 * 2, struct.pack("<i", 1000))

    return {f.__name__: (f, expected) for f, expected in [
        (magic, ".idx: not a Megatron mmap index"),
        (version, ".idx: unsupported index version 2"),
        (dtype_code, ".idx: unknown dtype code 9"),
        (truncated_bin, ".bin: data file is"),
        (truncated_idx, ".idx: index is"),
        (tiny_idx, ".idx: truncated index"),
        (doc_index_end, ".idx: inconsistent document index"),
        (doc_index_start, ".idx: inconsistent document index"),
        (doc_index_order, ".idx: inconsistent document index"),
        (pointer, ".idx: sequence 2 points to byte"),
        (length, ".idx: sequence 3 points to byte"),
    ]}


@pytest.mark.parametrize("case", sorted(corruptions()))
def test_corruption_raises_with_file_name(dataset, case):
    corrupt, message = corruptions()[case]
    corrupt(dataset)
    with pytest.raises(CorruptDatasetError) as info:
        IndexedDataset(dataset)
    assert str(info.value).startswith(dataset + message), str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_files_name_both(tmp_path):
    prefix = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError) as info:
        IndexedDataset(prefix)
    assert prefix + ".idx" in str(info.value) and prefix + ".bin" in str(info.value)
