"""Load a model to talk to: a checkpoint folder of this trainer (any TP/PP/step) or a Hugging Face model folder.

    from megatron.generation.loading import load_model, ModelLoadError
    lm = load_model("checkpoints/astrosage70b_sft")          # newest complete step; step=N for another
    lm.model      # transformers LlamaForCausalLM, eval mode, on `device`
    lm.tokenizer  # megatron.data.tokenizer.Tokenizer (Llama3Tokenizer for the Llama-3 vocabulary)
    lm.chat       # True: an assistant model, generation stops at <|eot_id|>
    lm.eos_token_ids, lm.kind ("checkpoint" | "hf"), lm.source, lm.step

A checkpoint is streamed into the model in memory, one pipeline spec at a time, through the same code the HF
export uses (`megatron.checkpoint.convert.open_neox_checkpoint` / `iter_hf_tensors`: TP shards merged by
`hf_keys.pipe_to_hf_state`), so what generation sees is exactly what `tools/ckpts/convert_neox_to_hf.py` would
write; no export folder is needed. The model is built on the meta device and each merged tensor is placed once,
so peak memory is about the model plus one layer.

An HF folder (config.json + safetensors) loads with `from_pretrained`, as is.

Whether a model is a chat (assistant) model decides where generation stops:
  * HF folder: its generation_config.json / config.json eos ids include <|eot_id|> (an export with --chat-model,
    or Meta's Instruct releases);
  * checkpoint: it was trained with label datasets (SFT, `train_label_data_paths` in the tag's config.yml);
  * `chat=True/False` overrides both.
A chat model stops at <|end_of_text|>, <|eom_id|> or <|eot_id|> (Meta's Instruct eos_token_id list); a base model
at <|end_of_text|> only.

Every user error (a folder that is neither, a checkpoint whose config is missing, a missing file, a vocabulary the
tokenizer cannot serve) raises `ModelLoadError`, whose message names the path and the fix; the tools print it
and exit 2 without a traceback. This package is for tools only: the trainer never imports it. (It is not
`megatron/inference`: that name belongs to Megatron-LM, see tests/test_imports.py.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import yaml

from megatron.checkpoint import hf_config, metadata

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
EOT_ID = 128009  # <|eot_id|> in the Llama-3 vocabulary


class ModelLoadError(ValueError):
    """A model path that cannot be loaded; the message says which path, what is wrong and how to fix it."""


@dataclass
class LoadedModel:
    """A model ready for `generate`, with what the tools need to prompt it and to know where it stops."""

    # transformers LlamaForCausalLM (any AutoModelForCausalLM for an HF folder), eval mode; None with weights=False
    model: Optional["torch.nn.Module"]
    tokenizer: object  # megatron.data.tokenizer.Tokenizer: encode() without BOS, decode(), bos_id, eod_id
    kind: str  # "checkpoint" | "hf"
    chat: bool  # an assistant model: stops at <|eot_id|>, prompts use the Llama-3.1 chat format
    eos_token_ids: list[int]  # generation stops at any of these
    source: str  # the folder loaded (for a checkpoint: the tag folder, e.g. .../global_step200)
    step: Optional[int] = None  # the checkpoint's iteration; None for an HF folder
    max_length: int = 0  # the model's context (max_position_embeddings)
    vocab_size: int = 0  # rows of the model's embedding that are real tokens
    extra: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where the inputs go (the embedding's device when the model is spread over GPUs)."""
        return self.model.get_input_embeddings().weight.device


