"""Small builders shared by the data tests (imported by name: pytest puts this folder on sys.path)."""

import numpy as np

from megatron.data.indexed_dataset import IndexedDatasetWriter


def write_dataset(prefix: str, docs: list[np.ndarray], dtype=np.int32) -> str:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
        writer.finalize()
    return prefix


def random_docs(n: int, seed: int = 0, max_len: int = 60, vocab: int = 1000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(0, max_len)).astype(np.int32) for _ in range(n)]
