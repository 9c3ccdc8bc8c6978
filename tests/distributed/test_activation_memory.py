"""Activation checkpointing: the same loss and gradients, fewer bytes kept for the backward pass (one CPU process).

How memory is measured: a forward pass runs under torch.autograd.graph.saved_tensors_hooks, whose pack hook sees
every tensor autograd saves for the backward pass; bytes are summed once per storage. torch's non-reentrant
checkpoint swaps in its own hooks inside each checkpointed layer (saving nothing there) and keeps the layer's
input alive instead, so those inputs (one [batch, seq, hidden] tensor per checkpointed layer) are added
explicitly. Results for this model are recorded in docs/parallelism.md.
"""

import torch

from megatron.model.config import LlamaConfig
from megatron.model.layers import causal_lm_loss
from megatron.model.llama import build_model

BATCH, SEQ = 4, 256


def config(checkpoint: bool) -> LlamaConfig:
    return LlamaConfig(num_layers=4, hidden_size=256, num_attention_heads=8, num_kv_heads=2, intermediate_size=768,
                       vocab_size=512, padded_vocab_size=512, max_position_embeddings=SEQ, seed=7,
                       checkpoint_activations=checkpoint, checkpoint_num_layers=1)


def forward_backward(cfg: LlamaConfig, layout, tokens: torch.Tensor):
    model = build_model(cfg, layout).train()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    saved = sum(storages.values())
    if cfg.checkpoint_activations:
        saved += cfg.num_layers * BATCH * SEQ * cfg.hidden_size * 4  # the checkpointed layers' fp32 inputs
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, saved


def test_checkpointing_keeps_the_loss_and_saves_activation_memory(single_rank):
    tokens = torch.randint(0, 512, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    loss_off, grads_off, bytes_off = forward_backward(config(False), single_rank, tokens)
    loss_on, grads_on, bytes_on = forward_backward(config(True), single_rank, tokens)
    print(f"saved for backward: {bytes_off / 2**20:.1f} MiB without checkpointing, "
          f"{bytes_on / 2**20:.1f} MiB with it")
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=0, atol=1e-7, msg=name)
    assert bytes_on < 0.5 * bytes_off
