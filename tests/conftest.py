import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_rank():
    """A one-process gloo world with megatron-core's parallel state, shared by the in-process model tests."""
    from megatron.parallel.layout import single_process_layout

    return single_process_layout(port=free_port())
