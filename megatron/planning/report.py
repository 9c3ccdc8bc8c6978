"""The plan as text: the table tools/plan.py prints."""

from __future__ import annotations

from megatron.planning.hardware import CONTEXT_GIB, FRAGMENTATION, GIB
from megatron.planning.memory import StageMemory
from megatron.planning.plan import Plan

def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _stage_groups(stages: list[StageMemory]) -> list[tuple[str, StageMemory]]:
    """Consecutive stages with the same content and in-flight count but different peaks are still shown apart;
    identical middle stages collapse to one row (e.g. '1-6')."""
    rows: list[tuple[list[int], StageMemory]] = []
    for st in stages:
        if rows and rows[-1][1].items == st.items and abs(rows[-1][1].peak - st.peak) < 0.05 * GIB \
                and 0 < st.stage < len(stages) - 1 and 0 < rows[-1][0][-1]:
            rows[-1][0].append(st.stage)
        else:
            rows.append(([st.stage], st))
    return [(f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}-{ids[-1]}", st) for ids, st in rows]


def _step_lines(plan: Plan) -> list[str]:
    """The step time as the balanced-pipeline formula, stretched by the stages' imbalance when PP > 1."""
    lay = plan.layout
    fp8 = f" x {plan.fp8_time_factor:.2f} (fp8, predicted)" if plan.precision.fp8 else ""
    balanced = (f"FLOPs/step x {plan.recompute_factor:.2f}{fp8} / ({lay.gpus:,} GPUs x {plan.tflops:.1f} TFLOP/s) / "
                "(1 - bubble)")
    if lay.pp == 1:
        return [f"  step        {balanced} = {_duration(plan.step_seconds)}"]
    t = plan.stage_seconds
    slowest = plan.stages[t.index(max(t))]
    stretch = plan.step_seconds / (plan.compute_seconds / (1 - plan.bubble))
    return [f"  stages      the slowest, stage {slowest.stage} ({slowest.label()}), does x{plan.imbalance:.3f} the "
            f"average stage's work",
            f"  step        {balanced} x {stretch:.3f} = {_duration(plan.step_seconds)}",
            f"              (1F1B: each stage's micro-batch time once, then GAS-1 = {lay.gas - 1} of the slowest's)"]


def format_plan(plan: Plan, title: str = "") -> str:
    sh, lay, gpu = plan.shape, plan.layout, plan.gpu
    lines = []
    if title:
        lines.append(f"Plan for {title}")
    lines += [
        f"  model       Llama-3.1 shape: {sh.layers} layers, hidden {sh.hidden}, {sh.heads} heads ({sh.kv_heads} kv), "
        f"MLP {sh.ffn}, vocab {sh.vocab:,} (padded to {sh.padded_vocab(lay.tp):,} for TP {lay.tp}), seq {sh.seq:,}",
        f"  parameters  {plan.params:,} ({plan.params / 1e9:.2f}B; embedding and output {sh.vocab * sh.hidden:,} each)",
        f"  GPUs        {plan.gpus:,} x {gpu.name} ({gpu.memory_gib:.0f} GiB, {gpu.peak_tflops:g} bf16 TFLOP/s peak)",
        f"  layout      {lay.describe()}",
        f"  batch       global {lay.global_batch:,} sequences = {plan.tokens_per_step:,} tokens per step",
        f"  precision   {plan.precision.name}, gradient accumulation in {plan.precision.grad_accum}"
        f"{' (fused into the weight-gradient GEMMs)' if plan.precision.grads_fused else ''}, "
        f"ZeRO stage {plan.precision.zero_stage}: {plan.optimizer_name}",
        "",
        "Memory per GPU (GiB), by pipeline stage; activations are what the stage's in-flight micro-batches keep",
        f"  {'stage':<6} {'holds':<36} {'params':>8} {'weights':>7} {'grads':>6} {'master':>6} {'Adam':>6} "
        f"{'in-flt':>6} {'acts':>6} {'no-ckpt':>7} {'ckpt':>6} {'work':>6} {'peak':>6} {'device':>6}",
    ]
    for ids, st in _stage_groups(plan.stages):
        lines.append(
            f"  {ids:<6} {st.label():<36} {st.params / 1e9:>7.2f}B {_gib(st.weights):>7} {_gib(st.grads):>6} "
            f"{_gib(st.master):>6} {_gib(st.optimizer):>6} {st.in_flight:>6} {_gib(st.act_stored):>6} "
            f"{_gib(st.act_no_ckpt):>7} {_gib(st.act_ckpt):>6} {_gib(st.transient):>6} {_gib(st.peak):>6} "
            f"{_gib(st.device):>6}")
    w = plan.worst
    lines += [
        "  grads = bf16 param.grad + fp32 accumulation buffer (whole local model; gradient_accumulation_fusion",
        "  leaves only the norms a bf16 param.grad); master and Adam are this rank's",
        "  1/DP slice (ZeRO-1). acts = activations the in-flight micro-batches keep (1F1B: stage i has up to PP-i)",
        "  and DeepSpeed's pipe buffers; no-ckpt / ckpt = the same without / with activation checkpointing.",
        "  work = at the worst moment: a recomputed layer and the gradients in flight (the last stage also holds",
        "  the current micro-batch's logits until its backward is done), or the loss.",
        "  peak = weights + grads + master + Adam + acts + work (or, if larger, the moment of the gradient",
        "  all-reduce): what torch.cuda.max_memory_allocated reports;",
        f"  device = peak x {1 + FRAGMENTATION:.2f} (allocator) + {CONTEXT_GIB:g} GiB (context, NCCL, workspaces).",
        "",
    ]
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"Verdict: {verdict} - worst stage {w.stage} ({w.peak_phase}) needs {plan.device_gib:.1f} GiB of "
                 f"{gpu.memory_gib:.0f} GiB ({100 * plan.device_gib / gpu.memory_gib:.0f}%; allocated peak "
                 f"{plan.peak_gib:.1f} GiB)")
    for p in plan.problems:
        lines.append(f"  layout problem: {p}")
    for n in plan.notes:
        lines.append(f"  note: {n}")
    lines += [
        "",
        "Time",
        f"  FLOPs       {plan.flops_per_token / 1e9:,.1f} GFLOP per token (6N + 12Lhs, megatron/metrics.py) x "
        f"{plan.tokens_per_step:,} tokens = {plan.flops_per_step:.3e} per step",
        f"  bubble      (PP-1)/(GAS+PP-1) = {lay.pp - 1}/{lay.gas + lay.pp - 1} = {100 * plan.bubble:.1f}% of each step",
        f"  recompute   x{plan.recompute_factor:.2f} GPU work per model FLOP"
        + (" (selective checkpointing replays pointwise ops and FlexAttention)" if lay.selective
           and plan.precision.attention == "flex"
           else " (selective checkpointing replays only pointwise ops)" if lay.selective
           else " (checkpointing repeats each layer's forward)" if lay.checkpoint else " (no checkpointing)"),
        f"  assumed     {plan.tflops:.1f} TFLOP/s per GPU while computing ({100 * plan.tflops / gpu.peak_tflops:.0f}% "
        f"of peak)",
        *_step_lines(plan),
        f"  printed     the trainer would report {plan.end_to_end_tflops:.1f} TFLOP/s per GPU "
        f"({100 * plan.end_to_end_tflops / gpu.peak_tflops:.0f}% MFU; 6N + 12Lhs over wall time)",
    ]
    if plan.run_seconds is not None:
        derived = " (train_iters derived from train_epochs)" if plan.train_epochs else ""
        gpu_hours = plan.run_seconds * lay.gpus / 3600
        lines.append(f"  run         {plan.train_iters:,} steps{derived} x {_duration(plan.step_seconds)} = "
                     f"{_duration(plan.run_seconds)} ({gpu_hours:,.0f} GPU-hours)")
    elif plan.train_epochs:
        lines.append(f"  run         train_epochs {plan.train_epochs:g}: train_iters is derived from the corpus size "
                     f"at launch; run time = that x {_duration(plan.step_seconds)}")
    else:
        lines.append("  run         train_iters not set: no run time")
    return "\n".join(lines)
