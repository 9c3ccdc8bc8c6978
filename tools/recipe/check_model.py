"""Reload an HF model folder with transformers alone, in its own process, and show that it works: the recipe's
check of the merged model.

    python tools/recipe/check_model.py runs/recipe/hf/merged [--compare runs/recipe/hf/cpt runs/recipe/hf/sft]

Loads the folder with AutoModelForCausalLM / AutoTokenizer (offline), prints its parameter count, the share of
the SFT task vector DARE dropped (left at the CPT value) and the direction of the rest, and its greedy reply
to one chat question through the folder's own chat template.
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def hf_folder_problem(path: str) -> str | None:
    """Why `path` is not an HF model folder transformers can load, or None. The generation loader's checks
    (megatron/generation/loading.py) name the usual mistakes: no such folder, a checkpoint of this trainer, a
    config.json that is not JSON, no weights."""
    from megatron.generation.loading import ModelLoadError, model_kind

    folder = Path(path)
    if not folder.exists():
        return f"{folder} does not exist; pass a Hugging Face model folder (config.json + *.safetensors)"
    try:
        if model_kind(folder) != "hf":
            return (f"{folder} is a checkpoint of this trainer, not a Hugging Face folder; export it first "
                    "(tools/ckpts/convert_neox_to_hf.py)")
        json.loads((folder / "config.json").read_text())
    except ModelLoadError as e:
        return str(e)
    except json.JSONDecodeError as e:
        return f"{folder / 'config.json'} is not valid JSON ({e})"
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return f"{folder} has config.json but no weights (*.safetensors); is the export or merge complete?"
    return None


def load(path: str, torch, auto_model):
    try:
        return auto_model.from_pretrained(path, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {path}: transformers cannot load this model ({type(e).__name__}: {e})") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--compare", nargs=2, metavar=("CPT", "SFT"),
                   help="default: the hf/cpt and hf/sft folders beside MODEL when they exist")
    p.add_argument("--question", default="Quick question (k42): what is a pulsar?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    for what, path in [("", args.model)] + [("--compare: ", x) for x in args.compare or []]:
        problem = hf_folder_problem(path)
        if problem:
            print(f"error: {what}{problem}", file=sys.stderr)
            return 2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load(args.model, torch, AutoModelForCausalLM)
    tok = AutoTokenizer.from_pretrained(args.model)
    n = sum(t.numel() for t in model.parameters())
    print(f"{args.model}: {type(model).__name__}, {n / 1e6:.2f}M parameters, loaded by transformers")
    folder = Path(args.model)
    pair = args.compare or [str(folder.parent / "cpt"), str(folder.parent / "sft")]
    if all(Path(x, "config.json").exists() for x in pair):
        cpt, sft = (load(x, torch, AutoModelForCausalLM).state_dict() for x in pair)
        merged = model.state_dict()
        # DARE keeps each entry of the task vector (sft - cpt) with probability `density` and rescales it by
        # 1/density; TIES' sign election changes nothing with one model. So: the share of changed entries left at
        # the CPT value is about 1 - density, and the kept ones point along the task vector.
        changed = dropped = 0
        dot = norm_m = norm_s = 0.0
        for k in cpt:
            delta_s, delta_m = (sft[k] - cpt[k]).flatten(), (merged[k] - cpt[k]).flatten()
            moved = delta_s != 0
            changed += int(moved.sum())
            dropped += int((moved & (delta_m == 0)).sum())
            dot += float(delta_s @ delta_m)
            norm_m, norm_s = norm_m + float(delta_m @ delta_m), norm_s + float(delta_s @ delta_s)
        cos = dot / max((norm_m * norm_s) ** 0.5, 1e-30)
        print(f"DARE dropped {dropped / max(changed, 1):.3f} of the {changed:,} entries SFT changed (left at CPT); "
              f"cosine(merged - cpt, sft - cpt) = {cos:.3f}")
    ids = tok.apply_chat_template([{"role": "user", "content": args.question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False,
                             eos_token_id=model.generation_config.eos_token_id)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:])
    print(f"greedy reply to {args.question!r}: {reply!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
