"""Hugging Face tokenizer files for an exported model, built offline from the Llama-3 tiktoken file.

`tokenizer.json` is the tiktoken BPE (128000 ranks, Llama-3's split regex) converted by transformers'
`TikTokenConverter`, plus Llama-3.1's 256 special tokens and a post-processor that prepends <|begin_of_text|>, as
Meta's release does. `tokenizer_config.json` names the generic `PreTrainedTokenizerFast` class (loadable by
transformers 4.x and 5.x, vLLM, mergekit) and always carries a Llama-3.1 chat template without the tool-use parts;
its eos_token is the base model's <|end_of_text|>. `make_chat_model` turns an export into an assistant model's:
eos_token <|eot_id|> and generation stopping at <|end_of_text|>, <|eom_id|> or <|eot_id|>, as Meta's
Llama-3.1-*-Instruct releases.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from megatron.checkpoint.hf_config import (
    LLAMA3_BOS_ID,
    LLAMA3_EOS_ID,
    LLAMA3_VOCAB_SIZE,
    LLAMA31_CHAT_EOS_IDS,
    chat_generation_config,
)

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
EOT = "<|eot_id|>"  # ends every chat message; an assistant model's eos_token
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")

# <|begin_of_text|>, then per message <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>; the generation
# prompt opens an assistant turn. Content is kept as given, as Meta's reference ChatFormat (llama_models) encodes it
# (Meta's HF template trims it; the tests hold this template to ChatFormat's tokens).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content']"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_llama3_tokenizer(out_dir: Path, vocab_file: Optional[str] = None) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the file names."""
    try:
        from tokenizers import processors
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise RuntimeError(f"writing the tokenizer needs transformers and tokenizers ({e}); "
                           "pip install -r requirements/hf.txt, or pass --no-tokenizer") from None
    from megatron.data.tokenizer import LLAMA3_PAT_STR, LLAMA3_SPECIAL_TOKENS, default_llama3_tokenizer_path

    path = vocab_file or default_llama3_tokenizer_path()
    tok = TikTokenConverter(vocab_file=path, pattern=LLAMA3_PAT_STR,
                            extra_special_tokens=LLAMA3_SPECIAL_TOKENS).converted()
    if tok.get_vocab_size(with_added_tokens=True) != LLAMA3_VOCAB_SIZE or tok.token_to_id(BOS) != LLAMA3_BOS_ID:
        raise RuntimeError(f"{path} does not give the Llama-3 vocabulary ({tok.get_vocab_size()} tokens)")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, LLAMA3_BOS_ID)]),
    ])
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    specials = {LLAMA3_BOS_ID + i: name for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
    config = {
        "added_tokens_decoder": {str(i): {**_token_entry(name), "special": True} for i, name in specials.items()},
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": EOS,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": _token_entry(BOS), "eos_token": _token_entry(EOS)}, indent=2) + "\n")
    assert tok.token_to_id(EOS) == LLAMA3_EOS_ID
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def write_tokenizer_json(vocab_file: Path, out_dir: Path) -> list[str]:
    """A HFTokenizer run's tokenizer.json, with the tokenizer_config.json transformers needs to load it."""
    from tokenizers import Tokenizer

    from megatron.data.tokenizer import HFTokenizer

    ours = HFTokenizer(str(vocab_file))  # the bos/eod choice the trainer made
    tok = Tokenizer.from_file(str(vocab_file))
    shutil.copyfile(vocab_file, Path(out_dir) / "tokenizer.json")
    bos, eos = tok.id_to_token(ours.bos_id), tok.id_to_token(ours.eod_id)
    config = {"bos_token": bos, "eos_token": eos, "clean_up_tokenization_spaces": False,
              "model_input_names": ["input_ids", "attention_mask"], "tokenizer_class": "PreTrainedTokenizerFast"}
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (Path(out_dir) / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": _token_entry(bos), "eos_token": _token_entry(eos)}, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def copy_tokenizer(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy a model directory's tokenizer files (e.g. the base model's own) next to the export."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(out_dir) / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise FileNotFoundError(f"{src_dir} holds no tokenizer.json or tokenizer.model")
    return copied


def make_chat_model(out_dir: Path) -> list[str]:
    """Rewrite an exported Llama-3 model directory as an assistant (SFT) model's, as Meta's Llama-3.1-*-Instruct
    releases ship: eos_token <|eot_id|> in tokenizer_config.json and special_tokens_map.json (a tokenizer
    without a chat template gets CHAT_TEMPLATE), eos_token_id [128001, 128008, 128009] in generation_config.json
    and config.json. Returns the names of the files changed."""
    out_dir = Path(out_dir)
    changed = []

    def rewrite(name: str, edit) -> None:
        path = out_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            path.write_text(json.dumps(edit(data), indent=2, ensure_ascii=False) + "\n")
            changed.append(name)

    def eos_eot(data: dict) -> dict:
        eos = data.get("eos_token")
        data["eos_token"] = {**eos, "content": EOT} if isinstance(eos, dict) else EOT
        return data

    def tokenizer_config(data: dict) -> dict:
        data = eos_eot(data)
        data.setdefault("chat_template", CHAT_TEMPLATE)
        return data

    rewrite("tokenizer_config.json", tokenizer_config)
    rewrite("special_tokens_map.json", eos_eot)
    rewrite("generation_config.json", chat_generation_config)
    rewrite("config.json", lambda cfg: {**cfg, "eos_token_id": list(LLAMA31_CHAT_EOS_IDS)})
    return changed
