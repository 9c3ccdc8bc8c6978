"""The fast paths of preprocessing and index building give exactly what the straightforward versions give."""

import random

import numpy as np
import pytest

from megatron.data import gpt_dataset, tokenizer
from megatron.data.preprocess import records_of
from megatron.data.readers import RawChunk, iter_jsonl, iter_jsonl_chunks


def _split_exact(text: str) -> list[str]:
    """split_for_tiktoken without the cheap pre-check: the regex decides every chunk."""
    pieces = []
    for start in range(0, len(text), tokenizer.TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = text[start : start + tokenizer.TIKTOKEN_MAX_ENCODE_CHARS]
        piece_start = 0
        for match in tokenizer._LONG_RUN.finditer(chunk):
            run_start = match.start()
            run_re = tokenizer._SPACE_RUN if chunk[run_start].isspace() else tokenizer._NON_SPACE_RUN
            run_end = run_re.match(chunk, run_start).end()
            for cut in range(run_start + tokenizer.MAX_CONSECUTIVE_RUN_CHARS, run_end,
                             tokenizer.MAX_CONSECUTIVE_RUN_CHARS):
                pieces.append(chunk[piece_start:cut])
                piece_start = cut
        pieces.append(chunk[piece_start:])
    return pieces


def test_long_run_precheck_never_misses_a_cut():
    rng = random.Random(1)
    limit = tokenizer.MAX_CONSECUTIVE_RUN_CHARS
    # Runs just below, at and above the limit, of spaces, tabs, NBSP (whitespace without ' ' or '\n') and
    # letters, at every alignment relative to the 12.5k-character blocks, inside texts of up to ~900k chars.
    for _ in range(60):
        parts = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.choice(["x", " ", "\t", "\u00a0", "\n", "word "])
            n = rng.choice([limit - 1, limit, limit + 1, 2 * limit + 3, rng.randint(1, 3 * limit)])
            parts.append(kind * (n // len(kind)))
        text = "".join(parts)[: rng.randint(1, 900_000)]
        assert list(tokenizer.split_for_tiktoken(text)) == _split_exact(text)


def test_encode_to_array_matches_encode(llama3):
    texts = ["", "hello world", "<|eot_id|> <|begin_of_text|>", "ünï " * 1000, "y" * 80_000, " " * 30_000 + "z"]
    for text in texts:
        array = llama3.encode_to_array(text)
        assert array.ndim == 1 and array.tolist() == llama3.encode(text)


@pytest.mark.parametrize("max_lines", [1, 3, 1000])
@pytest.mark.parametrize("max_bytes", [1, 40, 1 << 20])
def test_jsonl_chunks_give_the_same_records(tmp_path, max_lines, max_bytes):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n  \n{"text": "b"}\r\nnot json\n' + b'{"text": "%d"}\n' * 7 + b'{"text": "last"}')
    expected = list(iter_jsonl(str(path)))
    chunks = list(iter_jsonl_chunks(str(path), max_lines, max_bytes))
    got = [r for chunk in chunks for r in records_of(chunk)]
    assert [(r.source, r.line, r.payload.rstrip(b"\n")) for r in expected] == [
        (r.source, r.line, r.payload) for r in got]
    assert all(isinstance(c, RawChunk) and c.data for c in chunks)
    assert all(c.data.count(b"\n") <= max_lines for c in chunks)


def _both(lengths, num_samples, seq_length, seed=0):
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.arange(len(lengths), dtype=np.int64)
    fast = gpt_dataset.build_sample_indices(lengths, ids, num_samples, seq_length, seed)
    helpers = gpt_dataset._helpers
    try:
        gpt_dataset._helpers = None  # force numpy
        slow = gpt_dataset.build_sample_indices(lengths, ids, num_samples, seq_length, seed)
    finally:
        gpt_dataset._helpers = helpers
    return fast, slow


def test_compiled_sample_index_equals_numpy():
    if gpt_dataset._megatron_core_helpers() is None:
        pytest.skip("megatron-core's helpers_cpp is not available")
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        lengths = rng.integers(0, 40, n)
        lengths[rng.random(n) < 0.3] = 0  # many empty documents, leading and trailing ones included
        if lengths.sum() < 2:
            lengths[-1] = 2
        seq = int(rng.integers(2, 50))
        total = int(lengths.sum())
        num_samples = int(rng.integers(1, max(2, 3 * total // seq)))
        fast, slow = _both(lengths, num_samples, seq, seed=trial)
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype and np.array_equal(a, b), (trial, lengths.tolist(), num_samples, seq)


def test_compiled_sample_index_equals_numpy_large():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 800, 200_000)
    num_samples = int(2 * lengths.sum() // 2048)  # exactly two epochs' worth: the last window ends the stream
    for a, b in zip(*_both(lengths, num_samples, 2048)):
        assert np.array_equal(a, b)
