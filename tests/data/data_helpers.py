"""Small builders shared by the data tests (imported by name: pytest puts this folder on sys.path)."""

import importlib.util
import os
import sys

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


def run_two_gloo_ranks(target, *args, timeout: float = 60) -> None:
    """Start 2 ranks running target(rank, port, *args) in one gloo world; both must exit 0. Forked when possible,
    so the ranks skip the ~8 s of imports a fresh interpreter would pay."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.distributed as dist

    # A forked child would inherit a world this process already joined (another test's one-rank world) and could
    # not leave it; then pay for a fresh interpreter instead.
    ctx = multiprocessing.get_context("spawn" if dist.is_initialized() else "fork")
    procs = [ctx.Process(target=target, args=(rank, port, *args)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    assert [p.exitcode for p in procs] == [0, 0]



TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools", "datasets")


def load_tool(name: str):
    """tools/datasets/NAME.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_tool", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
