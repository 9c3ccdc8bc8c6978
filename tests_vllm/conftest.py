import socket

import pytest


@pytest.fixture(scope="session")
def single_rank():
    """A one-process gloo world with megatron-core's parallel state (as tests/conftest.py's)."""
    from megatron.parallel.layout import single_process_layout

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return single_process_layout(port=port)
