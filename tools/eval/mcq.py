#!/usr/bin/env python
"""The AstroMLab multiple-choice benchmark on a checkpoint of this trainer (any TP/PP) or an HF folder.

    python tools/eval/mcq.py --model checkpoints/astrosage_cpt --questions astrobench.jsonl --method next-token
    python tools/eval/mcq.py --model hf/astrosage_sft --questions astrobench.jsonl --method instruct --reasoning
    python tools/eval/mcq.py --compare runs/eval/base runs/eval/cpt      # did CPT help? (paired, with a CI)

Methods (docs/evaluation.md): next-token (base model, appendix C 2-shot prompt, letter of the highest next-token
logit), instruct (appendix B prompt, chat format, greedy generation, JSON answer parsed), instruct-next-token (the
next-token prompt as the user turn of a chat). Writes OUT/predictions.jsonl, OUT/summary.json; rerunning the same
command continues a killed run. Bad input: a message naming FILE:LINE, exit 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.eval import mcq  # noqa: E402
from megatron.eval.questions import QuestionFileError, read_questions  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a checkpoint folder of this trainer (root or global_stepN) or an HF folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint iteration (default: the newest complete)")
    p.add_argument("--questions", help="JSONL: question, A, B, C, D[, answer, id] or question, options[, answer, id]")
    p.add_argument("--method", choices=mcq.METHODS, default="next-token")
    p.add_argument("--shots", default=None,
                   help="JSONL of solved questions for the next-token prompt's two examples (default: the paper's "
                        "appendix A examples 1 and 3)")
    p.add_argument("--output", default=None, help="run folder (default: runs/eval/<model name>-<method>)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda when there is one)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: as stored)")
    p.add_argument("--reasoning", action="store_true",
                   help="instruct: AstroSage's reasoning switch; <think>...</think> is stripped before parsing")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="instruct: reply length limit")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="instruct: generation engine (vllm: needs vLLM, requirements/vllm.txt on GPUs or "
                        "requirements/vllm-cpu.txt)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --output that holds another run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="paired difference B - A of two finished runs on the same questions, with a 95%% CI")
    p.add_argument("--stop-after-batches", type=int, default=None, help=argparse.SUPPRESS)  # tests: a killed run
    args = p.parse_args(argv)
    if args.compare:
        return args
    missing = [f"--{k}" for k in ("model", "questions") if not getattr(args, k)]
    if missing:
        p.error(f"{' and '.join(missing)} required (or --compare RUN_A RUN_B)")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.reasoning and args.method != "instruct":
        p.error("--reasoning applies to --method instruct only")
    return args


def settings_of(args, questions_path: str) -> dict:
    return {"model": os.path.abspath(args.model), "step": args.step, "method": args.method,
            "questions": os.path.abspath(questions_path), "questions_sha256": mcq.file_sha256(questions_path),
            "shots": os.path.abspath(args.shots) if args.shots else "appendix A examples",
            "shots_sha256": mcq.file_sha256(args.shots) if args.shots else None, "reasoning": args.reasoning,
            "max_new_tokens": args.max_new_tokens if args.method == "instruct" else None}


def build_scorer(args, loaded, pool):
    if args.method == "instruct":
        from megatron.eval.instruct import InstructScorer

        return InstructScorer(loaded, max_new_tokens=args.max_new_tokens, reasoning=args.reasoning,
                              backend=args.engine, batch_size=args.batch_size, model_path=args.model,
                              dtype=args.dtype)
    from megatron.eval.next_token import NextTokenScorer, hf_candidate_logits

    pad = loaded.eos_token_ids[0] if loaded.eos_token_ids else 0
    return NextTokenScorer(loaded.tokenizer, hf_candidate_logits(loaded.model, pad), pool,
                           chat=args.method == "instruct-next-token")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        result = mcq.compare_runs(*args.compare)
        print(mcq.format_compare(result))
        print(json.dumps(result))
        return 0
    from megatron.eval.shots import PAPER_EXAMPLES, read_shots, shots_for

    questions = read_questions(args.questions)
    pool = read_shots(args.shots) if args.shots else PAPER_EXAMPLES
    if args.method != "instruct":
        for q in questions:  # every question must have two shots other than itself, before anything is written
            shots_for(pool, q)
    settings = settings_of(args, args.questions)
    if args.output and not args.overwrite:  # refuse a mismatched --output before minutes of model loading
        mcq.check_settings(Path(args.output), settings, ignore=("step",))
    from megatron.generation.loading import load_model

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # The instruct methods prompt a chat model: Llama-3.1 chat format, generation stops at <|eot_id|>.
    # vLLM loads the weights itself: the instruct method on it needs only the model's config and tokenizer here.
    loaded = load_model(args.model, device=device, dtype=args.dtype, step=args.step,
                        chat=True if args.method != "next-token" else None, log=lambda m: print(m, file=sys.stderr),
                        weights=not (args.method == "instruct" and args.engine == "vllm"))
    name = Path(loaded.source).name if loaded.step is None else f"{Path(args.model).resolve().name}-{loaded.step}"
    out = Path(args.output or os.path.join("runs", "eval", f"{name}-{args.method}"))
    settings["step"] = loaded.step
    done = mcq.prepare_output(out, settings, args.overwrite)
    if done:
        print(f"resuming {out}: {len(done)} of {len(questions)} questions already scored", file=sys.stderr)
    t0 = time.perf_counter()
    scorer = build_scorer(args, loaded, pool)
    records = mcq.run_questions(scorer, questions, out, done, args.batch_size, progress=not args.no_progress,
                                stop_after=args.stop_after_batches)
    seconds = time.perf_counter() - t0
    extra = {"method": args.method, "model": loaded.source, "step": loaded.step, "kind": loaded.kind,
             "questions_file": os.path.abspath(args.questions), "seconds_this_session": round(seconds, 3),
             "questions_per_second": round((len(questions) - len(done)) / seconds, 3) if seconds > 0 else None}
    if args.method != "instruct":
        extra.update({"spelling": scorer.spelling, "spelling_mass": scorer.masses,
                      "letter_token_ids": scorer.ids,
                      "shot_pool": [q.id for q in pool]})
    summary = mcq.summarize(records, **extra)
    mcq.write_summary(out, summary)
    print(mcq.format_summary(summary))
    print(f"wrote {out / 'predictions.jsonl'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (QuestionFileError, mcq.RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # the loader's and the prompt builder's user errors: message, exit 2, no traceback
        if type(e).__name__ in ("ModelLoadError", "PromptError"):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
