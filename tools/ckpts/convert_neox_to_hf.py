#!/usr/bin/env python3
"""Export a checkpoint of this trainer (any TP/PP) to a Hugging Face Llama directory.

Example:
    python tools/ckpts/convert_neox_to_hf.py --input-dir runs/astro/ckpt --output-dir hf/astro-70b --dtype bf16
    # an assistant (SFT) model: stops generating at <|eot_id|>
    python tools/ckpts/convert_neox_to_hf.py --input-dir checkpoints/astrosage70b_sft \\
        --output-dir hf/astrosage70b-sft --dtype bf16 --chat-model

Writes model-0000x-of-0000y.safetensors, model.safetensors.index.json, config.json (LlamaForCausalLM, llama3
rope_scaling, untied), generation_config.json and, for the Llama-3 vocabulary, the tokenizer files, so that
`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` work offline. --input-dir is a
checkpoint root (the newest complete step, or --iteration N) or one global_stepN folder.

Without --chat-model the export is a base model's, as Meta's Llama-3.1 base release: eos_token <|end_of_text|>,
eos_token_id 128001. --chat-model (Llama-3 vocabulary only) exports an assistant model, as Meta's
Llama-3.1-*-Instruct releases: eos_token <|eot_id|> in tokenizer_config.json and special_tokens_map.json,
eos_token_id [128001, 128008, 128009] (<|end_of_text|>, <|eom_id|>, <|eot_id|>) in generation_config.json and
config.json. The tokenizer files this tool writes carry the Llama-3.1 chat template either way; with --chat-model,
copied ones (--tokenizer-dir) that have none get it too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-dir", required=True, help="checkpoint root (with `latest`) or a global_stepN folder")
    parser.add_argument("--output-dir", required=True, help="HF model directory to write")
    parser.add_argument("--iteration", type=int, default=None, help="step to export (default: the newest complete)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                        help="dtype of the exported weights (default: the checkpoint's own)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer-dir", default=None,
                     help="copy tokenizer files from this directory (e.g. the base model's) instead of writing them")
    tok.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    parser.add_argument("--chat-model", action="store_true",
                        help="an assistant (SFT) model: eos_token <|eot_id|>, generation stops at <|end_of_text|>, "
                             "<|eom_id|> or <|eot_id|> (eos_token_id [128001, 128008, 128009]), as Meta's "
                             "Llama-3.1-*-Instruct releases; default: a base model's (eos <|end_of_text|>, 128001)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --output-dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from megatron.checkpoint import hf_config, hf_tokenizer
    from megatron.checkpoint.convert import neox_to_hf, peak_rss_bytes, read_neox_model, resolve_tag, run_cli
    from megatron.checkpoint.safetensors_stream import parse_size

    start = time.perf_counter()
    tokenizer = args.tokenizer_dir or ("none" if args.no_tokenizer else "auto")

    def export() -> None:
        if args.chat_model:  # refused before any weight is read or written
            keys, _ = read_neox_model(resolve_tag(args.input_dir, args.iteration, log=lambda msg: None))
            if keys["vocab_size"] != hf_config.LLAMA3_VOCAB_SIZE:
                raise hf_config.ConversionError(
                    f"--chat-model needs the Llama-3 vocabulary ({hf_config.LLAMA3_VOCAB_SIZE} tokens, with "
                    f"<|eot_id|>); this checkpoint's vocab_size is {keys['vocab_size']}")
        out = neox_to_hf(
            args.input_dir, args.output_dir, iteration=args.iteration, dtype=args.dtype,
            max_shard_size=parse_size(args.max_shard_size), tokenizer=tokenizer, overwrite=args.overwrite,
            progress=not args.no_progress)
        if args.chat_model:
            changed = hf_tokenizer.make_chat_model(out)
            print(f"chat model: eos_token {hf_tokenizer.EOT}, eos_token_id {list(hf_config.LLAMA31_CHAT_EOS_IDS)} "
                  f"({', '.join(changed)})", file=sys.stderr)

    rc = run_cli(export)
    if rc == 0:
        print(f"done in {time.perf_counter() - start:.1f} s, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
