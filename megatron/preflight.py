"""What deepy.py checks on disk before it launches anything (the config's own rules are in config/validate.py).

Every problem is collected and printed at once, each naming the config file and key, the file on disk and the fix;
exit 2, nothing launched, nothing written:

* `load` means load: a `load` that holds no complete checkpoint is refused (unless `allow_fresh_start`, or `load`
  is the run's own `save` folder on its first launch); `load_iteration` must name a complete checkpoint, and needs
  a `load`; a resume from an earlier step may not overwrite or prune later complete checkpoints in `save` unless
  `allow_rollback` says so.
* the checkpoint that would be loaded (the run's own latest in `save`, else `load`) holds a model of the shape the
  config builds (layers, widths, heads, vocabulary when set).
* data: every prefix (train/valid/test, their labels, data_path, replay) opens: both files exist, the .idx header
  is sound, its dtype is an integer type, its sizes agree with the .bin, and the largest token id is below the
  vocabulary. The id range of each .bin is cached (beside the data, or in data_cache_dir) keyed by the file's
  size and mtime, so a large corpus is scanned once, not at every launch.
* one job per run: the lock in `save` (megatron/checkpoint/run_lock.py) is taken last, and held until deepy.py
  exits.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from megatron.checkpoint import metadata
from megatron.checkpoint.run_lock import RunLock, RunLocked, describe
from megatron.config.errors import ConfigError, ConfigIssue
from megatron.config.schema import NeoXConfig
from megatron.data.indexed_dataset import IndexedDataset, bin_path, idx_path

_SCAN_CHUNK = 1 << 26  # tokens per read when scanning a .bin for its id range


def _same_dir(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def _folder_contents(root: Path) -> str:
    """What a checkpoint folder holds, for an error message."""
    if not root.exists():
        return "it does not exist"
    if not root.is_dir():
        return "it is not a directory"
    steps = metadata.step_dirs(root)
    if not steps:
        names = sorted(p.name for p in root.iterdir())[:5]
        return "it holds no global_stepN folder" + (f" (it holds: {', '.join(names)})" if names else " (it is empty)")
    parts = []
    for p in steps:
        if not metadata.is_complete(p):
            parts.append(f"{p.name} (interrupted save: no {metadata.META_NAME})")
        else:
            problem = metadata.meta_problem(p)
            parts.append(f"{p.name} (damaged marker)" if problem else p.name)
    return "it holds " + ", ".join(parts)


# ---------------------------------------------------------------- checkpoints
def checkpoint_issues(cfg: NeoXConfig, sources: dict) -> list[ConfigIssue]:
    issues = []
    src = sources.get
    if cfg.load_iteration is not None and not cfg.load:
        issues.append(ConfigIssue(
            "load_iteration", "there is no `load` to take this step from; the run would start from scratch and "
            "save over the run's later checkpoints", "set load: to the checkpoint folder (usually the run's save "
            "folder), or remove load_iteration", cfg.load_iteration, src("load_iteration")))
        return issues
    own = None
    if cfg.save and not _same_dir(cfg.load, cfg.save) and cfg.load_iteration is None:
        own = metadata.find_loadable_tag(cfg.save, warn=lambda m: None) if Path(cfg.save).is_dir() else None
    if cfg.load and own is None:  # a restarted job continues from its own save: `load` only says how it started
        root = Path(cfg.load)
        if cfg.load_iteration is not None:
            tag = metadata.tag_for(cfg.load_iteration)
            if not metadata.is_complete(root / tag):
                complete = metadata.complete_tags(root)
                issues.append(ConfigIssue(
                    "load_iteration", f"{root / tag} is not a complete checkpoint ({_folder_contents(root)})",
                    "name a complete step" + (f" (complete: {', '.join(complete)})" if complete else ""),
                    cfg.load_iteration, src("load_iteration")))
            elif metadata.meta_problem(root / tag):
                issues.append(ConfigIssue(
                    "load_iteration", metadata.meta_problem(root / tag),
                    "load another step, or copy this checkpoint again", cfg.load_iteration, src("load_iteration")))
        elif metadata.find_loadable_tag(root, warn=lambda m: None) is None:
            if not (cfg.allow_fresh_start or _same_dir(cfg.load, cfg.save)):
                issues.append(ConfigIssue(
                    "load", f"no complete checkpoint to load: {_folder_contents(root)}",
                    "fix the path; or, to start from random weights on purpose, set allow_fresh_start: true (or "
                    "remove load)", cfg.load, src("load")))
    if not issues:
        issues += shape_issues(cfg, sources, own)
    if cfg.load and cfg.load_iteration is not None and cfg.save and not cfg.allow_rollback:
        later = [t for t in metadata.complete_tags(cfg.save) if metadata.tag_iteration(t) > cfg.load_iteration]
        if later:
            issues.append(ConfigIssue(
                "load_iteration", f"resuming step {cfg.load_iteration} would overwrite or prune the later complete "
                f"checkpoints in save: {cfg.save} ({', '.join(later)})",
                "to roll back on purpose set allow_rollback: true; to continue the run remove load_iteration; or "
                "save to another folder", cfg.load_iteration, src("load_iteration")))
    return issues


# The model keys a config sets directly that fix the tensors' shapes (vocab_size only when the config sets it: unset,
# it is the tokenizer's). The trainer checks them all again when it loads (CheckpointManager._check_model).
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size", "vocab_size")


def shape_issues(cfg: NeoXConfig, sources: dict, own: Optional[str]) -> list[ConfigIssue]:
    """The checkpoint that would be loaded holds a model of another shape than the config builds: refused here,
    before any rank starts, rather than by every rank after the launch."""
    root = Path(cfg.save) if own else Path(cfg.load) if cfg.load else None
    tag = own or (metadata.tag_for(cfg.load_iteration) if cfg.load_iteration is not None else
                  metadata.find_loadable_tag(root, warn=lambda m: None) if root and root.is_dir() else None)
    if tag is None:
        return []
    try:
        saved = metadata.read_meta(root / tag).get("model") or {}
    except (OSError, ValueError):
        return []  # an unreadable marker is named above (load_iteration) or by the loader, which skips it
    ours = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
            "num_attention_heads": cfg.num_attention_heads, "num_kv_heads": cfg.kv_heads,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size}
    diff = [k for k in SHAPE_KEYS if saved.get(k) is not None and ours[k] is not None and saved[k] != ours[k]]
    if not diff:
        return []
    which = "save" if own else "load"
    return [ConfigIssue(
        k, f"{root / tag} ({which}) holds a model with {k} = {saved[k]}; the config builds one with {ours[k]}",
        f"set {k}: {saved[k]} (a converted checkpoint has its model keys in model.yml), or load a checkpoint of "
        "this shape", ours[k], sources.get(k) or sources.get(which))
        for k in diff]


# ---------------------------------------------------------------- data
def data_prefixes(cfg: NeoXConfig) -> list[tuple[str, str, bool]]:
    """(config key, prefix, holds labels) for every dataset the run opens."""
    out = []
    for key in ("train_data_paths", "valid_data_paths", "test_data_paths"):
        out += [(key, p, False) for p in getattr(cfg, key) or []]
    for key in ("train_label_data_paths", "valid_label_data_paths", "test_label_data_paths"):
        out += [(key, p, True) for p in getattr(cfg, key) or []]
    if cfg.data_path:
        out.append(("data_path", cfg.data_path, False))
    if cfg.replay is not None:
        out += [("replay", p, False) for p in cfg.replay.data_paths]
        out += [("replay", p, False) for p in cfg.replay.valid_data_paths or []]
    return out


def _cache_path(prefix: str, cache_dir: Optional[str]) -> Path:
    if cache_dir:
        key = hashlib.sha1(os.path.realpath(bin_path(prefix)).encode()).hexdigest()[:16]
        return Path(cache_dir) / f"{Path(prefix).name}-{key}.token_range.json"
    return Path(prefix + ".token_range.json")


def token_range(prefix: str, dataset: IndexedDataset, cache_dir: Optional[str] = None) -> tuple[int, int]:
    """(smallest, largest) token id in PREFIX.bin, from the cache when the file is unchanged (size, mtime)."""
    stat = os.stat(bin_path(prefix))
    stamp = {"bin": os.path.realpath(bin_path(prefix)), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = _cache_path(prefix, cache_dir)
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in stamp} == stamp:
            return int(cached["min"]), int(cached["max"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    tokens = np.memmap(bin_path(prefix), mode="r", dtype=dataset.dtype) if stat.st_size else np.zeros(0, np.int32)
    lo, hi = 0, -1
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start:start + _SCAN_CHUNK]
        lo, hi = (int(chunk.min()), int(chunk.max())) if start == 0 else (min(lo, int(chunk.min())),
                                                                           max(hi, int(chunk.max())))
    try:  # a read-only data folder just means no cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({**stamp, "min": lo, "max": hi}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return lo, hi


def _vocab_size(cfg: NeoXConfig) -> Optional[int]:
    if cfg.vocab_size:
        return cfg.vocab_size
    try:
        from megatron.data.tokenizer import build_tokenizer

        return build_tokenizer(cfg.tokenizer_type, cfg.vocab_file).vocab_size
    except Exception:  # the workers report a tokenizer that cannot be built
        return None


def data_issues(cfg: NeoXConfig, sources: dict) -> list[ConfigIssue]:
    issues, vocab, seen = [], _vocab_size(cfg), set()
    for key, prefix, labels in data_prefixes(cfg):
        if (prefix, labels) in seen:
            continue
        seen.add((prefix, labels))
        where = sources.get(key)
        missing = [p for p in (idx_path(prefix), bin_path(prefix)) if not os.path.isfile(p)]
        if missing:
            issues.append(ConfigIssue(key, f"{' and '.join(missing)} not found", "check the prefix (the path "
                                      "without .bin/.idx), or build it with tools/datasets/preprocess_data.py",
                                      prefix, where))
            continue
        try:
            dataset = IndexedDataset(prefix)
            lo, hi = token_range(prefix, dataset, cfg.data_cache_dir)
        except Exception as e:  # CorruptDatasetError names the file; anything else is as bad
            issues.append(ConfigIssue(key, str(e), "rebuild this dataset with tools/datasets/preprocess_data.py",
                                      prefix, where))
            continue
        if vocab is not None and hi >= vocab:
            issues.append(ConfigIssue(
                key, f"{bin_path(prefix)} holds token id {hi}, outside the vocabulary (vocab_size {vocab}: ids "
                f"0..{vocab - 1})", "tokenize it with this model's tokenizer, or set vocab_size to the one it "
                "was built for", prefix, where))
        if lo < (-100 if labels else 0):
            issues.append(ConfigIssue(key, f"{bin_path(prefix)} holds the negative token id {lo}",
                                      "rebuild this dataset with tools/datasets/preprocess_data.py", prefix, where))
    return issues


def mcq_eval_issues(cfg: NeoXConfig, sources: dict) -> list[ConfigIssue]:
    """mcq_eval questions whose prompt (with its two shots) is longer than seq_length: refused here, with the
    tokenizer the run will use, rather than when the ranks start. The files' rows were checked by validation."""
    if cfg.mcq_eval is None:
        return []
    try:
        from megatron.data.tokenizer import build_tokenizer
        from megatron.eval.in_training import long_prompts, read_spec

        questions, pool = read_spec(cfg.mcq_eval)
        tokenizer = build_tokenizer(cfg.tokenizer_type, cfg.vocab_file)
    except Exception:  # a bad file is reported by validation; a tokenizer that cannot be built, by the workers
        return []
    problems = long_prompts(questions, pool, tokenizer, cfg.seq_length, cfg.mcq_eval.questions)
    if not problems:
        return []
    shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
    return [ConfigIssue("mcq_eval.questions", "; ".join(shown), "use shorter shots (mcq_eval.shots), leave these "
                        "questions out, or raise seq_length", cfg.mcq_eval.questions, sources.get("mcq_eval"))]


