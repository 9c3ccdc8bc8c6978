"""Hugging Face Llama checkpoints ↔ this trainer's DeepSpeed pipeline checkpoints, one tensor (one layer) at a time.

HF → here (`hf_to_neox`): config.json and every shard header are checked first (architecture, tensor names,
shapes, TP/PP divisibility); then, spec by spec (embedding, each layer, final norm, output), the layer's HF tensors
are read, cut into TP shards with the same map initialisation and resharding use (`hf_keys`), and written as
DeepSpeed's `layer_{spec}-model_{tp}-model_states.pt`; then the `mp_rank_{mp}_model_states.pt` files DeepSpeed's
loader opens, `neox_meta.json` (has_optimizer false, source "hf", iteration 0) last, `latest`, and `model.yml`.
Layer files do not depend on PP (they are named by global spec index), so PP only changes the mp_rank files.

Here → HF (`neox_to_hf`): the model keys come from `neox_meta.json` (or the tag's config.yml); the shard plan is
computed from the shapes, so each layer's TP shards are loaded, merged and appended to the open safetensors shard
immediately. Peak memory is about one layer's tensors (a few times, during the merge), never the model.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import yaml
from tqdm import tqdm

from megatron.checkpoint import hf_config, hf_keys, metadata
from megatron.checkpoint.hf_config import ConversionError
from megatron.checkpoint.safetensors_stream import SafetensorsSource, ShardedWriter, shard_plan

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
# Buffers some older HF checkpoints saved; they are recomputed from config.json, never trained.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Modules whose state dict carries megatron-core's `_extra_state` entry (None): DeepSpeed saves it beside the weight.
_MCORE_LINEARS = ("attention.qkv", "attention.dense", "mlp.gate_up", "mlp.down", "linear")
_LAYER_ORDER = ("input_layernorm", "attention.qkv", "attention.dense", "post_attention_layernorm", "mlp.gate_up",
                "mlp.down")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- name maps
def hf_names(num_layers: int, spec: int) -> list[str]:
    """HF tensor names of one pipeline spec, in the order Meta's shards list them."""
    if spec == 0:
        return ["model.embed_tokens.weight"]
    if spec == num_layers + 1:
        return ["model.norm.weight"]
    if spec == num_layers + 2:
        return ["lm_head.weight"]
    p = f"model.layers.{spec - 1}."
    return [p + n for n in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                            "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]


def hf_shapes(keys: dict) -> dict[str, tuple]:
    """Every HF tensor's shape as config.json implies it, and which config fields decide it (for errors)."""
    h, f, v = keys["hidden_size"], keys["intermediate_size"], keys["vocab_size"]
    d = h // keys["num_attention_heads"]
    q, kv = keys["num_attention_heads"] * d, keys["num_kv_heads"] * d
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(keys["num_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})
    return out


def _shape_fields(name: str) -> str:
    for part, fields in (("embed_tokens", "vocab_size, hidden_size"), ("lm_head", "vocab_size, hidden_size"),
                         ("norm", "hidden_size"), ("q_proj", "num_attention_heads, hidden_size"),
                         ("o_proj", "num_attention_heads, hidden_size"),
                         ("k_proj", "num_key_value_heads, hidden_size"), ("v_proj", "num_key_value_heads, hidden_size"),
                         ("mlp", "intermediate_size, hidden_size")):
        if part in name:
            return fields
    return "config.json"


def spec_kind(spec: int, num_layers: int) -> str:
    return ("EmbeddingPipe" if spec == 0 else "FinalNormPipe" if spec == num_layers + 1 else
            "OutputLayerPipe" if spec == num_layers + 2 else "TransformerLayerPipe")


def stage_bounds(num_layers: int, pp: int, method: str = "type:transformer",
                 param_counts: Optional[list[int]] = None) -> list[int]:
    """The spec index where each pipeline stage starts (and the end), as DeepSpeed's PipelineModule computes it."""
    import regex
    from deepspeed.runtime import utils as ds_utils

    n = num_layers + 3
    method = method.lower()
    if method == "uniform":
        return ds_utils.partition_uniform(num_items=n, num_parts=pp)
    if method == "parameters":
        return ds_utils.partition_balanced(weights=param_counts, num_parts=pp)
    if method.startswith("type:"):
        pattern = regex.compile(method.split(":", 1)[1], regex.IGNORECASE)
        weights = [1 if pattern.search(spec_kind(i, num_layers)) else 0 for i in range(n)]
        return ds_utils.partition_balanced(weights=weights, num_parts=pp)
    raise ConversionError(f"pipe partition method {method!r} is not supported (uniform, parameters, type:REGEX)")


def _layer_file_state(state: dict, spec: int) -> OrderedDict:
    """A spec's tensors as DeepSpeed writes them to its layer file: no "{spec}." prefix, module order, and
    megatron-core's `_extra_state` entry (None) after each of its linear layers' weights."""
    local = {k.split(".", 1)[1]: v for k, v in state.items()}

    def module_of(key: str) -> str:
        return key.rsplit(".", 1)[0] if "." in key else ""

    rank = {m: i for i, m in enumerate(_LAYER_ORDER)}
    out = OrderedDict()
    for key in sorted(local, key=lambda k: rank.get(module_of(k), 0)):
        out[key] = local[key].contiguous()
        if module_of(key) in _MCORE_LINEARS:
            out[f"{module_of(key)}._extra_state"] = None
    return out


# ------------------------------------------------------------------------------------------------- HF → here
def read_hf_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: --hf-dir must be a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e})") from None


def check_hf_tensors(src: SafetensorsSource, keys: dict, tied: bool) -> None:
    """Names and shapes of every tensor against config.json, all problems at once."""
    expected = hf_shapes(keys)
    if tied and "lm_head.weight" not in src:
        del expected["lm_head.weight"]  # tie_word_embeddings: the output layer is the embedding
    problems = []
    unknown = sorted(n for n in src.tensors if n not in expected and not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        problems.append(f"{len(unknown)} tensor(s) this Llama model has no place for: " + ", ".join(
            f"{n} ({src.tensors[n].file.name})" for n in unknown[:8]) + (" ..." if len(unknown) > 8 else ""))
    missing = [n for n in expected if n not in src]
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the shards: " + ", ".join(missing[:8])
                        + (" ..." if len(missing) > 8 else ""))
    for name, shape in expected.items():
        info = src.tensors.get(name)
        if info is not None and info.shape != shape:
            problems.append(f"{name} in {info.file.name} has shape {list(info.shape)}, config.json implies "
                            f"{list(shape)} (from {_shape_fields(name)})")
        if info is not None and info.dtype not in ("BF16", "F32", "F16"):
            problems.append(f"{name} in {info.file.name} has dtype {info.dtype}; expected BF16, F16 or F32")
    if problems:
        raise ConversionError(f"{src.dir}: the weights do not match config.json:\n  - " + "\n  - ".join(problems))


def _detect_tokenizer(hf_dir: Path, keys: dict, out_dir: Path) -> dict:
    if keys["vocab_size"] == hf_config.LLAMA3_VOCAB_SIZE:
        return {"tokenizer_type": "Llama3Tokenizer"}
    if (Path(hf_dir) / "tokenizer.json").is_file():
        dest = Path(out_dir) / "tokenizer.json"
        shutil.copyfile(Path(hf_dir) / "tokenizer.json", dest)
        return {"tokenizer_type": "HFTokenizer", "vocab_file": str(dest.resolve())}
    return {}


def _model_yml(keys: dict, tp: int, pp: int, hf_dir: Path, out_dir: Path) -> str:
    cfg = {k: keys[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
                                "intermediate_size", "vocab_size", "max_position_embeddings")}
    cfg.update({"norm": "rmsnorm", "rms_norm_epsilon": keys["rms_norm_epsilon"], "pos_emb": "rotary",
                "rotary_emb_base": keys["rotary_emb_base"]})
    if keys.get("rope_scaling"):
        cfg["rope_scaling"] = dict(keys["rope_scaling"])
    cfg.update({"activation": "swiglu", "no_weight_tying": True, "use_bias_in_attn_linear": False,
                "use_bias_in_mlp": False, "make_vocab_size_divisible_by": keys["make_vocab_size_divisible_by"],
                "model_parallel_size": tp, "pipe_parallel_size": pp})
    for k in ("tokenizer_type", "vocab_file"):
        if keys.get(k):
            cfg[k] = keys[k]
    head = (f"# Model keys of {Path(hf_dir).resolve()}, converted at TP {tp} x PP {pp} by\n"
            f"# tools/ckpts/convert_hf_llama_to_neox.py. Train from these weights with\n"
            f"#   python deepy.py train.py {Path(out_dir) / 'model.yml'} my_run.yml\n"
            f"# where my_run.yml sets `load: {Path(out_dir).resolve()}` (weights only: the run starts at step 0;\n"
            f"# `finetune: true` does the same) plus data, batch, schedule and `save`. Another TP/PP also loads\n"
            f"# (resharded on load); seq_length is yours to choose (<= max_position_embeddings).\n")
    return head + yaml.safe_dump(cfg, sort_keys=False)


def hf_to_neox(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, *,
               make_vocab_size_divisible_by: int = 128, dtype: Optional[str] = None,
               pipe_partition_method: str = "type:transformer", overwrite: bool = False,
               progress: bool = True, log: Callable[[str], None] = _say) -> Path:
    """Convert a HF Llama directory to a checkpoint root `out_dir` (tag global_step0); returns the tag folder."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    hf = read_hf_config(hf_dir)
    keys = hf_config.model_keys_from_hf(hf, str(hf_dir / "config.json"))
    hf_config.check_tp(keys, tp, pp, str(hf_dir / "config.json"))
    src = SafetensorsSource(hf_dir)
    tied = bool(hf.get("tie_word_embeddings", False))
    check_hf_tensors(src, keys, tied)
    if tied:
        log("tie_word_embeddings is true: the output layer starts as a copy of the embedding (this trainer "
            "trains them untied; the export writes lm_head.weight and tie_word_embeddings: false)")
    cast = DTYPES[dtype] if dtype else None

    padded = hf_config.padded_vocab(keys["vocab_size"], make_vocab_size_divisible_by, tp)
    cfg = hf_config.llama_config(keys, padded)
    L = keys["num_layers"]
    tag = metadata.tag_for(0)
    tag_dir = out_dir / tag
    if (out_dir / metadata.LATEST).exists() or tag_dir.exists():
        if not overwrite:
            raise ConversionError(f"{out_dir} already holds a checkpoint; choose another --output-dir or pass "
                                  "--overwrite")
        shutil.rmtree(tag_dir, ignore_errors=True)
        (out_dir / metadata.LATEST).unlink(missing_ok=True)
    tag_dir.mkdir(parents=True)

    names_total = sum(len(hf_names(L, s)) for s in range(L + 3))
    bar = tqdm(total=names_total, desc="hf -> neox", unit="tensor", disable=not progress, dynamic_ncols=True)
    shapes: dict[int, list[OrderedDict]] = {}
    weight_dtype = None
    for spec in range(L + 3):
        full = {}
        for name in hf_names(L, spec):
            read = "model.embed_tokens.weight" if (name == "lm_head.weight" and name not in src) else name
            bar.set_postfix_str(f"{name} ({src.tensors[read].file.name})", refresh=False)
            t = src.get(read)
            full[name] = t.to(cast) if cast is not None else t
            weight_dtype = weight_dtype or full[name].dtype
            bar.update(1)
        shapes[spec] = []
        for r in range(tp):  # one TP rank at a time: at most one layer plus one shard of it in memory
            state = hf_keys.hf_to_pipe_state(full.__getitem__, cfg, r, tp, [spec])
            torch.save(_layer_file_state(state, spec), tag_dir / metadata.layer_file(spec, r))
            shapes[spec].append(OrderedDict((k, v.shape) for k, v in state.items()))
            del state
        del full
    bar.close()

    import deepspeed

    counts = [sum(int(torch.Size(s).numel()) for s in shapes[i][0].values()) for i in range(L + 3)]
    bounds = stage_bounds(L, pp, pipe_partition_method, counts)
    for pp_rank in range(pp):
        for r in range(tp):
            param_shapes = OrderedDict()
            for spec in range(bounds[pp_rank], bounds[pp_rank + 1]):
                param_shapes.update(shapes[spec][r])
            torch.save(_mp_rank_state(param_shapes, tp, pp, deepspeed.__version__),
                       tag_dir / metadata.mp_rank_file(pp_rank * tp + r))

    tok = _detect_tokenizer(hf_dir, keys, out_dir)
    model = {**keys, "padded_vocab_size": padded, "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
             "tokenizer_type": tok.get("tokenizer_type"), "vocab_file": tok.get("vocab_file")}
    meta = metadata.build_meta(iteration=0, consumed_samples=0, tp=tp, pp=pp, dp=1, model=model,
                               has_optimizer=False, source="hf")
    gen_path = hf_dir / "generation_config.json"
    # The source's own config files, so an untouched round trip gives them back exactly (see neox_to_hf).
    meta["hf"] = {"source_dir": str(hf_dir.resolve()), "config": hf,
                  "generation_config": json.loads(gen_path.read_text()) if gen_path.is_file() else None}
    meta["weights_dtype"] = HF_DTYPE_NAMES.get(weight_dtype, str(weight_dtype))
    metadata.write_meta(tag_dir, meta)  # the completeness marker: last file of the tag
    metadata.write_latest(out_dir, tag)
    (out_dir / "model.yml").write_text(_model_yml(model, tp, pp, hf_dir, out_dir))
    if not tok:
        log(f"no tokenizer recorded in model.yml: vocab_size {keys['vocab_size']} is not Llama-3's and {hf_dir} "
            "has no tokenizer.json; set tokenizer_type/vocab_file yourself")
    log(f"wrote {tag_dir} (TP {tp} x PP {pp}, {len(list(tag_dir.glob('layer_*')))} layer files) and "
        f"{out_dir / 'model.yml'}")
    return tag_dir


def _mp_rank_state(param_shapes: OrderedDict, tp: int, pp: int, ds_version: str) -> dict:
    """What DeepSpeed's PipelineEngine writes per model-parallel rank (module=None: weights are in the layer
    files), for a checkpoint with no optimizer, scheduler or progress."""
    return {
        "module": None, "buffer_names": [], "optimizer": None, "param_shapes": [param_shapes],
        "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
        "data_sampler": None, "random_ltd": None, "skipped_steps": 0, "global_steps": 0, "global_samples": 0,
        "dp_world_size": 1, "mp_world_size": tp * pp,
        "checkpoint_parallel_dimensions": {"pp_degree": pp, "tp_degree": tp}, "ds_config": None,
        "ds_version": ds_version, "iteration": 0, "consumed_samples": 0, "data_state": {},
    }


# ------------------------------------------------------------------------------------------------- here → HF
def resolve_tag(input_dir: Path, iteration: Optional[int] = None, log: Callable[[str], None] = _say) -> Path:
    """The tag folder to export: `input_dir` itself if it is one, else the requested or newest complete tag."""
    input_dir = Path(input_dir)
    if (input_dir / metadata.layer_file(0, 0)).is_file():
        if iteration is not None and metadata.tag_iteration(input_dir.name) not in (None, iteration):
            raise ConversionError(f"{input_dir} is the checkpoint of step {metadata.tag_iteration(input_dir.name)}, "
                                  f"not {iteration}")
        return input_dir
    if not input_dir.is_dir():
        raise ConversionError(f"{input_dir} does not exist")
    wanted = metadata.tag_for(iteration) if iteration is not None else None
    if wanted is not None and (input_dir / wanted).is_dir() and not metadata.is_complete(input_dir / wanted):
        if not (input_dir / wanted / "config.yml").is_file():
            raise ConversionError(f"{input_dir / wanted} is incomplete (no {metadata.META_NAME}): its save was "
                                  "interrupted")
        log(f"warning: {input_dir / wanted} has no {metadata.META_NAME} (an older trainer, or an interrupted "
            "save); its files are checked one by one")
        return input_dir / wanted
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tag = metadata.find_loadable_tag(input_dir, wanted)
    except FileNotFoundError as e:
        if wanted is not None and not (input_dir / wanted).exists():
            steps = [metadata.tag_iteration(t) for t in metadata.complete_tags(input_dir)]
            raise ConversionError(f"{input_dir} has no checkpoint of step {iteration}; complete steps: "
                                  f"{', '.join(map(str, steps)) or 'none'}") from None
        raise ConversionError(str(e)) from None
    if tag is not None:
        for w in caught:  # e.g. a newer tag whose save was interrupted, skipped for this one
            log(f"warning: {w.message}")
        return input_dir / tag
    # Checkpoints written before the trainer wrote neox_meta.json: newest tag with its config.yml.
    legacy = [p for p in metadata.step_dirs(input_dir)
              if (p / "config.yml").is_file() and (p / metadata.layer_file(0, 0)).is_file()]
    if legacy:
        log(f"warning: {legacy[-1]} has no {metadata.META_NAME} (an older trainer, or an interrupted save); "
            "its files are checked one by one")
        return legacy[-1]
    found = sorted(p.name for p in input_dir.iterdir())[:8]
    raise ConversionError(f"{input_dir}: no checkpoint found (expected global_stepN folders or a tag folder with "
                          f"{metadata.layer_file(0, 0)}; found {found})")


def _load_layer(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise ConversionError(f"checkpoint file {path} is missing") from None
    except Exception as e:
        raise ConversionError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {e})") from None


def read_neox_model(tag_dir: Path) -> tuple[dict, Optional[dict]]:
    """(model keys, meta or None) of a tag folder."""
    meta = metadata.read_meta(tag_dir) if metadata.is_complete(tag_dir) else None
    if meta is not None and meta.get("model"):
        return hf_config.model_keys_from_neox(meta["model"], str(tag_dir / metadata.META_NAME)), meta
    cfg_path = tag_dir / "config.yml"
    if not cfg_path.is_file():
        raise ConversionError(f"{tag_dir}: neither {metadata.META_NAME} with model keys nor config.yml; "
                              "the model shape is unknown")
    return hf_config.model_keys_from_neox(yaml.safe_load(cfg_path.read_text()), str(cfg_path)), meta


def _checkpoint_tp(tag_dir: Path, meta: Optional[dict], num_layers: int) -> int:
    files = sorted(tag_dir.glob("layer_00-model_*-model_states.pt"))
    tp = len(files)
    if meta is not None and meta.get("layout", {}).get("tp") not in (None, tp):
        raise ConversionError(f"{tag_dir}: {metadata.META_NAME} says TP {meta['layout']['tp']} but there are {tp} "
                              f"embedding shards (layer_00-model_*): files are missing")
    if tp == 0:
        raise ConversionError(f"{tag_dir}: no layer files ({metadata.layer_file(0, 0)} ...)")
    missing = [metadata.layer_file(s, r) for s in range(num_layers + 3) for r in range(tp)
               if not (tag_dir / metadata.layer_file(s, r)).is_file()]
    if missing:
        raise ConversionError(f"{tag_dir}: {len(missing)} layer file(s) missing for TP {tp}, "
                              f"{num_layers} layers: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    return tp


def _expected_shard_shapes(cfg, tp: int, spec: int) -> dict:
    """Shapes of one TP rank's tensors for a spec, from the same map as the conversion (on the meta device)."""
    shapes = hf_shapes({"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                        "vocab_size": cfg.vocab_size, "num_attention_heads": cfg.num_attention_heads,
                        "num_kv_heads": cfg.num_kv_heads, "num_layers": cfg.num_layers})
    state = hf_keys.hf_to_pipe_state(lambda n: torch.empty(shapes[n], device="meta"), cfg, 0, tp, [spec])
    return {k: tuple(v.shape) for k, v in state.items()}


