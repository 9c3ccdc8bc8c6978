"""This model vs Hugging Face's LlamaForCausalLM, same weights: logits equal to 1e-5 in fp32 on CPU.

The sequence runs past the tiny config's original_max_position_embeddings so llama3 RoPE scaling is exercised.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron.checkpoint.hf_keys import hf_to_pipe_state, pipe_to_hf_state  # noqa: E402
from megatron.model.config import LlamaConfig  # noqa: E402
from megatron.model.llama import build_model  # noqa: E402

from hf_reference import ROPE, tiny_hf_llama  # noqa: E402


def _rope_theta(hf_cfg) -> float:
    params = getattr(hf_cfg, "rope_parameters", None) or {}  # transformers >= 5 keeps theta here
    return float(params.get("rope_theta", getattr(hf_cfg, "rope_theta", 0.0)))


def our_config(hf_cfg) -> LlamaConfig:
    return LlamaConfig(
        num_layers=hf_cfg.num_hidden_layers, hidden_size=hf_cfg.hidden_size,
        num_attention_heads=hf_cfg.num_attention_heads, num_kv_heads=hf_cfg.num_key_value_heads,
        intermediate_size=hf_cfg.intermediate_size, vocab_size=hf_cfg.vocab_size, padded_vocab_size=1024,
        max_position_embeddings=hf_cfg.max_position_embeddings, rms_norm_epsilon=hf_cfg.rms_norm_eps,
        rope_theta=_rope_theta(hf_cfg), rope_scaling=dict(ROPE),
    )


def test_logits_match_hf(single_rank):
    hf = tiny_hf_llama(torch_dtype=torch.float32)
    cfg = our_config(hf.config)
    ours = build_model(cfg, single_rank).eval()
    hf_sd = hf.state_dict()
    n_specs = cfg.num_layers + 3
    state = hf_to_pipe_state(hf_sd.__getitem__, cfg, 0, 1, range(n_specs))
    ours.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)[..., :1000]
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-5, f"max |logit difference| {diff:.2e} > 1e-5"
    # Positions past original_max_position_embeddings (32) are where llama3 scaling matters: check them too.
    assert (ref[:, 64:] - got[:, 64:]).abs().max().item() <= 1e-5
    # And the padded vocab rows never win probability mass.
    assert torch.all(ours(tokens)[..., 1000:] < -1e30)


def test_llama3_scaling_differs_from_plain_rope():
    """Guard against a parity test that passes because scaling was a no-op for the tiny config."""
    from megatron.model.rope import llama3_inv_freq

    plain, scaled = llama3_inv_freq(8, 500000.0, None), llama3_inv_freq(8, 500000.0, ROPE)
    assert not torch.allclose(plain, scaled)
    assert torch.allclose(plain[0], scaled[0])  # the highest frequency is kept


def test_hf_round_trip_through_pipe_state_at_tp(single_rank):
    """Sharding then unsharding (TP 1, 2, 4 with kv replication at 4) gives back HF's exact tensors."""
    hf = tiny_hf_llama(torch_dtype=torch.float32)
    cfg = our_config(hf.config)
    sd = hf.state_dict()
    specs = range(cfg.num_layers + 3)
    for tp in (1, 2, 4):
        shards = [hf_to_pipe_state(sd.__getitem__, cfg, r, tp, specs) for r in range(tp)]
        back = pipe_to_hf_state(shards, cfg, specs)
        assert set(back) == set(sd)
        for k, v in sd.items():
            assert torch.equal(back[k], v), (tp, k)
