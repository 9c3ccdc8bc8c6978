"""The tiny Hugging Face Llama the parity and converter tests compare against (imported by name: pytest puts
tests/ on sys.path). GQA 8:2, llama3 RoPE scaling with a short original context so the scaling matters."""

import torch
import transformers

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}


def tiny_hf_llama(vocab: int = 1000, layers: int = 3, seed: int = 0, tie: bool = False, **extra):
    torch.manual_seed(seed)
    shape = dict(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
                 rope_scaling=dict(ROPE), rms_norm_eps=1e-5, tie_word_embeddings=tie, attention_bias=False,
                 mlp_bias=False)
    cfg = transformers.LlamaConfig(**{**shape, **extra})  # `extra` may change the shape (e.g. the head count)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: perturb them so a norm mix-up cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model
