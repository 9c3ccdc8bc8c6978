"""Helpers shared by the GPU-only tests (imported by test modules; pytest puts this folder on sys.path)."""

import socket

import pytest
import torch

if not torch.cuda.is_available():
    pytest.exit("tests_gpu needs a CUDA device", returncode=1)

DEV = "cuda"
_LAYOUT = None


def assert_close(a, b, tol: float, floor: float) -> None:
    """max |a - b| within tol x max |b|, with max |b| taken as at least `floor` (so near-zero references are
    compared absolutely at tol x floor)."""
    err = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    assert err <= tol * max(scale, floor), (err, scale)


def single_process():
    """Megatron-core and torch.distributed set up for one process on a free local port (once per session); the
    layout."""
    from megatron.parallel.layout import single_process_layout

    global _LAYOUT
    if _LAYOUT is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        _LAYOUT = single_process_layout(port=port)
    return _LAYOUT
