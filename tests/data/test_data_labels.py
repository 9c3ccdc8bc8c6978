"""Label datasets (SFT): samples carry per-token targets read at the tokens' own positions, across the packing of
documents into samples, in blends, and through the trainer's batches."""

import numpy as np
import pytest
import torch

from megatron.data.data_utils import build_train_valid_test_datasets, make_data_loader
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import CorruptDatasetError, IndexedDataset, IndexedDatasetWriter


def trained(tokens: np.ndarray) -> np.ndarray:
    """The label rule of these tests: odd tokens are targets, even ones take no loss (-100)."""
    return np.where(tokens % 2 == 1, tokens, -100)


def write_pair(prefix: str, seed: int, n_docs: int = 40, lengths=None) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix + "_messages_document", np.int32) as tokens, \
            IndexedDatasetWriter(prefix + "_messages_label_document", np.int32) as labels:
        for i in range(n_docs):
            doc = rng.integers(0, 1000, size=int(rng.integers(3, 40)) if lengths is None else lengths[i])
            tokens.add_document(doc)
            labels.add_document(trained(doc))
        tokens.finalize()
        labels.finalize()
    return prefix + "_messages_document", prefix + "_messages_label_document"


def test_samples_carry_their_own_tokens_labels_across_document_boundaries(tmp_path):
    text, label = write_pair(str(tmp_path / "chat"), seed=0)
    plain = GPTDataset(IndexedDataset(text), "train", 60, 16, seed=5, cache_dir=str(tmp_path / "cache"))
    with_labels = GPTDataset(IndexedDataset(text), "train", 60, 16, seed=5, cache_dir=str(tmp_path / "cache"),
                             labels=IndexedDataset(label))
    spans = 0
    for i in range(60):
        sample = with_labels[i]
        np.testing.assert_array_equal(sample["tokens"], plain[i]["tokens"])  # labels change no sample
        np.testing.assert_array_equal(sample["labels"], trained(sample["tokens"]))
        spans += len(set(map(int, with_labels.sample_index[int(with_labels.shuffle_index[i]):][:2, 0]))) > 1
    assert spans  # some samples run over a document boundary


def test_blended_label_datasets_and_the_trainers_targets(tmp_path):
    from megatron.trainer import _lm_batches

    a, b = write_pair(str(tmp_path / "a"), seed=1), write_pair(str(tmp_path / "b"), seed=2)
    train, valid, _ = build_train_valid_test_datasets(
        train_data_paths=[a[0], b[0]], train_data_weights=[0.3, 0.7], train_label_data_paths=[a[1], b[1]],
        valid_data_paths=[b[0]], valid_label_data_paths=[b[1]], seq_length=16, seed=3, train_num_samples=50,
        valid_num_samples=8, cache_dir=str(tmp_path / "cache"))
    for dataset in (train, valid):
        for i in range(len(dataset)):
            np.testing.assert_array_equal(dataset[i]["labels"], trained(dataset[i]["tokens"]))
    loader = make_data_loader(train, micro_batch_size=4, dp_rank=0, dp_size=1, consumed_samples=0)
    batch = next(iter(loader))
    inputs, targets = next(_lm_batches(iter([batch])))
    assert torch.equal(inputs, batch["tokens"][:, :-1])
    expected = torch.where(batch["tokens"][:, 1:] % 2 == 1, batch["tokens"][:, 1:], -100)
    assert torch.equal(targets, expected) and (targets == -100).any() and (targets != -100).any()


def test_a_label_dataset_of_other_documents_is_named(tmp_path):
    text, _ = write_pair(str(tmp_path / "x"), seed=0, n_docs=3, lengths=[5, 6, 7])
    _, other = write_pair(str(tmp_path / "y"), seed=0, n_docs=3, lengths=[5, 9, 7])
    with pytest.raises(CorruptDatasetError, match=r"y_messages_label_document does not match token dataset .*"
                                                  r"x_messages_document: sequence 1 holds 9 labels for 6 tokens"):
        GPTDataset(IndexedDataset(text), "train", 4, 4, seed=0, cache_dir=str(tmp_path / "c"),
                   labels=IndexedDataset(other))
    _, fewer = write_pair(str(tmp_path / "z"), seed=0, n_docs=2, lengths=[5, 6])
    with pytest.raises(CorruptDatasetError, match="2 documents, the tokens 3"):
        GPTDataset(IndexedDataset(text), "train", 4, 4, seed=0, cache_dir=str(tmp_path / "c"),
                   labels=IndexedDataset(fewer))
    with pytest.raises(ValueError, match="not with data_path"):
        build_train_valid_test_datasets(data_path=text, train_label_data_paths=[other], seq_length=4, seed=0,
                                        train_num_samples=4)