# ---------------------------------------------------------------- the one call deepy.py makes
def before_launch(cfg: NeoXConfig, sources: dict, dry_run: bool = False) -> int:
    """Run every check; print the problems and return 2, or take the run lock (held until this process exits)
    and return 0. A dry run checks nothing on disk (it may run where the data and checkpoints are not)."""
    if dry_run:
        return 0
    issues = checkpoint_issues(cfg, sources) + data_issues(cfg, sources) + mcq_eval_issues(cfg, sources)
    if issues:
        print(ConfigError(issues).format(), file=sys.stderr, flush=True)
        return 2
    if not cfg.save:
        return 0
    lock = RunLock(cfg.save, cfg.run_lock_stale_seconds)
    try:
        lock.acquire()
    except RunLocked as e:
        owner = e.args[0] if e.args else {}
        print(f"{sources.get('save')}: save = {cfg.save!r}: another job is running on this save folder "
              f"({describe(owner)}); two jobs would write the same checkpoints. Nothing was launched.\n"
              f"    fix: wait for it to end or stop it; a lock whose job died is taken over by the next launch "
              f"(at once on the same host, after run_lock_stale_seconds = {cfg.run_lock_stale_seconds:g} "
              f"without heartbeat from another host); the lock file is {lock.path}", file=sys.stderr, flush=True)
        return 2
    if lock.took_over:
        print(f"warning: took over the stale run lock {lock.path} ({describe(lock.took_over)}): its job is gone",
              flush=True)
    atexit.register(lock.release)
    return 0
