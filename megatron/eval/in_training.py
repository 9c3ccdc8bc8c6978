"""Evaluation inside the training loop: the validation sets' loss (moved here from the trainer) and the knowledge
curve of continued pretraining, the next-token MCQ (`mcq_eval`) run on the training model itself.

The MCQ forward goes through DeepSpeed's pipeline engine as validation does (`eval_batch`, every TP/PP rank
taking part), with the model's loss function swapped, for that call only, for one that reads each prompt's last
position: on the last stage, per micro-batch, the logits of the letter tokens (picked from whichever TP rank holds
that vocabulary slice, then summed over the TP group) and the log-sum-exp over the whole vocabulary (max and sum
reduced over the TP group): the full logits are never gathered. The last stage broadcasts the result to its
pipeline group. Prompts are right-padded to seq_length and fed micro_batch at a time, the very shapes training
uses, so the engine's buffers are reused as they are. Every data-parallel replica scores all questions (no
sharding: simple, and the curve is cheap next to training at the sizes it is meant for: a few hundred questions).

Scoring, the letter spelling and the prompt are megatron/eval/next_token.py's, the same code the standalone tool
runs on an HF model, so the curve at step N equals `tools/eval/mcq.py --model CKPT --step N` (tested).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np
import torch


def evaluate_validation(trainer) -> dict:
    """Loss and perplexity of each validation set (valid, and valid_replay with replay).

    Per token, as training: each `eval_batch` (gradient_accumulation_steps micro-batches on every DP rank) goes
    through GlobalTokenBatches, so it returns the mean over all its loss tokens, and the eval_iters results are
    weighted by their loss-token counts. With SFT labels a micro-batch of 10 answer tokens no longer weighs as much
    as one of 4,000; with every label counted (pretraining) the counts are equal and this is the plain mean."""
    from megatron.data.data_utils import make_data_loader
    from megatron.data.lm_batches import GlobalTokenBatches
    from megatron.trainer import _lm_batches

    cfg, lay = trainer.cfg, trainer.layout
    results = {}
    for prefix, dataset in trainer.valid_sets.items():
        loader = make_data_loader(dataset, cfg.train_micro_batch_size_per_gpu, lay.dp_rank, lay.dp, 0, 0)
        batches = GlobalTokenBatches(_lm_batches(loader, trainer.tokenizer.eod_id if cfg.eod_mask_loss else None),
                                     cfg.gradient_accumulation_steps, lay.dp,
                                     lay.mpu().get_data_parallel_group() if lay.dp > 1 else None)
        losses, tokens = [], []
        for _ in range(cfg.eval_iters):
            losses.append(trainer.engine.eval_batch(data_iter=batches).item())
            tokens.append(batches.loss_tokens)  # 0 on middle pipeline stages, which read no data (and log nothing)
        if sum(tokens):  # a step without loss tokens (all labels -100) weighs nothing
            loss = sum(x * n for x, n in zip(losses, tokens)) / sum(tokens)
        else:
            loss = sum(losses) / len(losses)
        ppl = float(np.exp(min(loss, 50.0)))
        trainer.sinks.log(trainer.iteration, {"loss": loss, "ppl": ppl}, prefix=prefix)
        what = "validation" if prefix == "valid" else "replay (general-text) validation"
        trainer.sinks.print(f"{what} at step {trainer.iteration}: loss {loss:.4f} | perplexity {ppl:.2f}")
        results[prefix] = loss
    return results


def engine_candidate_logits(engine, seq_length: int, micro_batch: int, pad_id: int = 0):
    """next_token.CandidateLogits through a DeepSpeed PipelineEngine (any TP/PP); results on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    def candidate_logits(batch: list[list[int]], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = len(batch), len(ids)
        rows = batch + [batch[-1]] * (-len(batch) % micro_batch)  # a full last micro-batch (extra rows dropped)
        tokens = torch.full((len(rows), seq_length), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
        last = torch.tensor([len(r) - 1 for r in rows])
        ids_t = torch.tensor(ids)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()

        def read_last_position(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            rows_here = logits[torch.arange(len(positions), device=logits.device), positions].float()  # [b, V/tp]
            local = rows_here.shape[-1]
            wanted = ids_t.to(logits.device) - tp_rank * local
            here = (wanted >= 0) & (wanted < local)
            picked = torch.zeros(len(positions), k, device=logits.device)
            picked[:, here] = rows_here[:, wanted[here]]
            dist.all_reduce(picked, group=tp_group)
            peak = rows_here.max(dim=-1).values
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp_group)
            total = (rows_here - peak[:, None]).exp().sum(dim=-1)
            dist.all_reduce(total, group=tp_group)
            return torch.cat([picked, (peak + total.log())[:, None]], dim=1)

        micro = [(tokens[j:j + micro_batch], last[j:j + micro_batch]) for j in range(0, len(rows), micro_batch)]
        module = engine.module
        # The engine adds each micro-batch's "loss" into total_loss, left scalar by training: start it afresh.
        loss_fn, total_loss = module.loss_fn, engine.total_loss
        module.loss_fn, engine.total_loss = read_last_position, None
        try:
            out = engine.eval_batch(iter(micro), compute_loss=True, reduce_output=None, bcast_loss=False,
                                    num_micro_batches=len(micro))
        finally:
            module.loss_fn, engine.total_loss = loss_fn, total_loss
        device = next(module.parameters()).device
        if engine.is_last_stage():
            result = torch.cat([o.to(device) for o in out])
        else:
            result = torch.empty(len(rows), k + 1, device=device)
        src = engine.grid.stage_to_global(engine.num_stages - 1)
        dist.broadcast(result, src=src, group=engine.grid.get_pipe_parallel_group())
        result = result[:n].cpu()
        return result[:, :k], result[:, k]

    return candidate_logits


def read_spec(spec) -> tuple[list, list]:
    """(questions, shot pool) of an mcq_eval spec; the paper's appendix examples when it names no shots."""
    from megatron.eval.questions import read_questions
    from megatron.eval.shots import PAPER_EXAMPLES, read_shots

    return read_questions(spec.questions), (read_shots(spec.shots) if spec.shots else PAPER_EXAMPLES)


def long_prompts(questions, pool, tokenizer, seq_length: int, path: str) -> list[str]:
    """One message per question whose next-token prompt does not fit in seq_length (they would be cut)."""
    from megatron.eval.next_token import prompt_ids
    from megatron.eval.prompts import next_token_prompt
    from megatron.eval.shots import shots_for

    problems = []
    for q in questions:
        n = len(prompt_ids(tokenizer, next_token_prompt(q.question, q.options, shots_for(pool, q)), False))
        if n > seq_length:
            problems.append(f"{path}:{q.line}: the next-token prompt of question {q.id!r} is {n} tokens, longer "
                            f"than seq_length {seq_length}")
    return problems


class TrainingMCQ:
    """mcq_eval: built once at start-up (bad files and prompts too long for seq_length fail then), run when due."""

    def __init__(self, spec, cfg, tokenizer, engine, run_dir: str, log, is_logger: bool):
        from megatron.eval.questions import QuestionFileError

        self.spec, self.cfg, self.tokenizer, self.engine = spec, cfg, tokenizer, engine
        self.questions, self.pool = read_spec(spec)
        too_long = long_prompts(self.questions, self.pool, tokenizer, cfg.seq_length, spec.questions)
        if too_long:  # deepy.py refuses these before launch (megatron/preflight.py); a rank started by hand too
            raise QuestionFileError(too_long[0])
        self.out_dir = os.path.join(run_dir, "mcq")
        self.log, self.is_logger = log, is_logger

    def due(self, iteration: int) -> bool:
        return iteration % self.spec.interval == 0 or iteration == self.cfg.train_iters

    def run(self, iteration: int) -> Optional[dict]:
        from megatron.eval.mcq import summarize
        from megatron.eval.next_token import NextTokenScorer

        logits = engine_candidate_logits(self.engine, self.cfg.seq_length, self.cfg.train_micro_batch_size_per_gpu)
        scorer = NextTokenScorer(self.tokenizer, logits, self.pool)
        records = scorer.score(self.questions)
        summary = summarize(records, step=iteration, spelling=scorer.spelling, spelling_mass=scorer.masses)
        if not self.is_logger:
            return summary
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"step_{iteration}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if summary["accuracy"] is not None:
            lo, hi = summary["ci95"]
            self.log(iteration, {"accuracy": summary["accuracy"], "ci95_low": lo, "ci95_high": hi,
                                 "n": summary["n"]})
        return summary

    @staticmethod
    def describe(summary: dict, iteration: int) -> str:
        from megatron.eval.mcq import format_summary

        return f"MCQ (next-token) at step {iteration}: {format_summary(summary)}"


def build(trainer) -> Optional[TrainingMCQ]:
    spec = trainer.cfg.mcq_eval
    if spec is None:
        return None
    return TrainingMCQ(spec, trainer.cfg, trainer.tokenizer, trainer.engine, trainer.run_dir,
                       lambda step, metrics: trainer.sinks.log(step, metrics, prefix="mcq"), trainer.is_logger)


def evaluate(trainer, validation: bool) -> dict:
    """What the trainer's evaluation step runs: the validation sets when due, the MCQ when due."""
    results = evaluate_validation(trainer) if validation else {}
    mcq = getattr(trainer, "mcq", None)
    if mcq is not None and mcq.due(trainer.iteration):
        summary = mcq.run(trainer.iteration)
        trainer.sinks.print(mcq.describe(summary, trainer.iteration))
        if summary["accuracy"] is not None and math.isfinite(summary["accuracy"]):
            results["mcq"] = summary["accuracy"]
    return results
