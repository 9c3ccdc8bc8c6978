#!/usr/bin/env python3
"""The peer for benchmarks/train_throughput.py: HF transformers LlamaForCausalLM training on one GPU.

What a user would write with transformers alone: SDPA attention, bf16 autocast over fp32 weights (fp32 master
weights, like this trainer), fused torch AdamW, `grad_accum` micro-batches per optimizer step. Prints one JSON line
(tokens/s, peak GiB, each step's tokens/s) and with --out writes it to that file too (what
benchmarks/train_throughput.py reads: its log of the run mixes stdout and stderr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape-json", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args()
    s = json.loads(args.shape_json)
    cfg = LlamaConfig(hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                      num_hidden_layers=s["num_layers"], num_attention_heads=s["num_attention_heads"],
                      num_key_value_heads=s["num_kv_heads"], vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).cuda()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.grad_accum):
            x = torch.randint(0, cfg.vocab_size, (1, args.seq), device="cuda", generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times[3:] if len(times) > 3 else times)
    tokens = args.grad_accum * args.seq / dt
    # TFLOP/s are computed by the caller with megatron.metrics.flops_per_token, the formula the trainer prints.
    result = {"tokens_per_s": tokens, "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "steps": args.steps,
              "step_tokens_per_s": [round(args.grad_accum * args.seq / t) for t in times]}
    print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
