"""Generation through the real entry points (tools/generate.py, `python deepy.py generate.py`), in real processes.

  * `trained`: a tiny Llama-3-vocabulary model trained 3 steps through deepy.py at (TP, PP, DP) = (2, 2, 1); its
    greedy continuations (32 tokens, two prompts batched with left padding) from tools/generate.py and from
    deepy.py generate.py equal the argmax continuation of the trainer's own model, loaded in this process at
    TP 1 x PP 1 the way the trainer resumes another layout (megatron/checkpoint/reshard.py) and re-run on the whole
    sequence at every step (no cache).
  * `scripted`: a 1-layer model whose greedy reply is fixed (each token's embedding is its own unit vector and the
    layers add nothing, so lm_head maps the current token to the next): "I think so.\\n</think>\\n\\nB", <|eot_id|>,
    " tail", <|end_of_text|>. Exported as a base model and with --chat-model, it shows where generation stops, what
    --hide-reasoning shows and what the output file keeps.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hf_reference, conftest helpers
transformers = pytest.importorskip("transformers")

from hf_reference import tiny_hf_llama  # noqa: E402
from megatron.checkpoint import hf_config, hf_tokenizer, metadata  # noqa: E402
from megatron.checkpoint.convert import hf_to_neox, neox_to_hf  # noqa: E402
from megatron.data.indexed_dataset import IndexedDatasetWriter  # noqa: E402
from megatron.data.tokenizer import Llama3Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB = hf_config.LLAMA3_VOCAB_SIZE
QUIET = dict(progress=False, log=lambda msg: None)
NEW = 32
PROMPTS = ["The Andromeda galaxy is", "Stars form in cold molecular clouds when gravity overcomes"]
EOT, EOS = 128009, 128001
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline"}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, stdin=None, timeout=300, cwd=ROOT):
    return subprocess.run([sys.executable, *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


def tool(*args, **kw):
    return run([ROOT / "tools" / "generate.py", *args, "--no-progress"], **kw)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for f in fragments:
        assert f in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generate")


@pytest.fixture(scope="module")
def tok():
    return Llama3Tokenizer()


# ------------------------------------------------------------------------------------- trained at TP 2 x PP 2
def random_tp2_pp2(work: Path, **shape) -> Path:
    """A random 2-layer Llama-3-vocabulary model converted to a TP 2 x PP 2 checkpoint (the run folder); its weights
    are large (initializer_range 0.2) so greedy choices are clear-cut. `shape`: LlamaConfig changes. Also the start
    of tests_gpu's and tests_vllm's generation checks."""
    src = work / "hf_init"
    tiny_hf_llama(VOCAB, layers=2, seed=11, initializer_range=0.2, bos_token_id=128000, eos_token_id=EOS,
                  **shape).save_pretrained(str(src))
    return hf_to_neox(src, work / "init_tp2_pp2", 2, 2, **QUIET).parent


@pytest.fixture(scope="module")
def trained(work):
    """3 Adam steps through deepy.py -> train.py at (2, 2, 1), from a converted random Llama whose weights are
    large enough (initializer_range 0.2) that greedy choices are clear-cut."""
    start = random_tp2_pp2(work)
    prefix = str(work / "corpus_text_document")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(40):
            w.add_document(rng.integers(0, 128000, int(rng.integers(40, 120))))
        w.finalize()
    run_cfg = {"num_gpus": 4, "model_parallel_size": 2, "pipe_parallel_size": 2, "load": str(start),
               "save": str(work / "trained"), "data_path": prefix, "split": "100,0,0", "seq_length": 32,
               "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_iters": 3,
               "log_interval": 1, "eval_iters": 0, "eval_interval": 1000, "warmup": 0.0, "min_lr": 1.0e-4,
               "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}}, "run_dir": str(work / "run"),
               "use_wandb": False, "tensorboard_dir": None, "master_port": free_port()}
    (work / "run.yml").write_text(yaml.safe_dump(run_cfg))
    proc = run([ROOT / "deepy.py", "train.py", ROOT / "configs" / "tiny_cpu.yml", start / "model.yml",
                work / "run.yml"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = metadata.read_meta(work / "trained" / "global_step3")
    assert meta["layout"] == {"tp": 2, "pp": 2, "dp": 1}
    return work / "trained"


@pytest.fixture(scope="module")
def prompt_file(work):
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def tool_greedy(work, trained, prompt_file):
    out = work / "tool_out.jsonl"
    proc = tool("--model", trained, "--input-file", prompt_file, "--output-file", out, "--max-new-tokens", NEW,
                "--batch-size", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [json.loads(line) for line in out.read_text().splitlines()]


def trainer_argmax(tag: Path, tok, prompts, new_tokens: int, layout, device: str = "cpu"):
    """Argmax continuation by the trainer's model at TP 1 x PP 1 (loaded from `tag` as the trainer resumes another
    layout, megatron/checkpoint/reshard.py), full forward pass at every step (no cache), and the smallest gap
    between the best and second-best logit met on the way (so a pass is not luck). `layout`: a one-process
    layout (the single_rank fixture). tests_gpu/test_generation_gpu.py runs it on the GPU."""
    from megatron.checkpoint.convert import read_neox_model
    from megatron.checkpoint.reshard import SourceCheckpoint, _padded, local_tensors
    from megatron.model.llama import build_model

    keys, meta = read_neox_model(tag)
    cfg = hf_config.llama_config(keys, hf_config.padded_vocab(VOCAB, 128, 1))
    src = SourceCheckpoint(tag, meta, hf_config.llama_config(keys, _padded(cfg, meta)))
    model = build_model(cfg, layout).eval()
    model.load_state_dict(local_tensors(src, "weight", cfg, range(keys["num_layers"] + 3), 0, 1), strict=True)
    model.to(device)
    out, gap = [], float("inf")
    with torch.no_grad():
        for text in prompts:
            ids = [tok.bos_id] + tok.encode(text)
            new = []
            for _ in range(new_tokens):
                logits = model(torch.tensor([ids + new], device=device))[0, -1, :VOCAB].float()
                top = torch.topk(logits, 2).values
                gap = min(gap, (top[0] - top[1]).item())
                new.append(int(logits.argmax()))
                if new[-1] == EOS:
                    break
            out.append(new)
    return out, gap


@pytest.fixture(scope="module")
def reference(trained, tok, single_rank):
    return trainer_argmax(trained / "global_step3", tok, PROMPTS, NEW, single_rank)


@pytest.mark.distributed
def test_greedy_continuation_of_a_tp2_pp2_checkpoint_equals_the_trainers_argmax(tool_greedy, reference, tok):
    proc, records = tool_greedy
    ref, gap = reference
    # 10x the bound this model and transformers' agree to in fp32 (tests/test_hf_parity.py: 1e-5): a closer call
    # could flip on rounding alone, and the comparison would be luck.
    assert gap > 1e-4, f"the reference's top-2 logits come within {gap:.1e}"
    assert [r["prompt"] for r in records] == PROMPTS
    for rec, want in zip(records, ref):
        assert want[-1] != EOS and len(want) == NEW  # the budget, not a stop token, ends both
        assert (rec["tokens"], rec["stop"]) == (NEW, "length")
        assert rec["output"] == tok.decode(want), (rec["output"], tok.decode(want))
        assert rec["ids"] == want  # token for token
        assert rec["reasoning"] is None and rec["answer"] == rec["output"] and rec["seconds"] > 0
    assert "global_step3 (checkpoint, step 3, base: plain completion, stops at [128001])" in proc.stderr
    assert f"generated {2 * NEW} tokens for 2 prompt(s) in" in proc.stderr and "tokens/s" in proc.stderr
    # transformers imports torchao (installed for FP8) while it builds the model: its import-time noise (a line
    # per CUDA extension a CPU torch cannot load, pytree deprecations) is not shown to the user
    assert "Failed to load" not in proc.stderr and "register_constant" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.distributed
def test_deepy_generate_input_file_gives_the_same_continuations(work, trained, prompt_file, tool_greedy):
    cfg = {"load": str(trained), "text_gen_type": "input-file",
           "maximum_tokens": NEW, "temperature": 0.0, "recompute": True, "run_dir": str(work / "gen_run")}
    (work / "gen.yml").write_text(yaml.safe_dump(cfg))
    # GPT-NeoX's `-i` gives the prompt file (sample_input_file); the output goes to RUN_DIR/generations.jsonl.
    proc = run([ROOT / "deepy.py", "generate.py", ROOT / "configs" / "tiny_cpu.yml", work / "gen.yml",
                "-i", prompt_file])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = [json.loads(line) for line in (work / "gen_run" / "generations.jsonl").read_text().splitlines()]
    # recompute (no KV cache) and no batching here: the same tokens as the cached, batched tool run.
    assert [r["ids"] for r in got] == [r["ids"] for r in tool_greedy[1]]
    assert [(r["tokens"], r["stop"]) for r in got] == [(NEW, "length")] * 2  # maximum_tokens bounds it
    assert yaml.safe_load((work / "gen_run" / "config.yml").read_text())["text_gen_type"] == "input-file"
    # `-o` and `--iteration` land in the resolved config as sample_output_file and load_iteration.
    proc = run([ROOT / "deepy.py", "generate.py", work / "gen.yml", "-i", prompt_file, "-o", work / "out.jsonl",
                "--iteration", "3", "--dry-run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved = yaml.safe_load((work / "gen_run" / "config.yml").read_text())
    assert resolved["sample_output_file"] == str(work / "out.jsonl") and resolved["load_iteration"] == 3


def test_deepy_generate_refuses_keys_that_do_not_apply(work):
    (work / "bad_gen.yml").write_text(yaml.safe_dump({
        "text_gen_type": "interactive", "sample_input_file": "prompts.txt", "top_k": 5, "maximum_tokns": 3}))
    proc = run([ROOT / "deepy.py", "generate.py", work / "bad_gen.yml"])
    assert_user_error(proc, "Config errors (4); nothing was launched", "maximum_tokns = 3: unknown key",
                      "did you mean 'maximum_tokens'", "load = None: generate.py needs the model to load",
                      "sample_input_file,text_gen_type = 'prompts.txt': applies to text_gen_type input-file only",
                      "temperature 0 is greedy decoding")
    assert not (ROOT / "runs" / "bad_gen").exists()


# ------------------------------------------------------------------------------------- a model with a fixed reply
REPLY = "I think so.\n</think>\n\nB"


def build_scripted(work: Path, tok, **shape) -> dict:
    """{"base": HF export, "chat": HF export with --chat-model, "ckpt": the checkpoint}; see the module docstring.
    `shape`: LlamaConfig changes (tests_vllm needs 32-wide heads)."""
    reply = tok.encode(REPLY)
    starts = [tok.encode("<think>\n")[-1], tok.encode("\n\n")[-1]]  # after the reasoning prefill / a header
    chain = [(s, reply[0]) for s in starts] + list(zip(reply, reply[1:])) + [(reply[-1], EOT), (EOT, 9986),
                                                                             (9986, EOS)]
    sources = [s for s, _ in chain]
    assert len(set(sources)) == len(sources) <= 64 and tok.decode([9986]) == " tail"
    model = tiny_hf_llama(VOCAB, layers=1, seed=5, bos_token_id=128000, eos_token_id=EOS, **shape)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norms
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        for j, (s, t) in enumerate(chain):
            model.model.embed_tokens.weight[s, j] = 1.0
            model.lm_head.weight[t, j] = 1.0
    model.save_pretrained(str(work / "hf_scripted"))
    ckpt = hf_to_neox(work / "hf_scripted", work / "neox_scripted", 1, 1, **QUIET).parent
    base = neox_to_hf(ckpt, work / "scripted_base", **QUIET)
    chat = neox_to_hf(ckpt, work / "scripted_chat", **QUIET)
    hf_tokenizer.make_chat_model(chat)  # what convert_neox_to_hf.py --chat-model does
    return {"base": base, "chat": chat, "ckpt": ckpt}


@pytest.fixture(scope="module")
def scripted(work, tok):
    return build_scripted(work, tok)


def test_base_model_stops_at_end_of_text_not_at_eot(scripted):
    """(The chat export stops at <|eot_id|>: see the next test, whose replies end there with stop "eos".)"""
    base = tool("--model", scripted["base"], "--prompt", "Question\n\n", "--max-new-tokens", 40)
    assert base.returncode == 0, base.stderr[-3000:]
    assert base.stdout == "Question\n\n" + REPLY + "<|eot_id|> tail\n"  # past <|eot_id|>, up to <|end_of_text|>
    assert "base: plain completion, stops at [128001]" in base.stderr
    n = len(Llama3Tokenizer().encode(REPLY)) + 3  # the reply, <|eot_id|>, " tail", <|end_of_text|>
    assert f"generated {n} tokens in" in base.stderr
    # The token budget bounds both: see the 32-token continuations of the trained checkpoint (stop "length").


def test_chat_model_stops_at_eot_reasoning_file_keeps_the_whole_reply_and_interactive_hides_it(work, scripted):
    (work / "questions.txt").write_text("Is M31 a galaxy?\n\nWhat is a quasar?\n")
    out = work / "reasoning.jsonl"
    proc = tool("--model", scripted["chat"], "--input-file", work / "questions.txt", "--output-file", out,
                "--reasoning", "--hide-reasoning")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Is M31 a galaxy?", "What is a quasar?"]
    n = len(Llama3Tokenizer().encode(REPLY)) + 1  # the reply and <|eot_id|>
    for r in records:
        assert r["output"] == "<think>\n" + REPLY and (r["reasoning"], r["answer"]) == ("I think so.", "B")
        assert (r["stop"], r["tokens"], r["ids"][-1]) == ("eos", n, 33)  # stopped at <|eot_id|>, not after it
    assert "chat, stops at [128001, 128008, 128009]" in proc.stderr

    # Interactive, two turns then /reset and a third: only the answers are shown.
    proc = tool("--model", scripted["chat"], "--reasoning", "--hide-reasoning",
                stdin="Is M31 a galaxy?\nAnd M33?\n/reset\nWhat is a quasar?\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "B\nB\nB\n" and "<think>" not in proc.stdout
    assert "(conversation reset)" in proc.stderr and "tokens for 3 prompt(s)" in proc.stderr


def test_interactive_chat_keeps_the_history_as_llama_models_renders_it(scripted):
    """The prompts the interactive loop sends are ChatFormat's dialogs: each earlier turn (the assistant's answer
    without its reasoning) and the new question, after the reasoning system prompt."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    from megatron.generation.engine import HFEngine
    from megatron.generation.loading import load_model
    from megatron.generation.run import Options, interactive

    lm = load_model(scripted["chat"])
    seen = []

    class Recording(HFEngine):
        def generate(self, prompts, sampling):
            seen.extend(list(p) for p in prompts)
            return super().generate(prompts, sampling)

    out = io.StringIO()
    n = interactive(lm, Recording(lm), Options(reasoning=True, hide_reasoning=True),
                    inp=io.StringIO("Is M31 a galaxy?\nAnd M33?\n/reset\nWhat is a quasar?\n"), out=out,
                    err=io.StringIO())
    assert n == 3 and out.getvalue() == "B\nB\nB\n"
    shown = io.StringIO()  # without --hide-reasoning: the whole reply, the prefilled <think> included
    interactive(lm, HFEngine(lm), Options(reasoning=True), inp=io.StringIO("Is M31 a galaxy?\n"), out=shown,
                err=io.StringIO())
    assert shown.getvalue() == "<think>\n" + REPLY + "\n"
    fmt = ChatFormat(Tokenizer.get_instance())
    think = Llama3Tokenizer().encode("<think>\n")

    def ref(*turns):
        msgs = [RawMessage(role="system", content="detailed thinking on")]
        msgs += [RawMessage(role=r, content=c) for r, c in turns]
        return fmt.encode_dialog_prompt(msgs).tokens + think

    assert seen == [ref(("user", "Is M31 a galaxy?")),
                    ref(("user", "Is M31 a galaxy?"), ("assistant", "B"), ("user", "And M33?")),
                    ref(("user", "What is a quasar?"))]


