"""Saving and loading training checkpoints: DeepSpeed's files plus this project's metadata, RNG states and pointer.

Save order (what makes an interrupted save harmless):
  1. rank 0 removes the tag folder if it already exists (a save of this step that was killed, or the same step of
     an abandoned branch after a rollback): marker first, so it is never a complete checkpoint with stale files;
  2. every rank writes its DeepSpeed files and its RNG state;
  3. barrier; the ranks checksum the folder's files in parallel (each a share); rank 0 writes config.yml, then
     `neox_meta.json` (the completeness marker, with every checksum), then moves `latest` (atomic rename) and
     prunes old checkpoints.
A save never removes a complete checkpoint unless `allow_rollback` says so (a resume from an earlier step), or a
load found it corrupt (then it is renamed `global_stepN.corrupt-DATE`, kept for inspection, not deleted).
Load picks the newest complete checkpoint (see `metadata.find_loadable_tag`), verifies the files it will read
(each rank a share; a corrupt one makes every rank fall back to the newest checkpoint that verifies, or refuses
when `load_iteration` named it), and resumes it through DeepSpeed when the layout is unchanged, or through
`reshard` when TP, PP or DP differ.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from megatron.checkpoint import metadata, rng
from megatron.checkpoint.reshard import load_resharded
from megatron.config.loader import save_resolved
from megatron.config.schema import NeoXConfig
from megatron.model.config import LlamaConfig

SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size", "vocab_size")
# Keys that change what the same weights compute: a config left at the schema defaults (RoPE theta 10000, no
# llama3 scaling) would otherwise train a converted Llama-3.1 with the wrong positions, without a word.
POSITION_KEYS = ("rotary_emb_base", "rope_scaling", "rms_norm_epsilon")
SCHEDULE_KEYS = ("lr", "min_lr", "warmup", "lr_decay_style", "decay_iters")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint cannot be used with this config (model shape or schedule differ, a file is corrupt).

    `all_ranks`: every rank raises it with the same message (train.py prints it once, on rank 0)."""

    def __init__(self, message: str, all_ranks: bool = True):
        super().__init__(message)
        self.all_ranks = all_ranks


@dataclass
class LoadedState:
    path: Path
    iteration: int = 0
    consumed_samples: int = 0
    data_state: dict = field(default_factory=dict)
    weights_only: bool = False
    resharded: bool = False


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return os.path.realpath(a) == os.path.realpath(b)


def model_meta(cfg: NeoXConfig, model_cfg: LlamaConfig) -> dict:
    """The model keys (NeoX config names) that a checkpoint's tensors correspond to."""
    return {
        "num_layers": model_cfg.num_layers, "hidden_size": model_cfg.hidden_size,
        "num_attention_heads": model_cfg.num_attention_heads, "num_kv_heads": model_cfg.num_kv_heads,
        "intermediate_size": model_cfg.intermediate_size, "vocab_size": model_cfg.vocab_size,
        "padded_vocab_size": model_cfg.padded_vocab_size,
        "make_vocab_size_divisible_by": cfg.make_vocab_size_divisible_by,
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "rms_norm_epsilon": model_cfg.rms_norm_epsilon, "rotary_emb_base": model_cfg.rope_theta,
        "rope_scaling": model_cfg.rope_scaling, "seq_length": cfg.seq_length,
        "tokenizer_type": cfg.tokenizer_type, "vocab_file": cfg.vocab_file,
    }


def schedule_meta(cfg: NeoXConfig) -> dict:
    return {"lr": cfg.lr, "min_lr": cfg.min_lr, "warmup": cfg.warmup, "lr_decay_style": cfg.lr_decay_style,
            "decay_iters": cfg.lr_decay_iters or cfg.train_iters}


def _describe(model: dict) -> str:
    return ", ".join(f"{k}={model.get(k)}" for k in SHAPE_KEYS)


