"""Document boundaries inside packed samples: document ids, per-document positions, and attention that stays
inside a document (`reset_position_ids`, `reset_attention_mask`).

A packed sample concatenates documents, each ended by the tokenizer's EOD token. The token after an EOD starts a
new document and the EOD belongs to the document it ends: megatron-core's `_get_ltor_masks_and_position_ids`
semantics (tests/test_doc_mask.py compares the two). Everything is derived from one small int32 tensor, the
document ids [batch, seq], which the embedding stage computes from the tokens and which travels with the hidden
states through the pipeline stages (see llama.py):

* positions restart at 0 at each document start, and RoPE gathers its cos/sin rows by position;
* a query attends to a key iff the key is not after it and both are in the same document. On CUDA this runs as
  FlexAttention with a block mask built from the document ids (no [seq, seq] tensor: blocks entirely outside the
  documents are skipped, blocks entirely inside run unmasked, only blocks on a document edge evaluate the mask);
  elsewhere (CPU tests) and with attention dropout (which FlexAttention lacks) it is SDPA with a dense boolean mask.
  Both compute the same softmax(q k^T / sqrt(d)) v over the same set of keys.

What is derived per micro-batch (positions, cos/sin rows, the mask) is memoised on the document-id tensor, which
every layer of a stage shares, so it is built once per stage and micro-batch rather than once per layer (and again
in a checkpointed layer's recomputation only when the checkpoint function hands the layer a copy of the ids).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from megatron.model import kernels

_derived: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # doc-id tensor -> {what: value}; freed with it


def _memo(doc_ids: torch.Tensor, key, make: Callable):
    entry = _derived.get(doc_ids)
    if entry is None:
        entry = _derived[doc_ids] = {}
    if key not in entry:
        entry[key] = make()
    return entry[key]


def document_ids(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """[b, s] int32: how many EOD tokens come strictly before each position (the EOD ends its own document)."""
    eod = tokens.eq(eod_id).to(torch.int32)
    return eod.cumsum(-1, dtype=torch.int32) - eod


def position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] int64: the offset of each token from the start of its document."""
    s = doc_ids.shape[-1]
    idx = torch.arange(s, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.zeros_like(idx)
    starts[:, 1:] = torch.where(doc_ids[:, 1:] != doc_ids[:, :-1], idx[:, 1:], 0)
    return idx - starts.cummax(-1).values


def dense_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query i may attend to key j (j <= i, same document)."""
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)).logical_and_(causal).unsqueeze(1)


def rope_tables(rotary, doc_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [b, 1, s, head_dim] at each token's position within its document (rows of the shared tables)."""

    def make():
        pos = _memo(doc_ids, "positions", lambda: position_ids(doc_ids))
        cos, sin = rotary(doc_ids.shape[-1], doc_ids.device, dtype)
        return cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)

    return _memo(doc_ids, ("rope", rotary.head_dim, rotary.theta, rotary.scaling, dtype), make)


# ---- FlexAttention (CUDA) ----------------------------------------------------------------------------------------
_flex_fns: dict[bool, tuple[Callable, Callable]] = {}


def _flex(compiled: bool):
    """(create_block_mask, flex_attention), compiled for CUDA; eager ones (a reference implementation that
    materialises the scores) let the CPU tests check the same block-mask maths."""
    if compiled not in _flex_fns:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if compiled:
            create_block_mask = torch.compile(create_block_mask)
            flex_attention = torch.compile(flex_attention, dynamic=False)
        _flex_fns[compiled] = (create_block_mask, flex_attention)
    return _flex_fns[compiled]


def block_mask(doc_ids: torch.Tensor, compiled: bool):
    """FlexAttention BlockMask for causal attention within documents (all heads share it)."""

    def make():
        create, _ = _flex(compiled)
        # The mask_mod (kept by the BlockMask) must not hold the memo's key, or the entry would never be freed:
        # capture an alias of the same storage instead.
        ids = doc_ids.detach()

        def same_document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (ids[b, q_idx] == ids[b, kv_idx])

        b, s = ids.shape
        return create(same_document_causal, b, None, s, s, device=ids.device)

    return _memo(doc_ids, ("block_mask", compiled), make)


def flex_applies(backend: str, dropout_p: float) -> bool:
    """Whether document-masked attention on a GPU is FlexAttention (tools/plan.py prices it by the same rule)."""
    return backend != "math" and dropout_p == 0.0


def use_flex(q: torch.Tensor, backend: str, dropout_p: float) -> bool:
    return q.is_cuda and flex_applies(backend, dropout_p)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, *, dropout_p: float,
              enable_gqa: bool, backend: str = "auto", impl: str = "auto") -> torch.Tensor:
    """Causal attention restricted to each token's document. q [b, hq, s, d], k/v [b, hkv, s, d] (hkv divides
    hq); returns [b, hq, s, d]. impl: "auto" (FlexAttention on CUDA unless attention_backend is "math" or
    attention dropout is on, else SDPA with a dense mask), "flex" or "sdpa" (tests)."""
    flex = use_flex(q, backend, dropout_p) if impl == "auto" else impl == "flex"
    if flex:
        if dropout_p:
            raise ValueError("FlexAttention has no attention dropout")
        compiled = q.is_cuda
        _, flex_attention = _flex(compiled)
        return flex_attention(q, k, v, block_mask=block_mask(doc_ids, compiled), enable_gqa=enable_gqa)
    mask = _memo(doc_ids, "dense_mask", lambda: dense_mask(doc_ids))
    with kernels.sdpa_context(backend):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=enable_gqa)
