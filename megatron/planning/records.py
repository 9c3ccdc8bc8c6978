"""GPU memory measurements kept in benchmarks/results/ and the config keys they are recorded with."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from megatron.config.schema import NeoXConfig

# GPU peaks measured by tools/plan.py --measure and benchmarks/train_throughput.py; tests/test_plan.py holds the
# planner to them.
MEMORY_RECORDS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "memory_measurements.json"


def append_memory_records(records: list[dict[str, Any]], path: Path | str = MEMORY_RECORDS) -> None:
    path = Path(path)
    existing = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(existing + records, indent=1) + "\n")


def code_version() -> str:
    """The commit the measured code is at (a record is only evidence for the model code it ran): $GIT_COMMIT if
    set (copies of the tree, such as the GPU machine's, may carry a stale .git), else git's answer."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=MEMORY_RECORDS.parents[2],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def recorded_keys(cfg: NeoXConfig) -> dict[str, Any]:
    """The config keys that decide memory (model, layout, batch, precision, kernels), all explicit, so a memory
    measurement recorded with them stays meaningful if a default changes (benchmarks/results/)."""
    from megatron.config import schema

    keys = [k for sec in (schema.ModelArgs, schema.ParallelArgs, schema.TrainingArgs, schema.KernelArgs, schema.Fp8Args)
            for k in sec.model_fields]
    dumped = cfg.model_dump(mode="json")
    return {k: dumped[k] for k in keys if dumped.get(k) is not None}


def config_from_keys(config_dict: dict[str, Any]) -> NeoXConfig:
    """A NeoXConfig from YAML-style keys (aliases normalised, keys the schema does not know dropped), unvalidated
    beyond the schema's types: what the planner needs from a recorded or generated config."""
    from megatron.config.loader import _normalise

    raw = {k: v for k, v in _normalise(dict(config_dict)).items() if k in NeoXConfig.model_fields}
    return NeoXConfig(**raw)