def _dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_kind(path: Union[str, Path]) -> str:
    """"hf" for a Hugging Face model folder, "checkpoint" for a checkpoint root or tag folder of this trainer;
    ModelLoadError otherwise."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p} does not exist; pass a checkpoint folder of this trainer (the `save` folder of a "
                             "run, or one global_stepN in it) or a Hugging Face model folder (config.json + "
                             "*.safetensors)")
    if not p.is_dir():
        raise ModelLoadError(f"{p} is a file, not a model folder; pass the folder that holds it (a checkpoint root, "
                             "a global_stepN folder, or a Hugging Face model folder)")
    if (p / "config.json").is_file():
        return "hf"
    if ((p / metadata.LATEST).is_file() or metadata.step_dirs(p) or (p / metadata.layer_file(0, 0)).is_file()
            or (p / metadata.META_NAME).is_file()):
        return "checkpoint"
    found = sorted(x.name for x in p.iterdir())[:8]
    raise ModelLoadError(f"{p} is neither a checkpoint of this trainer (no `latest`, no global_stepN folders, no "
                         f"{metadata.layer_file(0, 0)}) nor a Hugging Face model folder (no config.json); it holds "
                         f"{found or 'nothing'}. Pass a run's `save` folder, a global_stepN folder, or an export of "
                         "tools/ckpts/convert_neox_to_hf.py")


def load_model(path: Union[str, Path], *, device: str = "cpu", dtype=None, step: Optional[int] = None,
               chat: Optional[bool] = None, weights: bool = True,
               log: Callable[[str], None] = lambda msg: None) -> LoadedModel:
    """Load `path` (checkpoint root / tag folder, or HF folder) for generation. `device`: "cpu", "cuda",
    "cuda:N", or "auto" (spread over all GPUs, needs `accelerate`). `dtype`: None keeps the stored weights' dtype;
    "bf16"/"fp16"/"fp32" or a torch.dtype casts. `step`: a checkpoint's iteration (default: newest complete).
    `chat`: force the chat/base decision (see the module docstring). `weights=False`: everything but the model
    (model None), for an engine that reads the weights itself (vLLM). Raises ModelLoadError."""
    kind = model_kind(path)
    torch_dtype = _dtype(dtype)
    from megatron.model.fp8 import torchao_import_noise_silenced

    if kind == "hf" and step is not None:
        raise ModelLoadError(f"{path} is a Hugging Face model folder: it has no steps; drop step={step} "
                             "(--step) or pass a checkpoint folder")
    with torchao_import_noise_silenced():  # transformers imports torchao, if installed, while it builds the model
        if kind == "hf":
            loaded = _load_hf(Path(path), device, torch_dtype, chat, weights)
        else:
            loaded = _load_checkpoint(Path(path), device, torch_dtype, step, chat, log, weights)
    if loaded.model is not None:
        loaded.model.eval()
        loaded.model.generation_config.eos_token_id = list(loaded.eos_token_ids) or None
    return loaded


# --------------------------------------------------------------------------------------------- tokenizers
def _llama3_tokenizer(vocab_file: Optional[str] = None):
    from megatron.data.tokenizer import Llama3Tokenizer

    return Llama3Tokenizer(vocab_file)


def _tokenizer_for_checkpoint(keys: dict, where: Path):
    from megatron.data.tokenizer import build_tokenizer

    ttype = keys.get("tokenizer_type") or "Llama3Tokenizer"
    try:
        return build_tokenizer(ttype, keys.get("vocab_file"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{where}: the checkpoint's tokenizer ({ttype}, vocab_file "
                             f"{keys.get('vocab_file')!r}) cannot be built: {e}. Make the vocab_file readable "
                             "at that path") from None


def _tokenizer_for_hf(path: Path, vocab_size: int):
    """The project's tokenizer for an HF folder: Llama3Tokenizer (the llama-models ranks, ids identical to the
    tokenizer.json this project's exports and Meta's releases ship) for the Llama-3 vocabulary, else the folder's
    tokenizer.json (HFTokenizer) or tokenizer.model (SentencePiece)."""
    from megatron.data.tokenizer import HFTokenizer, SPMTokenizer

    tj = path / "tokenizer.json"
    if vocab_size == hf_config.LLAMA3_VOCAB_SIZE:
        llama3 = not tj.is_file()
        if tj.is_file():
            vocab = json.loads(tj.read_text()).get("added_tokens") or []
            llama3 = any(t.get("content") == "<|eot_id|>" and t.get("id") == EOT_ID for t in vocab)
        if llama3:
            return _llama3_tokenizer()
    try:
        if tj.is_file():
            return HFTokenizer(str(tj))
        if (path / "tokenizer.model").is_file():
            return SPMTokenizer(str(path / "tokenizer.model"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: the tokenizer files cannot be read: {e}") from None
    raise ModelLoadError(f"{path} has no tokenizer.json or tokenizer.model and its vocabulary ({vocab_size} tokens) "
                         "is not Llama-3's; copy the tokenizer files of the model it came from into it")


def _eos_ids(tokenizer, vocab_size: int, chat: bool) -> list[int]:
    if chat:
        ids = list(hf_config.LLAMA31_CHAT_EOS_IDS)
    else:
        ids = [tokenizer.eod_id]
    return [i for i in ids if i is not None and i < vocab_size]


# --------------------------------------------------------------------------------------------- HF folder
def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in (x if isinstance(x, (list, tuple)) else [x])]


def _load_hf(path: Path, device: str, dtype: Optional[torch.dtype], chat: Optional[bool],
             weights: bool = True) -> LoadedModel:
    import transformers

    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelLoadError(f"{path} has config.json but no weights (*.safetensors); is the export complete? "
                             "Re-run tools/ckpts/convert_neox_to_hf.py")
    gen_path = path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    eos = _as_list(gen.get("eos_token_id")) or _as_list(config.get("eos_token_id"))
    vocab = int(config.get("vocab_size", 0))
    tokenizer = _tokenizer_for_hf(path, vocab)
    is_chat = (EOT_ID in eos and vocab == hf_config.LLAMA3_VOCAB_SIZE) if chat is None else chat
    if chat is not None or not eos:
        eos = _eos_ids(tokenizer, vocab, is_chat)
    kwargs = {"dtype": dtype or "auto"}
    model = None
    if weights and device == "auto":
        _need_accelerate(path)
        kwargs["device_map"] = "auto"
    if weights:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{path}: transformers cannot load this model ({type(e).__name__}: {e})") from None
        if device != "auto":
            model.to(device)
    return LoadedModel(model=model, tokenizer=tokenizer, kind="hf", chat=is_chat, eos_token_ids=eos,
                       source=str(path), step=None, max_length=int(config.get("max_position_embeddings") or 0),
                       vocab_size=vocab)


def _need_accelerate(path) -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{path}: device 'auto' (the model spread over all GPUs) needs accelerate: "
                             "pip install -r requirements/vllm.txt, or pass --device cuda") from None


# --------------------------------------------------------------------------------------------- checkpoint
def _trained_as_chat(tag_dir: Path) -> bool:
    """SFT checkpoints were trained on label datasets (loss on assistant tokens)."""
    cfg_path = tag_dir / "config.yml"
    if not cfg_path.is_file():
        return False
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    return bool(cfg.get("train_label_data_paths"))


def _load_checkpoint(path: Path, device: str, dtype: Optional[torch.dtype], step: Optional[int],
                     chat: Optional[bool], log: Callable[[str], None], weights: bool = True) -> LoadedModel:
    import transformers

    from megatron.checkpoint.convert import HF_DTYPE_NAMES, hf_out_config, iter_hf_tensors, open_neox_checkpoint
    from megatron.checkpoint.hf_config import ConversionError

    try:
        ckpt = open_neox_checkpoint(path, step, log)
    except ConversionError as e:
        msg = str(e)
        if "shape is unknown" in msg:
            msg += (f". The checkpoint's config is missing: copy the run's config.yml into {path} (or the tag "
                    "folder), or pass the folder of a complete save")
        raise ModelLoadError(f"{path}: cannot load this checkpoint: {msg}") from None
    keys = ckpt.keys
    tokenizer = _tokenizer_for_checkpoint(keys, ckpt.tag_dir)
    vocab = keys["vocab_size"]
    is_chat = _trained_as_chat(ckpt.tag_dir) if chat is None else chat
    if is_chat and vocab != hf_config.LLAMA3_VOCAB_SIZE:
        raise ModelLoadError(f"{ckpt.tag_dir}: a chat model needs the Llama-3 vocabulary ({hf_config.LLAMA3_VOCAB_SIZE}"
                             f" tokens, with <|eot_id|>); this checkpoint's vocab_size is {vocab}. Use plain "
                             "completion (no --chat)")
    out_dtype = dtype or ckpt.dtype
    if out_dtype not in HF_DTYPE_NAMES:
        raise ModelLoadError(f"{ckpt.tag_dir}: the weights are {ckpt.dtype}; pass --dtype bf16 or fp32")
    common = dict(tokenizer=tokenizer, kind="checkpoint", chat=is_chat,
                  eos_token_ids=_eos_ids(tokenizer, vocab, is_chat), source=str(ckpt.tag_dir), step=ckpt.iteration,
                  max_length=keys["max_position_embeddings"], vocab_size=vocab, extra={"tp": ckpt.tp, "keys": keys})
    if not weights:
        return LoadedModel(model=None, **common)
    config_dict, _ = hf_out_config(ckpt, HF_DTYPE_NAMES[out_dtype])
    config = transformers.LlamaConfig(**{k: v for k, v in config_dict.items()
                                         if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    target = "cpu" if device == "auto" else device
    state = {}
    try:
        for name, tensor in iter_hf_tensors(ckpt):
            state[name] = tensor.to(device=target, dtype=out_dtype, copy=True)
    except ConversionError as e:
        raise ModelLoadError(f"{path}: cannot load this checkpoint: {e}") from None
    model.load_state_dict(state, strict=True, assign=True)
    del state
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: compute them on the target device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(target)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not still_meta, f"tensors left on the meta device: {still_meta}"
    if device == "auto":
        _need_accelerate(path)
        from accelerate import dispatch_model, infer_auto_device_map

        model = dispatch_model(model, infer_auto_device_map(model, no_split_module_classes=["LlamaDecoderLayer"]))
    log(f"loaded {ckpt.tag_dir} (TP {ckpt.tp}, step {ckpt.iteration}) as LlamaForCausalLM in {out_dtype}")
    return LoadedModel(model=model, **common)
