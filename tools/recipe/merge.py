"""Merge HF models with mergekit, offline: the recipe's "merge" stage.

    python tools/recipe/merge.py configs/recipe/merge.yml runs/recipe/hf/merged [--seed 1234]

mergekit reads a model path that is not an existing absolute folder as a Hugging Face Hub name, which fails
offline (its model card step asks the Hub); this tool makes every `model`/`base_model` path of the config absolute
(relative to the working directory, as every other recipe path), writes the resolved config next to the output,
and runs mergekit's own `run_merge` with HF_HUB_OFFLINE=1, a fixed seed (DARE drops parameters at random) and
the tokenizer of the last listed model (the SFT model: the merge is an assistant, it stops at <|eot_id|>; its
generation_config.json is copied too). Needs `pip install -r requirements/merge.txt`.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.checkpoint.metadata import swap_in_folder  # noqa: E402


def absolutize(node):
    if isinstance(node, dict):
        return {k: (str(Path(v).resolve()) if k in ("model", "base_model") and isinstance(v, str)
                    else absolutize(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [absolutize(v) for v in node]
    return node


class ConfigFileError(ValueError):
    """The merge config cannot be read: missing, not YAML, or not a mapping."""


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise ConfigFileError("file not found; check the path")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigFileError(f"not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigFileError("not a mergekit config: expected a mapping with merge_method, base_model and models")
    return raw


def config_problem(e: Exception) -> str:
    """One line per problem: pydantic's field path and message (mergekit's MergeConfiguration is a pydantic model)."""
    if isinstance(e, ConfigFileError):
        return str(e)
    fields = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors())
    return f"not a valid mergekit config ({fields}); see configs/recipe/merge.yml for one that is"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="mergekit YAML (paths relative to the working directory)")
    p.add_argument("output", help="HF folder to write")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
        from pydantic import ValidationError
    except ImportError:
        print("error: mergekit is not installed; pip install -r requirements/merge.txt", file=sys.stderr)
        return 2
    try:
        raw = absolutize(read_config(Path(args.config)))
        config = MergeConfiguration.model_validate(raw)
    except (ConfigFileError, ValidationError) as e:
        print(f"error: {args.config}: {config_problem(e)}; nothing written", file=sys.stderr)
        return 2
    models = [m["model"] for m in raw.get("models", []) if isinstance(m.get("model"), str)]
    missing = [m for m in models + [raw.get("base_model")] if isinstance(m, str) and not Path(m).is_dir()]
    if missing:
        print(f"error: {args.config}: model folder(s) {', '.join(missing)} missing; run the export stage first",
              file=sys.stderr)
        return 2
    out = Path(args.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    resolved = out.parent / (out.name + ".merge.yml")
    resolved.write_text(yaml.safe_dump(raw, sort_keys=False))
    # mergekit writes into a folder beside the output, renamed into place when complete: an interrupted merge
    # leaves no half model, and an earlier merge at the output stays whole until the new one replaces it.
    # (The folder keeps the output's name inside a hidden one: mergekit's model card is titled with it.)
    staging_root = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging_root, ignore_errors=True)
    staging = staging_root / out.name
    run_merge(config, str(staging), MergeOptions(random_seed=args.seed, copy_tokenizer=False, lazy_unpickle=False),
              config_source=resolved.read_text())
    chat = Path(models[-1])
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (chat / name).exists():
            shutil.copy(chat / name, staging / name)
    swap_in_folder(staging, out)
    staging_root.rmdir()
    print(f"{out}: {raw['merge_method']} merge of {', '.join(models)} on {raw.get('base_model')} "
          f"(seed {args.seed}; config {resolved})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
