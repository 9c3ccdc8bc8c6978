"""Reload an HF model folder with transformers alone, in its own process, and show that it works: the recipe's
check of the merged model.

    python tools/recipe/check_model.py runs/recipe/hf/merged [--compare runs/recipe/hf/cpt runs/recipe/hf/sft]

Loads the folder with AutoModelForCausalLM / AutoTokenizer (offline), prints its parameter count, the distance of
its weights from the --compare models (a DARE-TIES merge of SFT onto CPT lies between them), and its greedy reply
to one chat question through the folder's own chat template.
"""
import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--compare", nargs=2, metavar=("CPT", "SFT"),
                   help="default: the hf/cpt and hf/sft folders beside MODEL when they exist")
    p.add_argument("--question", default="Quick question (k42): what is a pulsar?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    n = sum(t.numel() for t in model.parameters())
    print(f"{args.model}: {type(model).__name__}, {n / 1e6:.2f}M parameters, loaded by transformers")
    folder = Path(args.model)
    pair = args.compare or [str(folder.parent / "cpt"), str(folder.parent / "sft")]
    if all(Path(x, "config.json").exists() for x in pair):
        cpt, sft = (AutoModelForCausalLM.from_pretrained(x, dtype=torch.float32).state_dict() for x in pair)
        merged = model.state_dict()
        num = sum((merged[k] - cpt[k]).abs().sum().item() for k in cpt)
        den = sum((sft[k] - cpt[k]).abs().sum().item() for k in cpt)
        print(f"|merged - cpt| / |sft - cpt| = {num / max(den, 1e-30):.3f} (0: the CPT model, 1: as far as SFT)")
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
