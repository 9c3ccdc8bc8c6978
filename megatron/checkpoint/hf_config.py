"""Hugging Face `config.json` of a Llama model ↔ this project's model keys (NeoX config names) ↔ `LlamaConfig`.

The model keys are what `neox_meta.json` stores under "model" and what the converter writes to `model.yml`:
num_layers, hidden_size, num_attention_heads, num_kv_heads, intermediate_size, vocab_size, padded_vocab_size,
make_vocab_size_divisible_by, max_position_embeddings, rms_norm_epsilon, rotary_emb_base, rope_scaling,
and, when known, seq_length, tokenizer_type, vocab_file.

Only Llama-architecture checkpoints are accepted (Llama-2/3/3.1/3.2: RMSNorm, SwiGLU, rotary, no biases); anything
else is refused with the field that disagrees, before a single tensor is read.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron.model.config import LlamaConfig

LLAMA3_VOCAB_SIZE = 128256  # 128000 BPE ranks + 256 special tokens
LLAMA3_BOS_ID, LLAMA3_EOS_ID = 128000, 128001
# <|end_of_text|>, <|eom_id|> (end of a message that calls a tool) and <|eot_id|> (end of a turn): what Meta's
# Llama-3.1-*-Instruct releases list as eos_token_id in config.json and generation_config.json, so that generation
# stops at the end of the assistant's turn.
LLAMA31_CHAT_EOS_IDS = (LLAMA3_EOS_ID, 128008, 128009)
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, with what is wrong and where (file, tensor, shape)."""


def _rope_of(hf: dict) -> tuple[float, Optional[dict]]:
    """(theta, llama3 rope_scaling or None) from either config style: transformers < 5 writes `rope_theta` and
    `rope_scaling` at the top; transformers >= 5 writes `rope_parameters` (theta included)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None:
        return float(theta), None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(f"config.json: rope_scaling type {rope_type!r} is not supported; this trainer "
                              "implements Llama-3.1's `llama3` RoPE scaling (or none)")
    missing = [k for k in ROPE_SCALING_KEYS if k not in scaling]
    if missing:
        raise ConversionError(f"config.json: rope_scaling {scaling} lacks {', '.join(missing)}")
    out = {"rope_type": "llama3", "factor": float(scaling["factor"]),
           "low_freq_factor": float(scaling["low_freq_factor"]),
           "high_freq_factor": float(scaling["high_freq_factor"]),
           "original_max_position_embeddings": int(scaling["original_max_position_embeddings"])}
    return float(theta), out


def model_keys_from_hf(hf: dict, source: str = "config.json") -> dict:
    """The model keys of a HF Llama `config.json`; raises ConversionError for anything this model cannot represent."""
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (arch and "LlamaForCausalLM" not in arch):
        raise ConversionError(f"{source}: architectures {arch}, model_type {hf.get('model_type')!r}: only "
                              "LlamaForCausalLM (model_type 'llama') checkpoints can be converted")
    problems = []
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if key in hf and hf[key] != want:
            problems.append(f"{key} = {hf[key]!r} (this model supports {want!r} only)")
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    problems += [f"{k} is missing" for k in required if k not in hf]
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems))
    h, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if h % heads:
        raise ConversionError(f"{source}: hidden_size {h} is not divisible by num_attention_heads {heads}")
    if hf.get("head_dim") not in (None, h // heads):
        raise ConversionError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads "
                              f"= {h // heads}; this model derives head_dim from the width")
    theta, rope_scaling = _rope_of(hf)
    vocab = int(hf["vocab_size"])
    keys = {
        "num_layers": int(hf["num_hidden_layers"]), "hidden_size": h, "num_attention_heads": heads,
        "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "intermediate_size": int(hf["intermediate_size"]), "vocab_size": vocab,
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "rms_norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)), "rotary_emb_base": theta,
        "rope_scaling": rope_scaling,
    }
    if keys["num_attention_heads"] % keys["num_kv_heads"]:
        raise ConversionError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                              f"{keys['num_kv_heads']}")
    return keys


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Rows of the embedding/output matrices: the same rule as NeoXConfig.padded_vocab_size."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def check_tp(keys: dict, tp: int, pp: int = 1, source: str = "config.json") -> None:
    """The conditions megatron/config/validate.py enforces before launch, reported before any tensor is written."""
    heads, kv, d = keys["num_attention_heads"], keys["num_kv_heads"], keys["hidden_size"] // keys["num_attention_heads"]
    problems = []
    if tp < 1 or pp < 1:
        problems.append(f"TP {tp} and PP {pp} must be >= 1")
    else:
        if heads % tp:
            problems.append(f"TP {tp} does not divide num_attention_heads {heads}")
        if kv % tp and tp % kv:
            problems.append(f"TP {tp} and num_kv_heads {kv} do not divide one another")
        elif tp > kv and d % (tp // kv):
            problems.append(f"TP {tp} shares each kv head over {tp // kv} ranks, which must divide head_dim {d}")
        if keys["intermediate_size"] % tp:
            problems.append(f"TP {tp} does not divide intermediate_size {keys['intermediate_size']}")
        if pp > keys["num_layers"]:
            problems.append(f"PP {pp} is more stages than num_layers {keys['num_layers']}")
    if problems:
        raise ConversionError(f"{source}: cannot lay this model out at TP {tp} x PP {pp}: " + "; ".join(problems))


def llama_config(keys: dict, padded_vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        num_layers=keys["num_layers"], hidden_size=keys["hidden_size"],
        num_attention_heads=keys["num_attention_heads"], num_kv_heads=keys["num_kv_heads"],
        intermediate_size=keys["intermediate_size"], vocab_size=keys["vocab_size"],
        padded_vocab_size=padded_vocab_size, max_position_embeddings=keys["max_position_embeddings"],
        rms_norm_epsilon=keys["rms_norm_epsilon"], rope_theta=keys["rotary_emb_base"],
        rope_scaling=dict(keys["rope_scaling"]) if keys.get("rope_scaling") else None,
    )


def model_keys_from_neox(raw: dict, source: str) -> dict:
    """Model keys from a checkpoint's neox_meta.json "model" or its config.yml (a full NeoX config), with the
    schema's defaults applied (unset num_kv_heads = heads, unset max_position_embeddings = seq_length, unset
    vocab_size = the tokenizer's)."""
    need = ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    missing = [k for k in need if raw.get(k) is None]
    if missing:
        raise ConversionError(f"{source}: model keys {', '.join(missing)} are missing")
    heads = int(raw["num_attention_heads"])
    keys = {
        "num_layers": int(raw["num_layers"]), "hidden_size": int(raw["hidden_size"]), "num_attention_heads": heads,
        "num_kv_heads": int(raw.get("num_kv_heads") or raw.get("kv_heads") or heads),
        "intermediate_size": int(raw["intermediate_size"]),
        "max_position_embeddings": int(raw.get("max_position_embeddings") or raw.get("seq_length") or 2048),
        "rms_norm_epsilon": float(raw.get("rms_norm_epsilon", 1e-5)),
        "rotary_emb_base": float(raw.get("rotary_emb_base", 10000.0)),
        "rope_scaling": _rope_of({"rope_scaling": raw.get("rope_scaling"), "rope_theta": 0})[1],
        "make_vocab_size_divisible_by": int(raw.get("make_vocab_size_divisible_by") or 128),
        "tokenizer_type": raw.get("tokenizer_type"), "vocab_file": raw.get("vocab_file"),
    }
    if raw.get("seq_length"):
        keys["seq_length"] = int(raw["seq_length"])
    vocab = raw.get("vocab_size")
    if vocab is None:
        from megatron.data.tokenizer import build_tokenizer

        # What the trainer does with an unset vocab_size: the tokenizer's own size.
        ttype = keys["tokenizer_type"] or "Llama3Tokenizer"
        vocab = LLAMA3_VOCAB_SIZE if ttype == "Llama3Tokenizer" and not keys["vocab_file"] else \
            build_tokenizer(ttype, keys["vocab_file"]).vocab_size
    keys["vocab_size"] = int(vocab)
    return keys


