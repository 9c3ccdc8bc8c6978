import pytest


@pytest.fixture(scope="session")
def llama3():
    from megatron.data.tokenizer import build_tokenizer

    return build_tokenizer("Llama3Tokenizer")
