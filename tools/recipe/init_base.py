"""Write a randomly initialised Hugging Face Llama-3.1-shaped model: the recipe's stand-in for Meta's base release.

    python tools/recipe/init_base.py --config configs/tiny_cpu.yml --output runs/recipe/hf/base --seed 1234

AstroSage starts from Llama-3.1-70B, an HF folder converted with tools/ckpts/convert_hf_llama_to_neox.py and
trained with `finetune: true`. The miniature does the same with a model that needs no download: the model keys of
--config (a run config, e.g. configs/tiny_cpu.yml) become a config.json through the exporter's own code
(megatron.checkpoint.hf_config), transformers' LlamaForCausalLM initialises the weights (seeded), and the
Llama-3 tokenizer files are written beside them. This folder is "base" in the recipe's evaluation table: exactly
the weights continued pretraining starts from.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron.checkpoint.hf_config import (ConversionError, generation_config, hf_config_from_keys,  # noqa: E402
                                           model_keys_from_neox)
from megatron.checkpoint.hf_tokenizer import write_llama3_tokenizer  # noqa: E402
from megatron.checkpoint.metadata import swap_in_folder  # noqa: E402
from megatron.config.loader import read_yaml_files  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="run config with the model keys (num_layers, hidden_size, ...)")
    p.add_argument("--output", required=True, help="HF folder to write")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    raw, _, _, issues = read_yaml_files([args.config])  # a missing file, bad YAML: named, as deepy.py names them
    try:
        if issues:
            raise ConversionError("; ".join(" ".join(f"{i.message} ({i.fix})".split()) for i in issues))
        keys = model_keys_from_neox(raw, args.config)
        cfg = hf_config_from_keys(keys, "float32")
    except ConversionError as e:
        print(f"error: {args.config}: {e}; nothing written" if args.config not in str(e) else f"error: {e}; nothing "
              "written", file=sys.stderr)
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(args.output)
    # Written beside the output and renamed into place when complete: an interrupted run leaves no half model
    # (and an earlier one at --output stays whole until the new one replaces it).
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("torch_dtype", "dtype")}))
    model.save_pretrained(staging)
    (staging / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")  # the release's layout, as the exporter
    (staging / "generation_config.json").write_text(
        json.dumps(generation_config(cfg["bos_token_id"], cfg["eos_token_id"]), indent=2) + "\n")
    write_llama3_tokenizer(staging)
    swap_in_folder(staging, out)
    n = sum(t.numel() for t in model.parameters())
    print(f"{out}: random-init LlamaForCausalLM, {n / 1e6:.1f}M parameters (seed {args.seed}), Llama-3 tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
