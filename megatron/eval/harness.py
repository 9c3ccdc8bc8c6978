"""lm-evaluation-harness on this trainer's checkpoints: the lm-eval model "neox".

    python tools/eval/harness.py --model neox --model_args path=checkpoints/astrosage_cpt,step=2000 \\
        --tasks hellaswag,arc_easy --batch_size 8 --output_path runs/eval/harness

The model is lm-eval's own `HFLM` (so `loglikelihood`, `loglikelihood_rolling` and `generate_until` are lm-eval's,
batching and caching included) given the transformers model that `megatron.generation.loading.load_model` builds in
memory from a checkpoint of any TP/PP (or an HF folder), and a transformers tokenizer with the same ids as the
project's: the files the HF export writes (`megatron.checkpoint.hf_tokenizer.write_llama3_tokenizer`) for the
Llama-3 vocabulary, the checkpoint's own tokenizer.json otherwise. So a checkpoint scores exactly what its HF export
scores with lm-eval's `hf` model, without an export. No document limit is set here: every document of a task is
scored unless you pass lm-eval's own --limit (GPT-NeoX's adapter scored 10 per task).

model_args: path (required), step, dtype (bf16/fp16/fp32, default as stored), device (cpu/cuda/cuda:N, default
cuda when there is one), chat (true/false: override the base/chat decision), plus any HFLM argument (batch_size,
max_length, add_bos_token, ...).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


def _bool(value) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes")


def hf_tokenizer_for(loaded):
    """A transformers tokenizer giving the ids `loaded.tokenizer` gives."""
    import transformers

    if loaded.kind == "hf":
        return transformers.AutoTokenizer.from_pretrained(loaded.source)
    from megatron.data.tokenizer import HFTokenizer, Llama3Tokenizer

    tok = loaded.tokenizer
    if isinstance(tok, Llama3Tokenizer):
        from megatron.checkpoint.hf_tokenizer import write_llama3_tokenizer

        with tempfile.TemporaryDirectory(prefix="neox_lm_eval_tok_") as tmp:
            write_llama3_tokenizer(Path(tmp))
            return transformers.AutoTokenizer.from_pretrained(tmp)
    if isinstance(tok, HFTokenizer):  # the checkpoint's tokenizer.json, already loaded by `tokenizers`
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok._tok)
    raise ValueError(f"lm-eval needs a transformers tokenizer; export this checkpoint "
                     f"(tools/ckpts/convert_neox_to_hf.py) and use --model hf (tokenizer {tok!r})")


@register_model("neox")
class NeoXLM(HFLM):
    def __init__(self, path: str, step=None, dtype: Optional[str] = None, device: Optional[str] = None,
                 chat=None, **kwargs):
        from megatron.generation.loading import load_model

        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI passes --device cuda by default
        self.loaded = load_model(path, device=device, dtype=dtype, step=None if step is None else int(step),
                                 chat=_bool(chat))
        kwargs.setdefault("max_length", self.loaded.max_length or None)
        super().__init__(pretrained=self.loaded.model, tokenizer=hf_tokenizer_for(self.loaded), device=device,
                         **kwargs)