def special_token_ids(keys: dict) -> tuple[Optional[int], Optional[int]]:
    """bos/eos ids for config.json: the Llama-3 ones for the Llama-3 vocabulary, the tokenizer's for a
    HF/SentencePiece vocab file that can be read, else None (a tiny test vocabulary has no such tokens)."""
    ttype, vfile, vocab = keys.get("tokenizer_type"), keys.get("vocab_file"), keys["vocab_size"]
    if ttype in (None, "Llama3Tokenizer") and vocab == LLAMA3_VOCAB_SIZE:
        return LLAMA3_BOS_ID, LLAMA3_EOS_ID
    if ttype in ("HFTokenizer", "SPMTokenizer") and vfile:
        try:
            from megatron.data.tokenizer import build_tokenizer

            tok = build_tokenizer(ttype, vfile)
        except (OSError, ValueError, ImportError):
            return None, None
        if tok.vocab_size <= vocab:
            return tok.bos_id, tok.eod_id
    return None, None


def hf_config_from_keys(keys: dict, dtype: str, transformers_version: Optional[str] = None) -> dict:
    """config.json in the layout of Meta's Llama-3.1 release (what transformers 4.43+, vLLM and mergekit read;
    transformers 5 reads it too). `dtype` is "bfloat16" or "float32"."""
    bos, eos = special_token_ids(keys)
    h, heads = keys["hidden_size"], keys["num_attention_heads"]
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "head_dim": h // heads,
        "hidden_act": "silu",
        "hidden_size": h,
        "initializer_range": 0.02,
        "intermediate_size": keys["intermediate_size"],
        "max_position_embeddings": keys["max_position_embeddings"],
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": keys["num_layers"],
        "num_key_value_heads": keys["num_kv_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": keys["rms_norm_epsilon"],
        "rope_scaling": dict(keys["rope_scaling"]) if keys.get("rope_scaling") else None,
        "rope_theta": keys["rotary_emb_base"],
        "tie_word_embeddings": False,
        # transformers < 4.56 reads torch_dtype, later versions dtype: write both.
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        "vocab_size": keys["vocab_size"],
    }
    if transformers_version:
        cfg["transformers_version"] = transformers_version
    return cfg


def generation_config(bos: Optional[int], eos: Optional[int], transformers_version: Optional[str] = None) -> dict:
    """Sampling defaults of Meta's Llama-3.1 base release."""
    out = {"bos_token_id": bos, "do_sample": True, "eos_token_id": eos, "temperature": 0.6, "top_p": 0.9}
    if transformers_version:
        out["transformers_version"] = transformers_version
    return out


def chat_generation_config(gen: dict) -> dict:
    """`gen` for an assistant (SFT) model: eos_token_id is LLAMA31_CHAT_EOS_IDS, as in Meta's
    Llama-3.1-*-Instruct generation_config.json (whose sampling defaults are the base model's: 0.6 / 0.9)."""
    return {**gen, "eos_token_id": list(LLAMA31_CHAT_EOS_IDS)}


SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size", "vocab_size",
              "max_position_embeddings", "rms_norm_epsilon", "rotary_emb_base", "rope_scaling")


def same_model(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in SHAPE_KEYS)
