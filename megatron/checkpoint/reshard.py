"""Resume a checkpoint under a different TP / PP / DP layout, optimizer state included.

DeepSpeed's own loader needs the layout it saved with. Here every rank of the new layout instead:
  1. reads, for the pipeline specs it now owns, each tensor kind (weights, fp32 master, Adam's exp_avg and
     exp_avg_sq) from the old layout's files: layer files for weights; ZeRO-1 partitions, reassembled per parameter
     through the `param_slice_mappings` DeepSpeed stores with them, for the rest;
  2. merges the old TP shards into Hugging Face layout and cuts the new shards (`hf_keys`: the same map the
     converters and initialisation use, so every layout means the same model);
  3. writes them into the live engine: weights into the module, master weights and moments through DeepSpeed's
     fragment API (`safe_set_full_*`), which knows the new ZeRO partitioning.
Each rank reads only the stages it needs, so the cost is the size of its own stage(s) in the old layout, not the
whole model. Files are memory-mapped and each is opened once: a spec's tensors are copied out of the mapped ZeRO
partitions one parameter at a time, so the resident memory is a few full layers, not whole old stages (13 GB of
optimizer state per old TP 8 x PP 8 rank of a 70B model). The learning-rate schedule is a pure function of the
step (see the trainer), so nothing else is needed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from megatron.checkpoint import hf_keys, metadata
from megatron.model.config import LlamaConfig

def _load(path: Path, mmap: bool = False) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file {path} is missing: the checkpoint is incomplete or corrupt") from None
    except Exception as e:
        raise RuntimeError(f"checkpoint file {path} cannot be read ({type(e).__name__}: {e}); it is corrupt") from None


class SourceCheckpoint:
    """Per-parameter tensors of a saved checkpoint, by pipeline spec, in the layout it was saved with."""

    def __init__(self, tag_dir: Path, meta: dict, model_cfg: LlamaConfig):
        self.dir = Path(tag_dir)
        lay = meta["layout"]
        self.tp, self.pp, self.dp = lay["tp"], lay["pp"], lay["dp"]
        self.has_optimizer = bool(meta.get("has_optimizer", True))
        # Padded vocab rows depend on TP; the merge strips them, so the source's own padding must be used here.
        self.cfg = model_cfg
        self._step: float | None = None
        self._mp_states: dict[int, dict] = {}
        self._zero_parts: dict[int, list[dict]] = {}
        self._stage_of_spec: dict[int, int] = {}
        for pp_rank in range(self.pp):
            for group in self._mp_state(pp_rank * self.tp).get("param_shapes") or []:
                for name in group:
                    self._stage_of_spec[int(name.split(".", 1)[0])] = pp_rank

    # ---- weights: one layer file per (spec, tp rank)
    def weights(self, spec: int, tp_rank: int) -> dict:
        sd = _load(self.dir / metadata.layer_file(spec, tp_rank), mmap=True)
        return {f"{spec}.{k}": v for k, v in sd.items() if torch.is_tensor(v)}

    # ---- optimizer state of one model-parallel rank: ZeRO partitions over its DP ranks, each file opened once
    def _mp_state(self, mp: int) -> dict:
        if mp not in self._mp_states:
            self._mp_states[mp] = _load(self.dir / metadata.mp_rank_file(mp), mmap=True)
        return self._mp_states[mp]

    def _zero(self, mp: int) -> list[dict]:
        """The optimizer_state_dict of every DP rank's ZeRO-1 file (memory-mapped)."""
        if mp not in self._zero_parts:
            files = [self.dir / metadata.optim_file(d, mp) for d in range(self.dp)]
            self._zero_parts[mp] = [_load(f, mmap=True)["optimizer_state_dict"] for f in files]
        return self._zero_parts[mp]

    def _param_state(self, mp: int, name: str) -> dict:
        """fp32 master weights and Adam moments of one parameter, in its saved (TP-sharded) shape."""
        shapes = self._mp_state(mp)["param_shapes"]
        group = next(g for g, names in enumerate(shapes) if name in names)
        shape = shapes[group][name]
        pieces = {k: [] for k in ("fp32", "exp_avg", "exp_avg_sq")}
        for sd in self._zero(mp):  # DP ranks in order: each holds a contiguous fragment (or none)
            frag = sd["param_slice_mappings"][group].get(name)
            if frag is None:
                continue
            state = sd["base_optimizer_state"]["state"][group]
            flat = {"fp32": sd["single_partition_of_fp32_groups"][group],
                    "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"]}
            for k in pieces:
                pieces[k].append(flat[k].narrow(0, frag.start, frag.numel))
            self._step = float(state["step"])
        return {k: torch.cat(v).view(shape) for k, v in pieces.items()}  # a copy: the mapping is not kept alive

    def shard(self, kind: str, spec: int, tp_rank: int) -> dict:
        weights = self.weights(spec, tp_rank)
        if kind == "weight":
            return weights
        mp = self._stage_of_spec[spec] * self.tp + tp_rank
        return {name: self._param_state(mp, name)[kind] for name in weights}

    def optimizer_step(self) -> float:
        if self._step is None:
            shapes = self._mp_state(0)["param_shapes"]
            self._param_state(0, next(iter(shapes[0])))
        return self._step

    def hf_tensors(self, kind: str, spec: int) -> dict:
        shards = [self.shard(kind, spec, t) for t in range(self.tp)]
        return hf_keys.pipe_to_hf_state(shards, self.cfg, [spec])


