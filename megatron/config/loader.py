"""YAML files → one validated `NeoXConfig`.

Files merge in order (a later file overrides an earlier one; nested mappings merge key by key) and every override
is reported. Keys may be written GPT-NeoX style with hyphens (`num-layers`). Problems of every kind (unknown keys,
wrong types, cross-field rules) are gathered into one `ConfigError` that names file, key, value and fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from megatron.config.errors import ConfigError, ConfigIssue
from megatron.config.neox_compat import translate
from megatron.config.schema import NeoXConfig, all_keys
from megatron.config.validate import check_cross_field, check_eval, check_generation


@dataclass
class LoadedConfig:
    config: NeoXConfig
    sources: dict[str, str]  # top-level key -> the file that set it last
    overrides: list[str] = field(default_factory=list)  # human-readable "key: a (f1) -> b (f2)"
    notes: list[str] = field(default_factory=list)  # one line per GPT-NeoX key accepted as a no-op or mapped
    files: list[str] = field(default_factory=list)


def _normalise(d: Any) -> Any:
    if isinstance(d, dict):
        return {str(k).replace("-", "_"): _normalise(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_normalise(v) for v in d]
    return d


def _deep_merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml_files(paths: list[str]) -> tuple[dict[str, Any], dict[str, str], list[str], list[ConfigIssue]]:
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    overrides: list[str] = []
    issues: list[ConfigIssue] = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            issues.append(ConfigIssue("<file>", f"config file {path} does not exist", "check the path", file=path))
            continue
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            issues.append(ConfigIssue("<yaml>", f"not valid YAML: {e}", "fix the YAML syntax", file=path))
            continue
        if not isinstance(data, dict):
            issues.append(
                ConfigIssue("<yaml>", "the file must be a mapping of key: value", "write `key: value` lines", file=path)
            )
            continue
        data = _normalise(data)
        for k, v in data.items():
            if k in merged and merged[k] != v:
                new = _deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged[k], dict) else v
                overrides.append(f"{k}: {merged[k]!r} ({sources[k]}) -> {new!r} ({path})")
            merged[k] = _deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
            sources[k] = path
    return merged, sources, overrides, issues


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def close_spellings(key: str, known: list[str]) -> list[str]:
    """Keys that differ from `key` by a typo (a few edits), never merely by a shared word: `deepspeed_mpi` must not
    suggest `deepspeed_slurm`, a key of different meaning."""
    limit = min(3, 1 + len(key) // 8)
    scored = sorted((_edit_distance(key, k), k) for k in known if abs(len(k) - len(key)) <= limit)
    return [k for d, k in scored if d <= limit][:3]


def _unknown_key_issues(raw: dict[str, Any], sources: dict[str, str]) -> list[ConfigIssue]:
    known = all_keys()
    issues = []
    for k in raw:
        if k in known:
            continue
        close = close_spellings(k, known)
        fix = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else \
            "remove it (configs/README.md lists the keys; docs/config.md the GPT-NeoX ones)"
        issues.append(ConfigIssue(k, "unknown key", fix, value=raw[k], file=sources.get(k)))
    return issues


def _type_issues(err: ValidationError, raw: dict[str, Any], sources: dict[str, str]) -> list[ConfigIssue]:
    issues = []
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        top = loc[0] if loc else "<config>"
        key = ".".join(loc) if loc else "<config>"
        fix = {
            "extra_forbidden": "remove it (see configs/README.md for the keys of this mapping)",
            "literal_error": f"use one of the allowed values ({e.get('ctx', {}).get('expected', '')})",
        }.get(e["type"], f"give a value of the documented type ({NeoXConfig.model_fields[top].description})"
              if top in NeoXConfig.model_fields else "see configs/README.md")
        issues.append(ConfigIssue(key, e["msg"], fix, value=e.get("input"), file=sources.get(top)))
    return issues


def build_config(
    raw: dict[str, Any], sources: Optional[dict[str, str]] = None, available_devices: Optional[int] = None,
    world_size: Optional[int] = None, purpose: str = "train",
) -> NeoXConfig:
    """Validate a merged mapping. Raises ConfigError listing every problem. `purpose` "generate" / "eval": the
    generation rules (`check_generation`) or the lm-eval ones (`check_eval`) instead of the training ones."""
    sources = sources or {}
    raw, _notes, issues = translate(raw, sources, set(NeoXConfig.model_fields))
    issues += _unknown_key_issues(raw, sources)
    known = {k: v for k, v in raw.items() if k in NeoXConfig.model_fields}
    bad_keys: set[str] = set()
    try:
        cfg = NeoXConfig(**known)
    except ValidationError as err:
        type_issues = _type_issues(err, raw, sources)
        issues += type_issues
        bad_keys = {i.key.split(".")[0] for i in type_issues}
        # Re-validate without the broken keys so the cross-field rules still report everything else.
        try:
            cfg = NeoXConfig(**{k: v for k, v in known.items() if k not in bad_keys})
        except ValidationError:
            raise ConfigError(issues) from None
    issues += [
        i
        for i in (check_generation(cfg) if purpose == "generate" else check_eval(cfg) if purpose == "eval" else
                  check_cross_field(cfg, available_devices=available_devices, world_size=world_size))
        if not (set(i.key.split(",")) & bad_keys)
    ]
    if issues:
        # Name the file that set the key; for a key no file set, the last file (where one would add it).
        fallback = list(sources.values())[-1] if sources else None
        issues = [ConfigIssue(i.key, i.message, i.fix, i.value,
                              i.file or sources.get(i.key.split(",")[0].split(".")[0], fallback)) for i in issues]
        raise ConfigError(issues)
    return cfg


def load_config(
    paths: list[str], extra: Optional[dict[str, Any]] = None, available_devices: Optional[int] = None,
    purpose: str = "train",
) -> LoadedConfig:
    raw, sources, overrides, issues = read_yaml_files(paths)
    if extra:
        for k, v in _normalise(extra).items():
            if k in raw and raw[k] != v:
                overrides.append(f"{k}: {raw[k]!r} ({sources[k]}) -> {v!r} (command line)")
            raw[k] = v
            sources[k] = "command line"
    if issues:
        raise ConfigError(issues)
    notes = translate(raw, sources, set(NeoXConfig.model_fields))[1]
    cfg = build_config(raw, sources, available_devices=available_devices, purpose=purpose)
    return LoadedConfig(config=cfg, sources=sources, overrides=overrides, notes=notes, files=list(paths))


def save_resolved(cfg: NeoXConfig, path: str | Path) -> Path:
    """Write the merged, validated config (every key, defaults included) where the run and checkpoints keep it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
    tmp.replace(path)
    return path


