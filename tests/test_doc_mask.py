"""Per-document positions and attention in packed samples (reset_position_ids, reset_attention_mask) and the EOD
loss mask (eod_mask_loss): megatron-core's semantics, no attention across a document boundary (logits and
gradients), no change with the flags off or without EODs, checkpointing, and a 2-stage pipeline run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.model import doc_mask
from megatron.model.config import LlamaConfig
from megatron.model.llama import build_model

EOD = 7
VOCAB = 1000


def tiny_config(**kw) -> LlamaConfig:
    base = dict(num_layers=3, hidden_size=64, num_attention_heads=8, num_kv_heads=2, intermediate_size=160,
                vocab_size=VOCAB, padded_vocab_size=1024, max_position_embeddings=512, eod_token_id=EOD,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16})
    return LlamaConfig(**{**base, **kw})


def random_doc(n: int, seed: int) -> torch.Tensor:
    return torch.randint(EOD + 1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def packed_sample() -> tuple[torch.Tensor, list[slice]]:
    """[docA, EOD, docB, EOD, docC] as one row, and each document's span (its closing EOD included)."""
    e = torch.tensor([EOD])
    docs = [torch.cat([random_doc(20, 1), e]), torch.cat([random_doc(30, 2), e]), random_doc(13, 3)]
    spans, start = [], 0
    for d in docs:
        spans.append(slice(start, start + len(d)))
        start += len(d)
    return torch.cat(docs).unsqueeze(0), spans


# ---- semantics: megatron-core's _get_ltor_masks_and_position_ids -----------------------------------------------
def test_ids_positions_mask_and_loss_mask_match_megatron_core():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    from megatron.trainer import _lm_batches

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 12, size=(6, 97))
    rows[rows < 3] = EOD  # ~25% EODs, with runs of consecutive EODs
    rows[1, 0], rows[2, -1], rows[3, :] = EOD, EOD, 11  # EOD first, EOD last, no EOD at all
    tokens = torch.from_numpy(rows)

    inputs, labels = next(_lm_batches([{"tokens": tokens}], eod_mask_id=EOD))
    ids = doc_mask.document_ids(inputs, EOD)
    positions, mask = doc_mask.position_ids(ids), doc_mask.dense_mask(ids)
    for r in range(len(rows)):
        attention_mask, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
            inputs[r], EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True,
            create_attention_mask=True)
        assert torch.equal(positions[r], position_ids)
        assert torch.equal(mask[r, 0], ~attention_mask[0])  # megatron-core's mask is True where masked
        assert torch.equal(labels[r].ne(-100), loss_mask.bool())
        assert torch.equal(labels[r][loss_mask.bool()], tokens[r, 1:][loss_mask.bool()])
    # Without eod_mask_loss the labels are the shifted tokens, untouched.
    assert torch.equal(next(_lm_batches([{"tokens": tokens}]))[1], tokens[:, 1:])