def local_tensors(src: SourceCheckpoint, kind: str, cfg: LlamaConfig, specs, tp_rank: int, tp: int) -> dict:
    """This rank's tensors of `kind` for its specs, cut for the new layout."""
    out = {}
    for spec in specs:
        full = src.hf_tensors(kind, spec)
        out.update(hf_keys.hf_to_pipe_state(full.__getitem__, cfg, tp_rank, tp, [spec]))
    return out


def _init_optimizer_state(opt, step: float) -> None:
    """Create Adam's state (DeepSpeed only creates it at the first step) so the fragments can be linked and filled."""
    base = opt.optimizer
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_groups_flat_partition
    fused = bool(base.defaults.get("fused"))
    for flat in flats:
        st = base.state[flat]
        st["step"] = torch.tensor(step, dtype=torch.float32, device=flat.device if fused else "cpu")
        st.setdefault("exp_avg", torch.zeros_like(flat))
        st.setdefault("exp_avg_sq", torch.zeros_like(flat))
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def load_resharded(engine, tag_dir: Path, meta: dict, model_cfg: LlamaConfig, tp_rank: int, tp: int,
                   load_optimizer: bool) -> None:
    """Fill `engine` (built for the new layout) from a checkpoint saved under another layout."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    src_cfg = replace(model_cfg, padded_vocab_size=_padded(model_cfg, meta))
    src = SourceCheckpoint(tag_dir, meta, src_cfg)
    module = engine.module
    specs = range(module._local_start, module._local_stop)
    params = dict(module.named_parameters())
    weights = local_tensors(src, "weight", model_cfg, specs, tp_rank, tp)
    missing = sorted(set(params) - set(weights))
    if missing:
        raise RuntimeError(f"checkpoint {tag_dir} lacks tensors for {missing[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.dtype))
    if not (load_optimizer and src.has_optimizer):
        _refresh_master_weights(engine)
        return
    step = src.optimizer_step()
    state = {k: local_tensors(src, k, model_cfg, specs, tp_rank, tp) for k in ("fp32", "exp_avg", "exp_avg_sq")}
    opt = engine.optimizer  # ZeRO-1 or DeepSpeed's bf16 optimizer (ZeRO stage 0 is refused by the config)
    _init_optimizer_state(opt, step)
    for name, p in params.items():
        safe_set_full_fp32_param(p, state["fp32"][name].to(p.device, torch.float32))
        for k in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, state[k][name].to(p.device, torch.float32), k)


def _refresh_master_weights(engine) -> None:
    """After writing module weights directly, make DeepSpeed's fp32 master copies agree with them."""
    opt = engine.optimizer
    if hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()
    elif hasattr(opt, "_restore_from_bit16_weights"):
        opt._restore_from_bit16_weights()


def _padded(cfg: LlamaConfig, meta: dict) -> int:
    """The source's padded vocab rows: padding is a multiple of make_vocab_size_divisible_by x source TP."""
    model = meta.get("model", {})
    multiple = int(model.get("make_vocab_size_divisible_by", 128)) * meta["layout"]["tp"]
    return ((cfg.vocab_size + multiple - 1) // multiple) * multiple
