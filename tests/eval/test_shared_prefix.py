"""The next-token scorer runs the prompt prefix its batch shares (header + two shots) once and only each question's
own tokens after it (megatron/eval/next_token.py). Its logits must be the full forward's, whatever the batch:
rows of different lengths, a second batch reusing the kept prefix cache, a batch with another prefix, a batch
sharing too little to bother."""

import random

import pytest
import torch

from megatron.eval.next_token import MIN_SHARED_PREFIX, common_prefix_length, hf_candidate_logits


@pytest.fixture(scope="module")
def model():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def batch_of(rng, prefix, n):
    return [prefix + [rng.randrange(1000) for _ in range(rng.randrange(1, 80))] for _ in range(n)]


def test_common_prefix_length_leaves_each_row_a_token():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3, 5]]) == 2  # the shorter row keeps its last token
    assert common_prefix_length([[7], [7]]) == 0
    assert common_prefix_length([[1, 2], [3, 2]]) == 0


def test_shared_prefix_logits_equal_the_full_forward(model):
    rng = random.Random(0)
    ids = [5, 6, 7, 8]
    full, shared = hf_candidate_logits(model, share_prefix=False), hf_candidate_logits(model)
    prefix_a = [rng.randrange(1000) for _ in range(300)]
    prefix_b = [rng.randrange(1000) for _ in range(200)]
    batches = [batch_of(rng, prefix_a, 8), batch_of(rng, prefix_a, 3),  # the second reuses the kept cache
               batch_of(rng, prefix_b, 5),  # another prefix: the cache is rebuilt
               batch_of(rng, [1] * (MIN_SHARED_PREFIX - 1), 4)]  # too short to share: one plain forward
    for batch in batches:
        (want, want_lse), (got, got_lse) = full(batch, ids), shared(batch, ids)
        assert torch.allclose(got, want, atol=1e-5, rtol=0) and torch.allclose(got_lse, want_lse, atol=1e-5, rtol=0)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
