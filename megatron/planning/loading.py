"""Config files read for planning: merged and validated as deepy.py does, run-only keys filled with placeholders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron.config.schema import NeoXConfig

PLACEHOLDER_DATA = "(not needed for planning)"


@dataclass
class Loaded:
    config: NeoXConfig
    overrides: list[str]  # the loader's "key: a (f1) -> b (f2)" lines
    placeholders: list[str]  # run-only keys the files leave unset, filled in only to pass validation


def load_for_planning(paths: list[str]) -> Loaded:
    """Merge and validate the YAML files with megatron.config.loader.load_config, as deepy.py does. A model preset
    (configs/llama3.1-*.yml) leaves train_iters and the data to a run file; those are filled with placeholders
    (reported, and never used: no data is read and no run time is computed from a placeholder). Raises
    ConfigError for everything else, as deepy.py would refuse it."""
    from megatron.config.loader import load_config, read_yaml_files

    raw = read_yaml_files(paths)[0]  # only to see which keys are absent; load_config reports file problems
    extra: dict[str, Any] = {}
    if "train_iters" not in raw and "train_epochs" not in raw:
        extra["train_iters"] = 1
    if not raw.get("data_path") and not raw.get("train_data_paths"):
        extra["data_path"] = PLACEHOLDER_DATA
    # The plan is for the cluster the config describes, not for this machine: no available-device count.
    loaded = load_config(paths, extra=extra or None)
    cfg = loaded.config
    if "train_iters" in extra:
        cfg = cfg.model_copy(update={"train_iters": None})
    return Loaded(config=cfg, overrides=loaded.overrides, placeholders=sorted(extra))


def config_world_size(cfg: NeoXConfig) -> int:
    """GPUs the config asks for, as DeepSpeed's runner counts them (megatron/config/validate.py), else 1."""
    from megatron.config.validate import launch_world_size

    try:
        return launch_world_size(cfg) or 1
    except ValueError:  # a malformed hostfile: the launcher refuses it and names it
        return 1
