"""Helpers shared by the GPU-only tests (imported by test modules; pytest puts this folder on sys.path)."""

import socket

import torch


def single_process():
    """Megatron-core and torch.distributed set up for one process on a free local port (once per session)."""
    from megatron.parallel.layout import single_process_layout

    if not torch.distributed.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        single_process_layout(port=port)