class CheckpointManager:
    def __init__(self, cfg: NeoXConfig, engine, layout, model_cfg: LlamaConfig, log: Callable[[str], None],
                 config_to_save: Optional[NeoXConfig] = None):
        self.cfg, self.engine, self.layout, self.model_cfg, self.log = cfg, engine, layout, model_cfg, log
        # The config as the user wrote it: values derived at run time (train_iters from train_epochs) stay out.
        self.config_to_save = config_to_save or cfg
        self.rank = layout.rank
        self.last_saved: Optional[int] = None
        self.corrupt_tags: set[str] = set()  # found corrupt at load: a save of the same step sets them aside
        self.resumed_from = 0  # the step loaded (0: a fresh or finetune start)

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, consumed_samples: int, data_state: dict) -> Optional[Path]:
        cfg = self.cfg
        if not cfg.save or self.last_saved == iteration:
            return None
        root, tag = Path(cfg.save), metadata.tag_for(iteration)
        tag_dir = root / tag
        # A complete tag found corrupt at load, or whose marker is damaged, is set aside (renamed), never deleted.
        corrupt = tag in self.corrupt_tags or (metadata.is_complete(tag_dir) and metadata.meta_problem(tag_dir))
        if metadata.is_complete(tag_dir) and not corrupt and not cfg.allow_rollback:
            # deepy.py refuses such a run before launch; this guards runs started another way (every rank checks).
            raise CheckpointMismatchError(
                f"step {iteration} would overwrite the complete checkpoint {tag_dir} (a later step than the "
                f"{self.resumed_from} this run resumed from); nothing was written. Set allow_rollback: true to "
                "replace it, or save to another directory.")
        torch.distributed.barrier()  # every rank judged the folder before rank 0 moves or removes it
        if self.rank == 0 and corrupt:
            aside = root / f"{tag}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            tag_dir.rename(aside)  # not a checkpoint name any more; kept for inspection
            self.log(f"moved the corrupt checkpoint {tag_dir} aside to {aside}")
        elif self.rank == 0 and tag_dir.exists():
            # An overwrite is incomplete until re-marked, and must not mix in files of another layout.
            (tag_dir / metadata.META_NAME).unlink(missing_ok=True)
            shutil.rmtree(tag_dir)
        torch.distributed.barrier()
        client_state = {"iteration": iteration, "consumed_samples": consumed_samples, "data_state": data_state}
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        rng_path = tag_dir / f"rng_state_{self.rank:05d}.pt"
        torch.save(rng.capture(), rng_path.with_suffix(".tmp"))
        os.replace(rng_path.with_suffix(".tmp"), rng_path)
        _fault_pause_in_save(self.rank, iteration)
        torch.distributed.barrier()  # every rank's files are on disk before the checkpoint is declared complete
        checksums = self._checksum_share(tag_dir)
        if self.rank == 0:
            save_resolved(self.config_to_save, tag_dir / "config.yml")
            lay = self.layout
            meta = metadata.build_meta(
                iteration=iteration, consumed_samples=consumed_samples, tp=lay.tp, pp=lay.pp, dp=lay.dp,
                model=model_meta(cfg, self.model_cfg), has_optimizer=True,
                config=self.config_to_save.to_yaml_dict(),
                data_state=data_state)
            meta["schedule"] = schedule_meta(cfg)
            meta["tokens_seen"] = consumed_samples * cfg.seq_length
            meta["skipped_steps"] = int(getattr(self.engine, "skipped_steps", 0))
            meta["save_serial"] = metadata.next_save_serial(root)
            if checksums is not None:
                checksums.update(metadata.checksum_files(tag_dir, ["config.yml"]))
                meta["checksums"] = dict(sorted(checksums.items()))
            later = [t for t in metadata.complete_tags(root) if metadata.tag_iteration(t) > iteration]
            if later:
                self.log(f"note: {root} also holds later steps of an earlier run ({', '.join(later)}); `latest` "
                         f"now names {tag}, and a resume follows it, not the higher step numbers")
            metadata.write_meta(tag_dir, meta)
            metadata.write_latest(root, tag)
            self._prune(root)
            self.log(f"saved checkpoint {tag_dir}")
        torch.distributed.barrier()
        self.last_saved = iteration
        return tag_dir

    def _own_files(self) -> set[str]:
        """The files of a step folder this rank writes at a save and reads at a load (same layout): its pipeline
        stage's layer files at its TP rank, its model-parallel file, its ZeRO shard and its RNG state."""
        lay = self.layout
        mp = lay.pp_rank * lay.tp + lay.tp_rank
        parts = getattr(self.engine.module, "parts", None) or [0, 0]
        own = {metadata.layer_file(s, lay.tp_rank) for s in range(parts[lay.pp_rank], parts[lay.pp_rank + 1])}
        return own | {metadata.mp_rank_file(mp), metadata.optim_file(lay.dp_rank, mp),
                      f"rng_state_{self.rank:05d}.pt"}

    def _my_share(self, names: list[str]) -> list[str]:
        """This rank's share of `names` to hash: the files it wrote or will read itself where it can (they are in
        its node's page cache: no second read over the network), spread among the ranks that share a file (the
        DP replicas of a layer file); the rest round-robin. Every rank computes the same split."""
        world = torch.distributed.get_world_size()
        claims = [None] * world
        torch.distributed.all_gather_object(claims, sorted(self._own_files() & set(names)))
        claimants: dict[str, list[int]] = {}
        for rank, claimed in enumerate(claims):
            for name in claimed:
                claimants.setdefault(name, []).append(rank)
        unclaimed = [n for n in names if n not in claimants]
        mine = unclaimed[self.rank::world]
        mine += [n for i, n in enumerate(sorted(claimants)) if claimants[n][i % len(claimants[n])] == self.rank]
        return sorted(mine)

    def _checksum_share(self, tag_dir: Path) -> Optional[dict]:
        """Each rank hashes its share of the folder's files (`_my_share`); every rank gets all the checksums (None:
        verification is off)."""
        if not self.cfg.verify_checkpoints:
            return None
        world = torch.distributed.get_world_size()
        names = metadata.files_to_checksum(tag_dir)
        mine = metadata.checksum_files(tag_dir, self._my_share(names))
        shares = [None] * world
        torch.distributed.all_gather_object(shares, mine)
        return {k: v for share in shares for k, v in share.items()}

    def _verify(self, root: Path, tag: str, weights_only: bool) -> list[tuple[str, str]]:
        """The files of `tag` that fail verification, the same list on every rank (each rank checks a share)."""
        tag_dir = root / tag
        try:
            meta = metadata.read_meta(tag_dir)
        except (OSError, ValueError) as e:
            return [(metadata.META_NAME, str(e))]
        checksums = meta.get("checksums")
        if not self.cfg.verify_checkpoints or not checksums:
            if self.cfg.verify_checkpoints:
                self.log(f"note: {tag_dir} has no checksums (saved before they existed, or by a converter); "
                         "loaded unverified")
            return []
        # Optimizer shards are not read by a weights-only load (finetune): no need to read them here either.
        names = [n for n in sorted(checksums) if not (weights_only and n.startswith("zero_pp_rank_"))]
        world = torch.distributed.get_world_size()
        start = time.monotonic()
        mine = metadata.verify_files(tag_dir, checksums, self._my_share(names))
        shares = [None] * world
        torch.distributed.all_gather_object(shares, mine)
        # (said, because at 70B reading every file back takes a while before the first step)
        self.log(f"checked {len(names)} files of {tag_dir} against their checksums in {time.monotonic() - start:.1f} s "
                 f"({world} ranks sharing them)")
        return sorted(bad for share in shares for bad in share)

    def _verified_tag(self, root: Path, tag: str, explicit: bool, weights_only: bool) -> str:
        """`tag`, or the newest checkpoint before it that verifies (with one warning per corrupt one); refused when
        `explicit` (load_iteration names it)."""
        bad_tags: list[str] = []
        while True:
            bad = self._verify(root, tag, weights_only)
            if not bad:
                return tag
            name, why = bad[0]
            more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
            if explicit:
                raise CheckpointMismatchError(
                    f"checkpoint file {root / tag / name} {why}{more}. load_iteration names this checkpoint, so "
                    "nothing was loaded: load another step (load_iteration), or copy this one again if it was "
                    f"transferred (`python tools/ckpts/inspect_checkpoint.py {root} --verify` checks them all).")
            bad_tags.append(tag)
            self.corrupt_tags.add(tag)
            fallback = metadata.find_loadable_tag(root, exclude=bad_tags, warn=lambda m: None)
            self.log(f"WARNING: checkpoint {root / tag} is corrupt: {name} {why}{more}; "
                     + (f"falling back to {root / fallback}" if fallback else "no earlier complete checkpoint"))
            if fallback is None:
                raise CheckpointMismatchError(
                    f"no checkpoint in {root} verifies (corrupt: {', '.join(bad_tags)}); nothing was loaded. "
                    f"`python tools/ckpts/inspect_checkpoint.py {root} --verify` lists the bad files.")
            tag = fallback

    def _prune(self, root: Path) -> None:
        keep = self.cfg.keep_last_n_checkpoints
        if not keep:
            return
        for old in metadata.tags_in_save_order(root)[:-keep]:  # the last saves, not the highest steps
            # Drop the marker first: a prune cut short leaves an incomplete folder, never a half-deleted "complete" one.
            (root / old / metadata.META_NAME).unlink(missing_ok=True)
            shutil.rmtree(root / old, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def _own_latest(self) -> Optional[str]:
        """The latest checkpoint this run saved, when `save` (another directory than `load`) holds one: a job
        restarted with its first config continues there, whatever `load` and `finetune` say (they say how the run
        started). Checkpoints of a run that started from another `load` are refused: saving beside them would
        interleave two runs. An explicit load_iteration loads from `load` as asked."""
        cfg = self.cfg
        if not cfg.save or cfg.load_iteration is not None or (cfg.load and _same_dir(cfg.load, cfg.save)):
            return None
        root = Path(cfg.save)
        tag = metadata.find_loadable_tag(root, warn=self.log) if root.is_dir() else None
        if tag is None:
            return None
        saved_config = root / tag / "config.yml"
        started_from = yaml.safe_load(saved_config.read_text()).get("load") if saved_config.is_file() else None
        if not _same_dir(started_from, cfg.load):
            raise CheckpointMismatchError(
                f"save directory {root} holds checkpoints of another run ({tag}, started from load: {started_from}); "
                f"this run starts from load: {cfg.load}. Use another save directory, remove those checkpoints, or "
                f"set load: {root} and finetune: false to continue that run.")
        return tag

    def load(self) -> Optional[LoadedState]:
        """Restore the run's state: from its own latest save if it has one (a restart), else from `load`."""
        cfg, lay = self.cfg, self.layout
        own = self._own_latest()
        explicit = False
        if own is not None:
            root, tag, finetune = Path(cfg.save), own, False
            self.log(f"continuing this run from its own latest save {root / tag} (load: {cfg.load} started it)")
        elif cfg.load:
            root, finetune = Path(cfg.load), cfg.finetune
            wanted = metadata.tag_for(cfg.load_iteration) if cfg.load_iteration is not None else None
            explicit = wanted is not None
            try:
                tag = metadata.find_loadable_tag(root, wanted, warn=self.log)
            except (FileNotFoundError, ValueError) as e:
                raise CheckpointMismatchError(f"{e}; load_iteration: {cfg.load_iteration} names it, so nothing "
                                              "was loaded") from None
            if tag is None:
                if cfg.allow_fresh_start or _same_dir(cfg.load, cfg.save):  # deepy.py refuses the other cases
                    self.log(f"no complete checkpoint in {root}; starting from scratch")
                    return None
                raise CheckpointMismatchError(f"load: {root} holds no complete checkpoint; nothing was trained. "
                                              "Fix the path, or set allow_fresh_start: true to start from scratch.")
        else:
            return None
        tag = self._verified_tag(root, tag, explicit, finetune)
        tag_dir = root / tag
        meta = metadata.read_meta(tag_dir)
        self._check_model(meta, tag_dir)
        weights_only = finetune or not meta.get("has_optimizer", True)
        src = meta["layout"]
        # DP only shapes the optimizer's ZeRO partitions: a weights-only load needs TP and PP to match, no more.
        same_layout = (src["tp"], src["pp"]) == (lay.tp, lay.pp) and (weights_only or src["dp"] == lay.dp)
        if same_layout:
            try:
                path, _ = self.engine.load_checkpoint(
                    str(root), tag=tag, load_optimizer_states=not weights_only, load_lr_scheduler_states=False,
                    load_module_only=weights_only)
            except Exception as e:  # DeepSpeed's errors rarely say which file; find it before giving up
                raise CheckpointMismatchError(_load_failure(tag_dir, e), all_ranks=False) from None
            if path is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint files in {tag_dir}")
        else:
            self.log(f"resharding {tag_dir}: saved as TP {src['tp']} x PP {src['pp']} x DP {src['dp']}, "
                     f"loading as TP {lay.tp} x PP {lay.pp} x DP {lay.dp}"
                     + (" (weights only)" if weights_only else " (weights and optimizer state)"))
            load_resharded(self.engine, tag_dir, meta, self.model_cfg, lay.tp_rank, lay.tp,
                           load_optimizer=not weights_only)
        state = LoadedState(path=tag_dir, weights_only=weights_only, resharded=not same_layout)
        if not finetune:
            self._check_schedule(meta, tag_dir)
            state.iteration = int(meta["iteration"])
            state.consumed_samples = int(meta["consumed_samples"])
            state.data_state = dict(meta.get("data_state") or {})
            self.engine.global_steps = state.iteration
            self.engine.global_samples = state.consumed_samples
            self.engine.skipped_steps = int(meta.get("skipped_steps", 0))
            rng_path = tag_dir / f"rng_state_{self.rank:05d}.pt"
            if same_layout and src["dp"] == lay.dp and rng_path.exists():
                try:
                    rng.restore(torch.load(rng_path, weights_only=False))
                except Exception as e:
                    raise CheckpointMismatchError(
                        f"{rng_path} cannot be read ({type(e).__name__}: {e}): the file is corrupt; load an earlier "
                        "checkpoint", all_ranks=False) from None
            elif rng_path.exists():
                self.log("RNG states not restored (the layout changed; streams are per rank)")
        self.log(f"loaded {tag_dir} (" + ("weights only, new run at step 0" if finetune else
                 f"step {state.iteration}, {state.consumed_samples} samples consumed"
                 + (", fresh optimizer" if weights_only else "")) + ")")
        self.last_saved = state.iteration if not finetune else None
        self.resumed_from = state.iteration
        return state

    def _check_model(self, meta: dict, tag_dir: Path) -> None:
        saved = meta.get("model") or {}
        ours = model_meta(self.cfg, self.model_cfg)
        diff = [k for k in SHAPE_KEYS if k in saved and saved[k] != ours[k]]
        if diff:
            raise CheckpointMismatchError(
                f"checkpoint {tag_dir} holds a model of shape {_describe(saved)}, but the config builds "
                f"{_describe(ours)} (different: {', '.join(diff)}). Load a checkpoint of this shape, or set the "
                f"model keys to the checkpoint's (a converted checkpoint has them in model.yml).")
        changed = [f"{k}: {saved[k]} -> {ours[k]}" for k in POSITION_KEYS if k in saved and saved[k] != ours[k]]
        if not changed:
            return
        if self.cfg.finetune:  # a new run from these weights may change RoPE on purpose (context extension)
            self.log(f"note: the config changes what checkpoint {tag_dir} was trained with ({'; '.join(changed)}); "
                     "finetune: true starts a new run from these weights with the config's values")
            return
        raise CheckpointMismatchError(
            f"checkpoint {tag_dir} was trained with other RoPE / norm settings than the config's "
            f"({'; '.join(changed)}). Set these keys to the checkpoint's (a converted checkpoint has them in "
            "model.yml), or, to change them on purpose (e.g. to extend the context), start a new run from the "
            "weights with finetune: true.")

    def _check_schedule(self, meta: dict, tag_dir: Path) -> None:
        saved, ours = meta.get("schedule"), schedule_meta(self.cfg)
        if not saved or self.cfg.override_lr_scheduler:
            return
        diff = [f"{k} {saved[k]} -> {ours[k]}" for k in SCHEDULE_KEYS if k in saved and saved[k] != ours[k]]
        if diff:
            raise CheckpointMismatchError(
                f"the learning-rate schedule differs from the one checkpoint {tag_dir} was trained with "
                f"({'; '.join(diff)}). Set override_lr_scheduler: true to continue with this config's schedule "
                f"from step {meta['iteration']}, or restore the checkpoint's values.")


def _load_failure(tag_dir: Path, err: Exception) -> str:
    """Say which file of a checkpoint is unreadable (truncated, corrupt), or else pass DeepSpeed's error on."""
    for path in sorted(Path(tag_dir).glob("*.pt")):
        try:  # memory-mapped: reads the zip directory at the end of the file, which truncation loses first
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:
            return (f"checkpoint file {path} is truncated or corrupt ({type(e).__name__}: {e}); load an earlier "
                    "checkpoint (load_iteration), or copy this one again if it was transferred")
    return (f"checkpoint {tag_dir} could not be loaded ({type(err).__name__}: {err}); its files read back, so they "
            "do not match this model or layout: compare with `python tools/ckpts/inspect_checkpoint.py "
            f"{Path(tag_dir).parent} --config YOUR_CONFIG`")


def _fault_pause_in_save(rank: int, iteration: int) -> None:
    """Fault injection for tests: NEOX_FAULT_PAUSE_IN_SAVE=STEP:SECONDS holds rank 0 in the save of STEP after its
    files are written and before the checkpoint is marked complete, so a test can kill the job mid-save."""
    raw = os.environ.get("NEOX_FAULT_PAUSE_IN_SAVE", "")
    if not raw:
        return
    step, pause = raw.split(":")
    pause = float(pause)
    if int(step) == iteration and rank == 0:
        print(f"[fault injection] pausing {pause:g}s inside the save", flush=True)
        time.sleep(pause)
