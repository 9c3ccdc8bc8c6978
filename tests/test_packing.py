"""Whole-conversation packing (megatron/data/packing.py): over a whole epoch of conversations of varied lengths no
sample holds assistant tokens without the turns before them, and in the model a conversation's logits do not
depend on the other conversations of its sample."""

import numpy as np
import pytest
import torch

from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from megatron.data.packing import PackedDocumentsDataset, pack

BOS, EOD, EOT, HEADER = 1, 2, 3, 4
SEQ = 96


def conversation(rng, turns):
    """BOS, then per turn a user message and an assistant message (HEADER role text EOT), then EOD; labels on
    the assistant texts and their EOT. Token 5 marks user text, 6.. assistant text, so labels can be checked."""
    tokens, labels = [BOS], [-100]
    for _ in range(turns):
        user = [HEADER, 5, *rng.integers(10, 50, rng.integers(2, 30)), EOT]
        answer = [*rng.integers(50, 90, rng.integers(1, 30)), EOT]
        tokens += user + [HEADER, 6] + answer
        labels += [-100] * (len(user) + 2) + answer
    return tokens + [EOD], labels + [-100]


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path_factory.mktemp("pack") / "chat")
    convs = [conversation(rng, int(rng.choice([1, 1, 1, 2, 3, 6]))) for _ in range(300)]
    with IndexedDatasetWriter(prefix + "_document", np.int32) as t, \
            IndexedDatasetWriter(prefix + "_label_document", np.int32) as lab:
        for tokens, labels in convs:
            t.add_document(tokens)
            lab.add_document(labels)
        t.finalize()
        lab.finalize()
    return IndexedDataset(prefix + "_document"), IndexedDataset(prefix + "_label_document"), convs


def segments(tokens, labels):
    """A sample cut after each EOD: (tokens, labels) per document or padding token."""
    ends = np.flatnonzero(tokens == EOD) + 1
    return [(t, lab) for t, lab in zip(np.split(tokens, ends), np.split(labels, ends)) if len(t)]


@pytest.mark.parametrize("impl", ["best_fit", "pack_until_overflow", "unpacked"])
def test_an_epoch_holds_every_conversation_whole_once(chat_data, impl):
    tokens_ds, labels_ds, convs = chat_data
    probe = PackedDocumentsDataset(tokens_ds, "p", 1, SEQ, 7, impl, EOD, labels=labels_ds, boundary_id=EOT)
    n = probe.stats.samples_per_epoch
    ds = PackedDocumentsDataset(tokens_ds, "p", n, SEQ, 7, impl, EOD, labels=labels_ds, boundary_id=EOT)
    whole = {tuple(t): lab for t, lab in convs}
    long = [(t, lab) for t, lab in convs if len(t) > SEQ + 1]
    assert long  # the mix has conversations longer than a sample: each is cut at a message end, or dropped
    seen, truncated = [], 0
    for i in range(n):
        sample = ds[i]
        assert len(sample["tokens"]) == SEQ + 1
        for t, lab in segments(sample["tokens"], sample["labels"]):
            if list(t) == [EOD]:  # padding
                assert lab.tolist() == [-100]
                continue
            assert t[0] == BOS and t[-1] == EOD  # a document starts at its beginning: never mid-conversation
            if tuple(t) in whole:
                assert lab.tolist() == whole[tuple(t)]
            else:  # truncated: a prefix ending at a message end (EOT), then EOD; the prefix keeps its labels
                full = next(c for c in long if c[0][: len(t) - 1] == list(t[:-1]))
                assert t[-2] == EOT and lab.tolist() == full[1][: len(t) - 1] + [-100]
                truncated += 1
            seen.append(tuple(t))
            # Every trained token is assistant text (or its EOT): never user, header or BOS/EOD tokens.
            trained = t[lab != -100]
            assert np.all((trained >= 50) | (trained == EOT))
    assert len(seen) == len(set(seen)) == len(convs) - ds.stats.dropped
    assert truncated == ds.stats.truncated and truncated + ds.stats.dropped == len(long)
    # The token stream of `packed` (today's behaviour) does start samples mid-conversation, with trained tokens.
    stream = GPTDataset(tokens_ds, "s", 50, SEQ, 7, cache_dir=str(probe.indexed.prefix) + "_c", labels=labels_ds)
    assert any(stream[i]["tokens"][0] != BOS and np.any(stream[i]["labels"] != -100) for i in range(50))


