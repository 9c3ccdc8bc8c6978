"""GPU-only branches (run on the GPU machine: `make test-gpu`; CI has no GPU, so these live outside tests/).

Each fast kernel is checked against the plain PyTorch definition that the CPU tests verify against HF:
torch.compile'd RMSNorm / RoPE / SwiGLU / cross-entropy, and the cuDNN and flash SDPA backends. Where a fast path
can silently fall back to a slow one with the same values (SDPA's backend list, compiled code run eagerly), the
test also checks which path ran: values alone would pass either way."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_helpers import DEV, assert_close, single_process
from megatron.model import kernels
from megatron.model.rope import RotaryEmbedding


def _close(a, b, tol):
    assert_close(a, b, tol, floor=1.0)


def test_fused_rms_norm_rope_swiglu_match_eager():
    torch.manual_seed(0)
    x = torch.randn(2, 1024, 4096, device=DEV, dtype=torch.bfloat16)
    w = torch.rand(4096, device=DEV, dtype=torch.bfloat16)
    _close(kernels.fused(kernels.rms_norm, True)(x, w, 1e-5), kernels.rms_norm(x, w, 1e-5), 1e-2)
    q = torch.randn(2, 32, 1024, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 8, 1024, 128, device=DEV, dtype=torch.bfloat16)
    cos, sin = RotaryEmbedding(128, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})(
        1024, torch.device(DEV), torch.bfloat16)
    for a, b in zip(kernels.fused(kernels.rope_qk, True)(q, k, cos, sin), kernels.rope_qk(q, k, cos, sin)):
        _close(a, b, 1e-2)
    gu = torch.randn(2, 1024, 2 * 14336, device=DEV, dtype=torch.bfloat16)
    _close(kernels.fused(kernels.swiglu, True)(gu), kernels.swiglu(gu), 1e-2)


def test_fused_cross_entropy_matches_fp32_reference():
    torch.manual_seed(0)
    logits = (torch.randn(1, 2048, 128256, device=DEV) * 2).to(torch.bfloat16)
    labels = torch.randint(0, 128256, (1, 2048), device=DEV)
    g = torch.rand(1, 2048, device=DEV)
    a = logits.clone().requires_grad_(True)
    loss = kernels.cross_entropy(a, labels, fuse=True)
    (loss * g).sum().backward()
    b = logits.float().clone().requires_grad_(True)
    ref = F.cross_entropy(b.view(-1, 128256), labels.view(-1), reduction="none").view(1, -1)
    (ref * g).sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    _close(a.grad, b.grad, 2e-2)


def _qkv_like_the_model(b: int, s: int, heads: int, kv_heads: int, d: int, dtype=torch.bfloat16):
    """q, k, v as megatron/model/layers.py's Attention makes them: split from the fused qkv matmul's output
    [b, s, (heads + 2 kv_heads) d], viewed per head and transposed to [b, h, s, d] (strided views, not contiguous
    tensors); the fused output is the leaf, so its gradient is the three inputs' gradients."""
    qkv = torch.randn(b, s, (heads + 2 * kv_heads) * d, device=DEV, dtype=dtype).requires_grad_(True)
    q, k, v = torch.split(qkv, [heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return qkv, (q.view(b, s, heads, d).transpose(1, 2), k.view(b, s, kv_heads, d).transpose(1, 2),
                 v.view(b, s, kv_heads, d).transpose(1, 2))


@pytest.mark.parametrize("backend", ["CUDNN_ATTENTION", "FLASH_ATTENTION"])
def test_sdpa_backend_alone_matches_math(backend):
    """That backend and no other: sdpa_kernel with it alone raises "No available kernel" if it rejects the inputs
    (kernels.sdpa_context lists efficient and math attention after it, so the values would match either way). On
    q/k/v laid out as the model lays them out, GQA 32:8 through enable_gqa, causal, forward and backward, against
    math attention in fp32."""
    torch.manual_seed(0)
    b, s, heads, kv_heads, d = 1, 2048, 32, 8, 128
    qkv, (q, k, v) = _qkv_like_the_model(b, s, heads, kv_heads, d)
    g = torch.randn(b, heads, s, d, device=DEV, dtype=torch.bfloat16)
    with sdpa_kernel([getattr(SDPBackend, backend)]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(g)
    ref_qkv = qkv.detach().float().requires_grad_(True)
    rq, rk, rv = torch.split(ref_qkv, [heads * d, kv_heads * d, kv_heads * d], dim=-1)
    rq, rk, rv = (t.view(b, s, -1, d).transpose(1, 2) for t in (rq, rk, rv))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(rq, rk, rv, is_causal=True, enable_gqa=True)
        ref.backward(g.float())
    _close(out, ref, 2e-2)
    sizes = [heads * d, kv_heads * d, kv_heads * d]
    for a, r in zip(qkv.grad.split(sizes, -1), ref_qkv.grad.split(sizes, -1)):
        _close(a, r, 2e-2)  # q, k, v gradients each against its own scale


def test_the_models_attention_layer_runs_cudnn_attention_on_hopper():
    """What a `fast` run executes: the model's Attention layer (megatron/model/layers.py) with attention_backend
    auto, compiled RoPE, bf16, at 8B-width heads (32:8, d 128), forward and backward under the profiler: cuDNN's
    attention forward and backward are the ops that ran (auto prefers cuDNN on Hopper; a silent fallback to flash
    or efficient attention gives the same values)."""
    from torch.profiler import ProfilerActivity, profile

    from megatron.model.config import LlamaConfig
    from megatron.model.layers import Attention

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("attention_backend auto prefers cuDNN on Hopper and later only")
    single_process()
    cfg = LlamaConfig(num_layers=1, hidden_size=4096, num_attention_heads=32, num_kv_heads=8, intermediate_size=14336,
                      vocab_size=1000, padded_vocab_size=1024, max_position_embeddings=8192,
                      params_dtype=torch.bfloat16, fuse_pointwise=True, attention_backend="auto")
    attention = Attention(cfg, 0).to(DEV)
    torch.manual_seed(0)
    x = torch.randn(1, 2048, 4096, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    attention(x).float().sum().backward()  # compiles RoPE outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attention(x).float().sum().backward()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    ran = sorted(n for n in names if "attention" in n.lower())
    assert "aten::_scaled_dot_product_cudnn_attention" in names, ran
    assert "aten::_scaled_dot_product_cudnn_attention_backward" in names, ran


def test_flex_document_attention_matches_dense_mask_sdpa():
    """reset_attention_mask on CUDA: compiled FlexAttention with a block mask from the document ids (what the
    model runs) against SDPA with the dense [s, s] mask (the CPU path), bf16, GQA 32:8, a length that is not a
    multiple of the 128 block; outputs and gradients, and no gradient across a document boundary."""
    from megatron.model import doc_mask

    torch.manual_seed(0)
    b, s = 2, 2000
    tokens = torch.randint(0, 300, (b, s), device=DEV)  # EOD 0: ~7 documents per row
    ids = doc_mask.document_ids(tokens, 0)
    leaves = [torch.randn(b, h, s, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for h in (32, 8, 8)]
    g = torch.randn(b, 32, s, 128, device=DEV, dtype=torch.bfloat16)
    assert doc_mask.use_flex(leaves[0], "auto", 0.0)

    def run(impl, dtype):
        q, k, v = (t.detach().to(dtype).requires_grad_(True) for t in leaves)
        out = doc_mask.attention(q, k, v, ids, dropout_p=0.0, enable_gqa=True, impl=impl)
        (out.float() * g.float()).sum().backward()
        return out, q.grad, k.grad, v.grad

    flex, dense, ref = run("auto", torch.bfloat16), run("sdpa", torch.bfloat16), run("sdpa", torch.float32)
    for a, d, r in zip(flex, dense, ref):
        _close(a, r, 2e-2)
        _close(d, r, 2e-2)

    # Only the second document's outputs get a gradient: keys and values of every other document get exactly 0.
    first_end = int((tokens[0] == 0).nonzero()[0])
    second = ids[0] == 1
    q, k, v = (t.detach().requires_grad_(True) for t in leaves)
    out = doc_mask.attention(q, k, v, ids, dropout_p=0.0, enable_gqa=True)
    out[0][:, second].float().sum().backward()
    assert torch.count_nonzero(k.grad[0][:, : first_end + 1]) == 0 and torch.count_nonzero(v.grad[0][:, ~second]) == 0
    assert torch.count_nonzero(k.grad[0][:, second]) > 0


def test_grad_accum_fusion_uses_one_accumulating_gemm():
    """gradient_accumulation_fusion on CUDA: the probe must pick the single cuBLAS GEMM that adds into the fp32
    buffer (the others cost an extra pass over the weight); its sums match the fp64 product of the bf16 operands,
    at a Llama-3.1-8B MLP shape, as closely as fp32 accumulation allows and far closer than the unfused path (a bf16
    gradient added to the buffer)."""
    from megatron import grad_accum_fusion

    name, fn = grad_accum_fusion.kernel_for(torch.device(DEV))
    assert fn is grad_accum_fusion._gemm_accumulate_in_place, name
    torch.manual_seed(0)
    x = torch.randn(8192, 4096, device=DEV, dtype=torch.bfloat16)
    g = torch.randn(8192, 14336, device=DEV, dtype=torch.bfloat16)
    main_grad = torch.randn(14336, 4096, device=DEV)
    expected = main_grad.double() + 2 * (g.double().t() @ x.double())
    unfused = main_grad + 2 * (g.t() @ x).float()
    ptr = main_grad.data_ptr()
    fn(x, g, main_grad)
    fn(x, g, main_grad)
    assert main_grad.data_ptr() == ptr  # accumulated in place: DeepSpeed's buffer, not a copy
    # Sums of 8,192 products in fp32 land ~1e-5 of the largest value from fp64 (measured on the H100: 1.0e-5);
    # a bf16 result would be ~4e-3 off.
    _close(main_grad, expected, 1e-4)
    err = (main_grad.double() - expected).abs().max().item()
    err_unfused = (unfused.double() - expected).abs().max().item()
    assert err < err_unfused / 20, (err, err_unfused)


def test_fused_embedding_gradient_is_exact_and_deterministic_on_cuda():
    """The fused embedding's backward on CUDA (index_put_ with accumulate into the fp32 main_grad): the rows of the
    8,192 tokens of one micro-batch, real vocabulary size, summed like the fp64 reference and bitwise the same on
    a second run (the sort-based accumulation, unlike an atomic index_add_)."""
    from megatron import grad_accum_fusion

    torch.manual_seed(0)
    ids = torch.randint(0, 2000, (1, 8192), device=DEV)  # a small slice of the vocabulary: many repeats
    g = torch.randn(1, 8192, 4096, device=DEV, dtype=torch.bfloat16)
    weight = torch.nn.Parameter(torch.randn(128256, 4096, device=DEV, dtype=torch.bfloat16))
    runs = []
    for _ in range(2):
        weight.main_grad = torch.zeros(128256, 4096, device=DEV)
        grad_accum_fusion.lookup_accumulating(ids, weight).backward(g)
        assert weight.grad is None
        runs.append(weight.main_grad)
    expected = torch.zeros(2000, 4096, device=DEV, dtype=torch.float64).index_add_(
        0, ids.reshape(-1), g.reshape(-1, 4096).double())
    _close(runs[0][:2000], expected, 1e-6)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("documents", [False, True], ids=["causal", "document-masked"])
def test_selective_recompute_matches_no_checkpointing_on_cuda(documents):
    """recompute_granularity: selective on the GPU path (bf16, cuDNN attention or FlexAttention for packed
    documents, torch.compile'd pointwise ops): the input and weight gradients match the un-checkpointed layer to
    bf16 rounding. torch's checkpoint modes ignore compiled code, so the compiled pointwise ops and compiled
    FlexAttention run compiled, unseen by the policy, and are recomputed whole (the planner prices FlexAttention's
    recompute); cuDNN attention and the matmuls are kept.

    Values alone cannot tell compiled code from the same code run eagerly (Dynamo skips frames under some
    dispatch modes, as selective checkpointing's caching mode is: pytorch#161889, torchtitan#1631), so the
    layer's SwiGLU is a compiled probe that records whether it ran traced, and FlexAttention's warning for an
    uncompiled call is an error."""
    from torch.nn.attention import flex_attention as flex_module

    from megatron.model import recompute
    from megatron.model.config import LlamaConfig
    from megatron.model.layers import TransformerLayer

    single_process()
    cfg = LlamaConfig(num_layers=1, hidden_size=1024, num_attention_heads=8, num_kv_heads=2, intermediate_size=2816,
                      vocab_size=1000, padded_vocab_size=1024, max_position_embeddings=4096,
                      params_dtype=torch.bfloat16, fuse_pointwise=True, eod_token_id=0,
                      reset_position_ids=documents, reset_attention_mask=documents)
    layer = TransformerLayer(cfg, 0).to(DEV)
    traced = []  # one entry per call that ran Python: True while Dynamo traces it, False when it runs eagerly

    def swiglu_probe(gate_up):
        traced.append(torch.compiler.is_compiling())
        return kernels.swiglu(gate_up)

    layer.mlp._act = torch.compile(swiglu_probe, fullgraph=True, dynamic=False)  # as kernels.fused compiles it
    torch.manual_seed(0)
    x = torch.randn(2, 2048, 1024, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    doc_ids = (torch.arange(2048, device=DEV) // 500).expand(2, -1).contiguous().int() if documents else None
    results, runs = [], {}
    for name, run in (("plain", lambda: layer(x, doc_ids)),
                      ("selective", lambda: recompute.checkpoint_selective(layer, x, doc_ids))):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        traced.clear()
        getattr(flex_module, "_WARNINGS_SHOWN", set()).discard("flex_attention_performance")  # warned once only
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="flex_attention called without torch.compile")
            out = run()
            out.backward(g)
        runs[name] = list(traced)
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()}))
    # A compiled call appends what Dynamo traced (True; it replays the append after each call), an eager one
    # False. The forward always completes a call; the recompute may stop inside one (checkpoint's early stop).
    assert runs["plain"] and all(runs["plain"]), runs
    assert runs["selective"] and all(runs["selective"]), f"compiled SwiGLU ran eagerly under selective: {runs}"
    (out_ref, dx_ref, grads_ref), (out_sel, dx_sel, grads_sel) = results
    _close(out_sel, out_ref, 2e-2)
    _close(dx_sel, dx_ref, 2e-2)
    for name, ref in grads_ref.items():
        _close(grads_sel[name], ref, 2e-2)