def _hf_out_config(keys: dict, meta: Optional[dict], dtype_name: str) -> tuple[dict, dict]:
    """config.json and generation_config.json for the export."""
    try:
        import transformers

        version = transformers.__version__
    except ImportError:
        version = None
    stored = (meta or {}).get("hf") or {}
    src = stored.get("config")
    if src is not None:
        try:
            same = hf_config.same_model(hf_config.model_keys_from_hf(src), keys)
        except ConversionError:
            same = False
        if same:  # weights of the same shape as the source's: give its config back, key for key
            out = dict(src)
            out["tie_word_embeddings"] = False  # lm_head.weight is always written
            for k in ("torch_dtype", "dtype"):
                if k in out:
                    out[k] = dtype_name
            if "torch_dtype" not in out and "dtype" not in out:
                out["torch_dtype"] = dtype_name
            gen = stored.get("generation_config") or hf_config.generation_config(
                out.get("bos_token_id"), out.get("eos_token_id"), version)
            return out, gen
    out = hf_config.hf_config_from_keys(keys, dtype_name, version)
    return out, hf_config.generation_config(out["bos_token_id"], out["eos_token_id"], version)


@dataclass
class NeoxCheckpoint:
    """A checkpoint tag folder of this trainer, checked and ready to stream (see `open_neox_checkpoint`)."""

    tag_dir: Path
    keys: dict  # model keys (hf_config's names)
    meta: Optional[dict]  # neox_meta.json, or None for a checkpoint of an older trainer
    tp: int
    dtype: torch.dtype  # the weights' dtype as saved
    cfg: object  # megatron.model.config.LlamaConfig with the checkpoint's padded vocabulary

    @property
    def iteration(self) -> Optional[int]:
        if self.meta is not None and self.meta.get("iteration") is not None:
            return int(self.meta["iteration"])
        return metadata.tag_iteration(self.tag_dir.name)