def test_hidden_reasoning_that_never_closes_is_reported_not_blank(scripted):
    from megatron.generation.engine import Completion
    from megatron.generation.loading import load_model
    from megatron.generation.run import Options, interactive

    class Unfinished:  # replies that stay inside <think>: one cut by the budget, one ended by the model
        def __init__(self):
            self.stops = ["length", "eos"]

        def generate(self, prompts, sampling):
            stop = self.stops.pop(0)
            return [Completion(list(prompts[0]), [1, 2, 3], "still thinking", stop, 0.1,
                               None if stop == "length" else 128009)]

    out = io.StringIO()
    interactive(load_model(scripted["chat"]), Unfinished(), Options(reasoning=True, hide_reasoning=True),
                inp=io.StringIO("Q1?\nQ2?\n"), out=out, err=io.StringIO())
    first, second = out.getvalue().splitlines()
    assert first.startswith("(no answer: 3 tokens of reasoning without </think>; the token limit came first")
    assert second.startswith("(no answer: 4 tokens of reasoning without </think>; the model ended its reply")


def test_bad_inputs_exit_2_with_one_message_and_write_nothing(work, scripted):
    junk = work / "not_a_model"
    junk.mkdir()
    (junk / "readme.txt").write_text("x")
    assert_user_error(tool("--model", junk, "--prompt", "hi"), f"error: {junk} is neither a checkpoint",
                      "Pass a run's `save` folder")

    no_config = work / "no_config" / "global_step0"
    no_config.mkdir(parents=True)
    for f in scripted["ckpt"].glob("global_step0/*.pt"):
        os.link(f, no_config / f.name)
    assert_user_error(tool("--model", no_config, "--prompt", "hi"), "the model shape is unknown",
                      "The checkpoint's config is missing")

    long = work / "long.jsonl"
    long.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "galaxy " * 600}) + "\n")
    out = work / "long_out.jsonl"
    proc = tool("--model", scripted["base"], "--input-file", long, "--output-file", out)
    assert_user_error(proc, f"error: {long}:2 is 603 tokens, but the model's context is 512 tokens")
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_prompt_files_name_the_bad_line(work):
    from megatron.generation.run import InputFileError, read_prompts

    path = work / "mixed.txt"
    path.write_text('plain text prompt\n\n{"prompt": "json"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    got = read_prompts(str(path))
    assert [(p.where, p.text, p.messages) for p in got] == [
        (f"{path}:1", "plain text prompt", None), (f"{path}:3", "json", None),
        (f"{path}:4", None, [{"role": "user", "content": "hi"}])]
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(InputFileError, match=f"{path}:2: malformed JSON"):
        read_prompts(str(path))
    path.write_text('{"text": "no"}\n')
    with pytest.raises(InputFileError, match=f"{path}:1: a JSON line needs"):
        read_prompts(str(path))
    with pytest.raises(InputFileError, match="input file not found"):
        read_prompts(str(work / "missing.txt"))
