"""Activation checkpointing: the same loss and gradients, fewer bytes kept for the backward pass (one CPU process).

How memory is measured: a forward pass runs under torch.autograd.graph.saved_tensors_hooks, whose pack hook sees
every tensor autograd saves for the backward pass; bytes are summed once per storage. torch's non-reentrant
checkpoint swaps in its own hooks inside each checkpointed layer (saving nothing there) and keeps the layer's
input alive instead, so those inputs (one [batch, seq, hidden] tensor per checkpointed layer) are added
explicitly. Results for this model are recorded in docs/parallelism.md. Selective recompute keeps tensors in a
cache of its own, out of the hooks' sight, so its test counts the storages still alive after the forward pass.
"""

import gc
from dataclasses import replace

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

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


class LiveStorages(TorchDispatchMode):
    """Every storage an op creates inside the block, held weakly: what is still alive afterwards is what the
    forward pass keeps for backward (autograd's saved tensors, checkpoint inputs, the selective-recompute cache)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                seen = self.refs.get(storage.data_ptr())
                if seen is None or seen[0].expired():  # a freed storage's address may be reused
                    self.refs[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def alive(self) -> int:
        gc.collect()
        return sum(n for ref, n in self.refs.values() if not ref.expired())


def test_selective_recompute_keeps_matmul_outputs_and_the_exact_gradients(single_rank):
    """recompute_granularity: selective (megatron/model/recompute.py) gives bitwise the same loss and gradients as
    no checkpointing, and keeps exactly what tools/plan.py says beyond full checkpointing: per layer the matmul
    and attention outputs (planning.selective_kept_bytes), far less than without checkpointing."""
    from megatron import planning

    tokens = torch.randint(0, 512, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("off", "full", "selective"):
        cfg = replace(config(mode != "off"), recompute_granularity="selective" if mode == "selective" else "full")
        model = build_model(cfg, single_rank).train()
        with LiveStorages() as live:
            loss = causal_lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
        kept = live.alive()
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()}, kept)
    loss_off, grads_off, kept_off = results["off"]
    loss_sel, grads_sel, kept_sel = results["selective"]
    kept_full = results["full"][2]
    assert torch.equal(loss_sel, loss_off)
    for name, g in grads_off.items():
        assert torch.equal(grads_sel[name], g), name
    shape = planning.Shape(layers=4, hidden=256, heads=8, kv_heads=2, ffn=768, vocab=512, vocab_multiple=1, seq=SEQ)
    cfg = config(True)
    assert kept_sel - kept_full == cfg.num_layers * planning.selective_kept_bytes(shape, 1, BATCH, 4)
    assert kept_full < kept_sel < 0.7 * kept_off


def test_the_ops_selective_recompute_cannot_do_without_exist():
    """If torch renamed the matmul or the in-place all-reduce, the policy would silently recompute every matmul or
    sum the TP ranks twice; recompute.MISSING names them and checkpoint_selective refuses to run."""
    from megatron.model import recompute

    assert recompute.MISSING == []
    assert torch.ops.c10d.allreduce_.default in recompute.KEEP and torch.ops.aten.mm.default in recompute.KEEP


def test_selective_recompute_refuses_dropout(single_rank):
    """On the GPU a kept fused attention kernel draws attention dropout's random numbers and is not replayed, so a
    replayed hidden dropout after it would draw a different mask than the forward did: silently wrong gradients
    (on CPU attention with dropout is the math path, whose dropout replays in order, so this cannot be shown by
    comparing gradients here). The config refuses it (tests/test_config.py); a model built around the config
    stops at the first random op instead of training on wrong gradients."""
    from megatron.model.recompute import RandomOpError

    tokens = torch.randint(0, 512, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    for dropout in ({"hidden_dropout": 0.1}, {"attention_dropout": 0.1}):
        cfg = replace(config(True), recompute_granularity="selective", **dropout)
        model = build_model(cfg, single_rank).train()
        with pytest.raises(RandomOpError, match="hidden_dropout and attention_dropout to 0"):
            model(tokens[:, :-1])
        model.eval()  # no dropout outside training: evaluation under selective checkpointing is fine
        with torch.no_grad():
            model(tokens[:, :-1])
