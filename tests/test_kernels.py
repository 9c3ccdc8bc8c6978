"""The TP-1 cross-entropy kernel against megatron-core's vocab-parallel cross-entropy (the reference path used at
TP > 1), values and gradients, including pad columns masked to the dtype minimum."""

import torch
from megatron.core import tensor_parallel

from megatron.model import kernels


def test_cross_entropy_matches_megatron_core(single_rank):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 300) * 3
    logits[..., 290:] = torch.finfo(logits.dtype).min  # padded vocab columns, as OutputLayer masks them
    labels = torch.randint(0, 290, (2, 7))
    weights = torch.rand(2, 7)  # a non-uniform upstream gradient

    ours_in = logits.clone().requires_grad_(True)
    ours = kernels.cross_entropy(ours_in, labels, fuse=False)
    (ours * weights).sum().backward()

    ref_in = logits.clone().requires_grad_(True)
    ref = tensor_parallel.vocab_parallel_cross_entropy(ref_in, labels)
    (ref * weights).sum().backward()

    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-6, atol=1e-6)
    assert ours_in.grad[..., 290:].abs().max() == 0


def test_cross_entropy_keeps_low_precision_logits_unexpanded(single_rank):
    logits = torch.randn(1, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 64, (1, 5))
    loss = kernels.cross_entropy(logits, labels, fuse=False)
    assert loss.dtype == torch.float32  # reduced in fp32
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ref = torch.nn.functional.cross_entropy(logits.float().view(-1, 64), labels.view(-1), reduction="none")
    torch.testing.assert_close(loss.view(-1), ref, rtol=1e-5, atol=1e-5)