def load_resolved(path: str | Path, world_size: Optional[int] = None, purpose: str = "train") -> NeoXConfig:
    """Read a config written by `save_resolved` (what every worker and every checkpoint holds).

    Workers pass the launcher's WORLD_SIZE: the config alone may not say it (num_gpus unset means the GPUs deepy.py
    saw), and the batch-size rules must hold for the ranks that actually started."""
    raw = yaml.safe_load(Path(path).read_text())
    return build_config(raw, {k: str(path) for k in raw}, world_size=world_size, purpose=purpose)


def entry_parser(doc: str):
    """The entry scripts' (train.py, generate.py, eval.py) command line: --config and --run-dir, which deepy.py
    gives them. Started by hand (`python train.py my.yml`, a GPT-NeoX habit), the error says how to start them."""
    import argparse
    import sys

    class EntryParser(argparse.ArgumentParser):
        def error(self, message):
            script = Path(sys.argv[0]).name
            self.print_usage(sys.stderr)
            self.exit(2, f"{self.prog}: error: {message}\n  {script} is started by deepy.py, which validates the "
                         f"config files and writes the resolved config it reads: python deepy.py {script} CONFIG.yml "
                         "[MORE.yml ...]\n")

    parser = EntryParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="resolved config written by deepy.py")
    parser.add_argument("--run-dir", required=True, help="where logs, metrics and output files go")
    return parser


def single_process_entry(doc: str, purpose: str, undone: str) -> tuple[Optional[NeoXConfig], str]:
    """The command line deepy.py gives the one-process entry scripts (generate.py, eval.py): --config (the resolved
    config it wrote) and --run-dir. Returns (config, run_dir), or (None, run_dir) after printing the config problems
    with `undone` ("nothing was generated") for the script to exit 2."""
    import sys

    args = entry_parser(doc).parse_args()
    try:
        return load_resolved(args.config, purpose=purpose), args.run_dir
    except ConfigError as e:
        print(e.format(undone), file=sys.stderr, flush=True)
        return None, args.run_dir