def test_flex_block_mask_attention_equals_dense_mask_sdpa():
    """The CUDA path's maths (a FlexAttention block mask from the document ids), run eagerly on CPU, against the
    dense-mask SDPA path; GQA (8 query heads on 2 kv heads) and a length that is not a multiple of the block."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 150, 16, generator=g) for h in (8, 2, 2))
    ids = doc_mask.document_ids(torch.randint(0, 40, (2, 150), generator=g), 0)
    assert ids[:, -1].min() > 0  # several documents per row
    flex = doc_mask.attention(q, k, v, ids, dropout_p=0.0, enable_gqa=True, impl="flex")
    sdpa = doc_mask.attention(q, k, v, ids, dropout_p=0.0, enable_gqa=True, impl="sdpa")
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_memoised_masks_and_tables_die_with_their_document_ids(single_rank):
    """What is memoised per document-id tensor (block mask, dense mask, positions, RoPE rows) is freed with it:
    no growth over micro-batches (the block mask's mask_mod must not keep its own key alive)."""
    import gc

    model = build_model(tiny_config(reset_position_ids=True, reset_attention_mask=True), single_rank)
    for step in range(3):
        packed, _ = packed_sample()
        ids = doc_mask.document_ids(packed, EOD)
        doc_mask.block_mask(ids, compiled=False)
        model.loss_fn(model(packed), torch.roll(packed, -1, dims=1)).backward()
        del ids
        gc.collect()
        assert len(doc_mask._derived) == 0, step


# ---- the model: no attention across a document boundary --------------------------------------------------------
def test_packed_documents_equal_documents_alone_and_get_no_gradient_across(single_rank):
    packed, spans = packed_sample()
    on = build_model(tiny_config(reset_position_ids=True, reset_attention_mask=True), single_rank).eval()
    off = build_model(tiny_config(), single_rank).eval()  # same seed: the same weights
    with torch.no_grad():
        logits = on(packed)
        for span in spans:  # each document, run alone from position 0 on the plain (flags off) path
            alone = off(packed[:, span])
            diff = (logits[:, span] - alone).abs().max().item()
            assert diff <= 1e-5, f"document {span}: max |logit difference| {diff:.2e}"
        leaky = off(packed)  # without the flags the later documents do see the earlier ones
        assert (leaky[:, spans[1]] - logits[:, spans[1]]).abs().max() > 1e-3

    def grad_of_doc_b_loss_wrt_embeddings(model):
        hidden = model.forward_funcs[0](packed)
        x = hidden[0] if isinstance(hidden, tuple) else hidden
        x = x.detach().requires_grad_(True)
        out = (x, hidden[1]) if isinstance(hidden, tuple) else x
        for layer in model.forward_funcs[1:]:
            out = layer(out)
        labels = torch.full_like(packed, -100)
        b = spans[1]
        labels[:, b.start:b.stop - 1] = packed[:, b.start + 1:b.stop]  # docB's next-token loss
        model.loss_fn(out, labels).backward()
        return x.grad[0]

    grad = grad_of_doc_b_loss_wrt_embeddings(on)
    assert torch.count_nonzero(grad[spans[0]]) == 0  # docA (and its EOD): exactly zero
    assert torch.count_nonzero(grad[spans[2]]) == 0  # docC comes later: causal
    b = spans[1]
    assert grad[b.start:b.stop - 1].norm(dim=-1).min() > 0  # docB's tokens before its EOD all reach its loss
    assert torch.count_nonzero(grad_of_doc_b_loss_wrt_embeddings(off)[spans[0]]) > 0  # the test can see a leak


def test_each_flag_alone(single_rank):
    """reset_position_ids without reset_attention_mask: causal attention over the whole sample (docB sees docA),
    positions restarting at each document (so docA is unaffected). Either flag on an EOD-free sample: today's
    model."""
    packed, spans = packed_sample()
    pos_only = build_model(tiny_config(reset_position_ids=True), single_rank).eval()
    mask_only = build_model(tiny_config(reset_attention_mask=True), single_rank).eval()
    off = build_model(tiny_config(), single_rank).eval()
    plain = random_doc(40, 9).unsqueeze(0)
    with torch.no_grad():
        for model in (pos_only, mask_only):
            assert (model(plain) - off(plain)).abs().max() <= 1e-6  # no EOD: exactly today's model
        a, b = pos_only(packed), off(packed)
        assert (a[:, spans[0]] - b[:, spans[0]]).abs().max() <= 1e-6
        assert (a[:, spans[1]] - b[:, spans[1]]).abs().max() > 1e-4  # (at init RoPE moves logits little)
        # RoPE scores depend on relative positions only, so once attention stays inside a document, restarting
        # its positions changes nothing but rounding (docs/data.md).
        both = build_model(tiny_config(reset_position_ids=True, reset_attention_mask=True), single_rank).eval()
        assert (mask_only(packed) - both(packed)).abs().max() <= 1e-5


def test_checkpointed_layers_pass_document_ids(single_rank):
    """checkpoint_activations with the (hidden, document ids) tuple: same loss and gradients as without."""
    packed, _ = packed_sample()
    labels = torch.roll(packed, -1, dims=1)
    grads = []
    for ckpt in (False, True):
        model = build_model(tiny_config(reset_position_ids=True, reset_attention_mask=True,
                                        checkpoint_activations=ckpt), single_rank)
        loss = model.loss_fn(model(packed), labels)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_eod_id_comes_from_the_tokenizer_through_from_neox(single_rank):
    from megatron.config.schema import NeoXConfig

    cfg = NeoXConfig.model_validate({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                     "num_kv_heads": 2, "intermediate_size": 128, "seq_length": 32,
                                     "reset_attention_mask": True, "eod_mask_loss": True})
    model_cfg = LlamaConfig.from_neox(cfg, 256, torch.float32, eod_token_id=3)
    assert (model_cfg.eod_token_id, model_cfg.reset_attention_mask, model_cfg.reset_position_ids) == (3, True, False)
    no_eod = build_model(LlamaConfig.from_neox(cfg, 256, torch.float32), single_rank)
    with pytest.raises(ValueError, match="eod_token_id"):
        no_eod(torch.zeros(1, 8, dtype=torch.long))


# ---- end to end: deepy.py, 2 pipeline stages, checkpointing, all three flags -----------------------------------
def _word_level_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models

    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    Tokenizer(models.WordLevel(words, unk_token="w1")).save(str(path))


def _packed_corpus(prefix: str, vocab: int, n_docs: int = 300) -> None:
    """Short arithmetic progressions over ids 1..vocab-1, each ended by EOD (0): several documents per sample."""
    from megatron.data.indexed_dataset import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(n_docs):
            start, step, length = rng.integers(0, vocab - 1), rng.integers(1, 4), rng.integers(8, 40)
            w.add_document(np.append(1 + (start + step * np.arange(length)) % (vocab - 1), 0))
        w.finalize()


@pytest.mark.distributed
def test_two_stage_pipeline_with_document_masking_trains(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train_e2e import VOCAB as E2E_VOCAB, run_deepy

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prefix = str(tmp_path / "packed_text_document")
    _packed_corpus(prefix, E2E_VOCAB)
    _word_level_tokenizer(tmp_path / "tokenizer.json", E2E_VOCAB)
    proc = run_deepy(tmp_path, {
        "num_gpus": 2, "pipe_parallel_size": 2, "data_path": prefix, "split": "100,0,0", "eval_iters": 0,
        "tokenizer_type": "HFTokenizer", "vocab_file": str(tmp_path / "tokenizer.json"),
        "reset_position_ids": True, "reset_attention_mask": True, "eod_mask_loss": True,
        "checkpoint_activations": True, "partition_activations": True, "train_iters": 20, "save": None,
        "use_wandb": False, "tensorboard_dir": None,
    })
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TP 1 x PP 2 x DP 1 = 2 ranks" in proc.stdout + proc.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in records if "train/loss" in r]
    # Documents of 8-40 tokens whose first tokens are unpredictable: the loss falls more slowly than in
    # test_train_e2e's long documents (5.35 -> 4.32 over 20 steps when written).
    assert len(train) == 4 and train[-1] < 0.85 * train[0], train
    assert all(later < earlier for earlier, later in zip(train, train[1:])), train