def test_best_fit_pads_least():
    rng = np.random.default_rng(1)
    lengths = np.minimum(rng.lognormal(5.5, 0.9, 4000).astype(int) + 20, 2049)
    used = {impl: len(pack(lengths, 2049, impl)) for impl in ("best_fit", "pack_until_overflow", "unpacked")}
    assert used["best_fit"] < used["pack_until_overflow"] < used["unpacked"] == 4000
    assert used["best_fit"] <= np.ceil(lengths.sum() / 2049) * 1.02  # within 2% of no padding at all
    for impl in ("best_fit", "pack_until_overflow"):
        bins = pack(lengths, 2049, impl)
        assert sorted(np.concatenate(bins).tolist()) == list(range(4000))
        assert max(lengths[b].sum() for b in bins) <= 2049


def test_other_conversations_do_not_change_a_conversations_logits(chat_data, single_rank):
    """Same sample with one conversation's tokens replaced: the other conversations' logits stay (1e-6)."""
    from test_doc_mask import tiny_config

    from megatron.model.llama import build_model

    tokens_ds, labels_ds, _ = chat_data
    ds = PackedDocumentsDataset(tokens_ds, "p", 100, SEQ, 7, "best_fit", EOD, labels=labels_ds, boundary_id=EOT)
    sample = next(ds[i]["tokens"] for i in range(100) if sum(len(t) > 1 for t, _ in segments(
        ds[i]["tokens"], ds[i]["labels"])) >= 3)
    cfg = tiny_config(reset_position_ids=True, reset_attention_mask=True, eod_token_id=EOD)
    model = build_model(cfg, single_rank).eval()
    first_end = int(np.flatnonzero(sample == EOD)[0]) + 1
    changed = sample.copy()
    changed[1 : first_end - 1] = (changed[1 : first_end - 1] * 7 + 3) % 90 + 10  # other text, same length
    with torch.no_grad():
        a = model(torch.from_numpy(sample[None, :-1]))
        b = model(torch.from_numpy(changed[None, :-1]))
    assert not torch.allclose(a[:, :first_end], b[:, :first_end])  # the changed conversation (its EOD included)
    torch.testing.assert_close(a[:, first_end:], b[:, first_end:], atol=1e-6, rtol=0)


def test_the_packing_is_cached_reloaded_and_rebuilt_when_damaged(chat_data, tmp_path):
    """The first build writes the packing under cache_dir; the next start memory-maps it (same samples, same
    stats); a damaged array file reads as invalid and is rebuilt; another seed is another cache entry."""
    tokens_ds, labels_ds, _ = chat_data

    def build(seed=7):
        return PackedDocumentsDataset(tokens_ds, "p", 50, SEQ, seed, "best_fit", EOD, labels=labels_ds,
                                      boundary_id=EOT, cache_dir=str(tmp_path))

    first = build()
    want = [first[i]["tokens"] for i in range(50)]  # copies: `first` memory-maps the files damaged below
    files = sorted(tmp_path.glob("p_best_fit_*"))
    assert len(files) == 6  # five arrays and the description written last
    again = build()
    assert isinstance(again.members, np.memmap) and again.stats == first.stats
    for i in range(50):
        assert np.array_equal(again[i]["tokens"], first[i]["tokens"])
        assert np.array_equal(again[i]["labels"], first[i]["labels"])
    members = next(f for f in files if f.name.endswith("_members.npy"))
    good = members.read_bytes()
    members.write_bytes(good[:-8] + b"\xff" * 8)  # damaged: its checksum no longer matches
    rebuilt = build()
    assert members.read_bytes() == good  # packed again and saved again, not served damaged
    assert all(np.array_equal(rebuilt[i]["tokens"], want[i]) for i in range(50))
    build(seed=8)
    assert len(list(tmp_path.glob("p_best_fit_*_description.json"))) == 2