def open_neox_checkpoint(input_dir: str | Path, iteration: Optional[int] = None,
                         log: Callable[[str], None] = _say) -> NeoxCheckpoint:
    """Resolve `input_dir` (a checkpoint root or a tag folder) to one tag and check its layout: model keys, TP
    from the layer files, every layer file present, the embedding at least vocab_size rows."""
    tag_dir = resolve_tag(Path(input_dir), iteration, log)
    keys, meta = read_neox_model(tag_dir)
    L = keys["num_layers"]
    tp = _checkpoint_tp(tag_dir, meta, L)
    emb = _load_layer(tag_dir / metadata.layer_file(0, 0))["word_embeddings.weight"]
    padded = emb.shape[0] * tp
    if padded < keys["vocab_size"]:
        raise ConversionError(f"{tag_dir / metadata.layer_file(0, 0)}: {tp} x {emb.shape[0]} embedding rows, fewer "
                              f"than vocab_size {keys['vocab_size']}")
    return NeoxCheckpoint(tag_dir, keys, meta, tp, emb.dtype, hf_config.llama_config(keys, padded))


def iter_hf_tensors(ckpt: NeoxCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of every weight, spec by spec in Meta's order: each spec's TP shards are loaded,
    checked against the shapes the conversion map implies, merged, and dropped before the next spec. Shared by the
    HF export (`neox_to_hf`) and the in-memory inference loader (megatron/generation/loading.py)."""
    tag_dir, cfg, tp, meta = ckpt.tag_dir, ckpt.cfg, ckpt.tp, ckpt.meta
    L = ckpt.keys["num_layers"]
    for spec in range(L + 3):
        expected = _expected_shard_shapes(cfg, tp, spec)
        shards = []
        for r in range(tp):
            path = tag_dir / metadata.layer_file(spec, r)
            sd = {f"{spec}.{k}": v for k, v in _load_layer(path).items() if torch.is_tensor(v)}
            for name, shape in expected.items():
                if name not in sd:
                    raise ConversionError(f"{path}: tensor {name.split('.', 1)[1]} is missing (has "
                                          f"{sorted(k.split('.', 1)[1] for k in sd)})")
                if tuple(sd[name].shape) != shape:
                    raise ConversionError(f"{path}: {name.split('.', 1)[1]} has shape {list(sd[name].shape)}, "
                                          f"expected {list(shape)} for TP {tp} and the model keys in "
                                          f"{metadata.META_NAME if meta else 'config.yml'}")
            unknown = sorted(set(sd) - set(expected))
            if unknown:
                raise ConversionError(f"{path}: unknown tensors {[k.split('.', 1)[1] for k in unknown]}")
            shards.append(sd)
        hf = hf_keys.pipe_to_hf_state(shards, cfg, [spec])
        del shards
        for name in hf_names(L, spec):
            yield name, hf.pop(name)


def hf_out_config(ckpt: NeoxCheckpoint, dtype_name: str) -> tuple[dict, dict]:
    """config.json and generation_config.json of the checkpoint as an HF model (a base model's eos)."""
    return _hf_out_config(ckpt.keys, ckpt.meta, dtype_name)


def neox_to_hf(input_dir: str | Path, out_dir: str | Path, *, iteration: Optional[int] = None,
               dtype: Optional[str] = None, max_shard_size: int = 5 * 10**9, tokenizer: str = "auto",
               overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = _say) -> Path:
    """Export a checkpoint (root or tag folder) to a HF directory. `tokenizer`: "auto" (Llama-3 files when the
    vocabulary is Llama-3's, the run's tokenizer.json for HFTokenizer), "none", or a directory to copy from."""
    out_dir = Path(out_dir)
    ckpt = open_neox_checkpoint(input_dir, iteration, log)
    tag_dir, tp = ckpt.tag_dir, ckpt.tp
    src_dtype = ckpt.dtype
    out_dtype = DTYPES[dtype] if dtype else src_dtype
    if out_dtype not in HF_DTYPE_NAMES:
        raise ConversionError(f"the checkpoint's weights are {src_dtype}; pass --dtype bf16 or fp32")

    final_dir, replacing = out_dir, any(out_dir.glob("*.safetensors")) or (out_dir / "config.json").exists()
    if replacing:
        if not overwrite:
            raise ConversionError(f"{out_dir} already holds a model; choose another --output-dir or pass --overwrite")
        # The new export is written beside the old one and swapped in when complete: interrupted, it leaves the
        # old model whole.
        out_dir = final_dir.with_name(f".{final_dir.name}.partial")
        shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        shards, params, written = _write_hf_folder(ckpt, out_dir, out_dtype, max_shard_size, tokenizer, progress, log)
    except BaseException:
        if replacing:  # the old model stays as it was; the unfinished new one goes
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    if replacing:  # the old folder's other files (a README, tokenizer files kept with --tokenizer none) move over
        metadata.swap_in_folder(out_dir, final_dir, keep=lambda name: not re.fullmatch(
            r"model.*\.safetensors.*|config\.json", name))
    log(f"wrote {final_dir}: {shards} shard(s), {params / 1e6:,.2f}M parameters in {HF_DTYPE_NAMES[out_dtype]}"
        f"{', ' + ', '.join(written) if written else ''} (from {tag_dir}, TP {tp})")
    return final_dir


def _write_hf_folder(ckpt: NeoxCheckpoint, out_dir: Path, out_dtype: torch.dtype, max_shard_size: int, tokenizer: str,
                     progress: bool, log: Callable[[str], None]) -> tuple[int, int, list[str]]:
    """The export's files in `out_dir`: the safetensors shards (streamed, layer by layer), config.json,
    generation_config.json and the tokenizer's. Returns (shards, parameters, tokenizer files written)."""
    from megatron.checkpoint import hf_tokenizer

    keys, L = ckpt.keys, ckpt.keys["num_layers"]
    shapes = hf_shapes(keys)
    order = [(n, shapes[n]) for s in range(L + 3) for n in hf_names(L, s)]
    plan = shard_plan(order, out_dtype, max_shard_size)
    writer = ShardedWriter(out_dir, plan, out_dtype)
    bar = tqdm(total=len(order), desc="neox -> hf", unit="tensor", disable=not progress, dynamic_ncols=True)
    try:
        for name, tensor in iter_hf_tensors(ckpt):
            bar.set_postfix_str(f"{name} -> {writer.order[writer.pos][0] + 1}/{len(plan)}", refresh=False)
            writer.write(name, tensor)
            del tensor
            bar.update(1)
        bar.close()
        writer.close()
    except BaseException:  # a corrupt layer file, an interrupt: no half-written shard is left behind
        bar.close()  # (ends the bar's line: the error is printed on its own)
        writer.abort()
        raise

    dtype_name = HF_DTYPE_NAMES[out_dtype]
    config, gen = hf_out_config(ckpt, dtype_name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    written = []
    ttype = keys.get("tokenizer_type")
    if tokenizer not in ("auto", "none"):
        written = hf_tokenizer.copy_tokenizer(Path(tokenizer), out_dir)
    elif tokenizer == "auto":
        if ttype in (None, "Llama3Tokenizer") and keys["vocab_size"] == hf_config.LLAMA3_VOCAB_SIZE:
            written = hf_tokenizer.write_llama3_tokenizer(out_dir, keys.get("vocab_file"))
        elif ttype == "HFTokenizer" and keys.get("vocab_file") and Path(keys["vocab_file"]).is_file():
            written = hf_tokenizer.write_tokenizer_json(Path(keys["vocab_file"]), out_dir)
        else:
            log(f"no tokenizer files written: vocab_size {keys['vocab_size']} ({ttype or 'no tokenizer_type'}) is "
                f"not the Llama-3 tokenizer's {hf_config.LLAMA3_VOCAB_SIZE}; pass --tokenizer-dir to copy them")
    return len(plan), writer.total_params, written


def peak_rss_bytes() -> int:
    """This process's peak resident set size. Linux: VmHWM, the high-water mark of this process image (getrusage's
    ru_maxrss would also count the parent's resident set at fork time, e.g. a test runner's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


def run_cli(fn: Callable[[], object]) -> int:
    """Run a converter; a ConversionError is a user error: print it without a traceback and exit 2."""
    try:
        fn()
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

