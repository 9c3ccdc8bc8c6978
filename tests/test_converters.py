"""Hugging Face converters (tools/ckpts): HF Llama → this trainer at any TP/PP → HF, verified by logits.

Where things run (fp32 on CPU unless said):
  * this process: a random tiny LlamaForCausalLM (GQA 8:2, llama3 rope_scaling with a short original context,
    untied, perturbed norms) saved as several safetensors shards; conversions, round trips, error cases;
  * one deepy.py launch: 3 training steps at (TP, PP, DP) = (2, 2, 1) from the converted checkpoint;
  * one 4-rank gloo world (tests/distributed/converter_logits_worker.py) that loads every converted layout and the
    trained checkpoint through DeepSpeed's engine.load_checkpoint, as train.py does, and gathers the logits;
  * one clean interpreter (python -I, offline): an exported model and its tokenizer in plain transformers.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from megatron.checkpoint import hf_config, metadata  # noqa: E402
from megatron.checkpoint.convert import hf_to_neox, neox_to_hf  # noqa: E402
from megatron.checkpoint.hf_config import ConversionError  # noqa: E402
from megatron.checkpoint.safetensors_stream import INDEX_NAME  # noqa: E402
from megatron.data.indexed_dataset import IndexedDatasetWriter  # noqa: E402
from hf_reference import ROPE, tiny_hf_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 250  # pads to 256 rows at TP 1/2 and 512 at TP 4 (make_vocab_size_divisible_by 128)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)]  # TP 4 > 2 kv heads: each kv head shared by 2 ranks
TRAIN_STEPS = 3
QUIET = dict(progress=False, log=lambda msg: None)

# The Llama-3 tokenizer's test vectors (copied from the project's reference facts).
VECTORS = {"This is a test sentence.": [2028, 374, 264, 1296, 11914, 13], "user": [882], "system": [9125],
           "assistant": [78191], "\n\n": [271]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_safetensors_dir(path: Path) -> dict:
    if not (path / INDEX_NAME).exists():
        return safetensors_torch.load_file(str(path / "model.safetensors"))
    index = json.loads((path / INDEX_NAME).read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = safetensors_torch.load_file(str(path / shard))
        assert all(index["weight_map"][k] == shard for k in part), f"{shard} holds tensors the index places elsewhere"
        out.update(part)
    assert set(out) == set(index["weight_map"])
    return out


def hf_logits(model_dir_or_model, tokens: torch.Tensor) -> torch.Tensor:
    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits



def export_cli():
    """tools/ckpts/convert_neox_to_hf.py as a module, to call its main() in process."""
    spec = importlib.util.spec_from_file_location("cli", ROOT / "tools" / "ckpts" / "convert_neox_to_hf.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("converters")


@pytest.fixture(scope="module")
def hf_source(work):
    model = tiny_hf_llama(VOCAB)
    path = work / "hf"
    model.save_pretrained(str(path), max_shard_size="150KB")  # several shards and an index, as real checkpoints
    assert len(list(path.glob("*.safetensors"))) > 2
    return model, path


@pytest.fixture(scope="module")
def converted(work, hf_source) -> dict:
    _, path = hf_source
    return {(tp, pp): hf_to_neox(path, work / f"neox_tp{tp}_pp{pp}", tp, pp, **QUIET).parent for tp, pp in LAYOUTS}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    # 80 positions: past original_max_position_embeddings (32), where llama3 scaling matters.
    return torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(1))


def synthetic_corpus(prefix: str, n_docs: int = 100) -> None:
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(n_docs):
            start, step, length = rng.integers(0, VOCAB), rng.integers(1, 4), rng.integers(40, 120)
            w.add_document((start + step * np.arange(length)) % VOCAB)
        w.finalize()


@pytest.fixture(scope="module")
def trained(work, converted):
    """3 steps at (2, 2, 1) through deepy.py → train.py, starting from the converted (2, 2) checkpoint."""
    src = converted[(2, 2)]
    prefix = str(work / "corpus_text_document")
    synthetic_corpus(prefix)
    run = {"num_gpus": 4, "model_parallel_size": 2, "pipe_parallel_size": 2, "load": str(src),
           "save": str(work / "trained"), "data_path": prefix, "split": "100,0,0", "seq_length": 32,
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_iters": TRAIN_STEPS,
           "log_interval": 1, "eval_iters": 0, "eval_interval": 1000, "warmup": 0.0, "min_lr": 1.0e-4,
           "optimizer": {"type": "Adam", "params": {"lr": 1.0e-3}}, "run_dir": str(work / "run"),
           "use_wandb": False, "tensorboard_dir": None, "master_port": free_port()}
    (work / "run.yml").write_text(yaml.safe_dump(run))
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", str(ROOT / "configs" / "tiny_cpu.yml"),
           str(src / "model.yml"), str(work / "run.yml")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    return proc, work / "trained"


@pytest.fixture(scope="module")
def our_logits(work, converted, trained, tokens) -> dict:
    """This trainer's logits for every converted layout and for the trained checkpoint, from one 4-rank world."""
    jobs = [{"name": f"tp{tp}_pp{pp}", "ckpt": str(converted[(tp, pp)]), "tp": tp, "pp": pp} for tp, pp in LAYOUTS]
    if trained[0].returncode == 0:
        jobs.append({"name": "trained", "ckpt": str(trained[1]), "tp": 2, "pp": 2})
    out = work / "logits"
    out.mkdir()
    torch.save(tokens, work / "tokens.pt")
    spec = work / "jobs.json"
    spec.write_text(json.dumps({"tokens": str(work / "tokens.pt"), "out_dir": str(out), "jobs": jobs}))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "distributed" / "converter_logits_worker.py"),
                           str(spec), "4"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                               "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {p.stem: torch.load(p) for p in out.glob("*.pt")}


# --------------------------------------------------------------------------------------------- HF → here
@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{tp}_pp{pp}" for tp, pp in LAYOUTS])
def test_converted_checkpoint_logits_equal_hf(tp, pp, hf_source, our_logits, tokens):
    ref = hf_logits(hf_source[0], tokens)
    got = our_logits[f"tp{tp}_pp{pp}"]
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-5, f"TP {tp} PP {pp}: max |logit difference| {diff:.2e} > 1e-5"


def test_converted_checkpoint_is_a_complete_weights_only_checkpoint(converted, hf_source):
    from megatron.config.loader import load_config
    from megatron.model.config import LlamaConfig

    model = hf_source[0]
    for (tp, pp), root in converted.items():
        assert (root / metadata.LATEST).read_text().strip() == "global_step0"
        tag = root / "global_step0"
        meta = metadata.read_meta(tag)
        assert metadata.find_loadable_tag(root) == "global_step0"
        assert (meta["source"], meta["iteration"], meta["has_optimizer"]) == ("hf", 0, False)
        assert meta["layout"] == {"tp": tp, "pp": pp, "dp": 1}
        m = meta["model"]
        assert (m["num_layers"], m["hidden_size"], m["num_attention_heads"], m["num_kv_heads"],
                m["intermediate_size"], m["vocab_size"]) == (3, 64, 8, 2, 160, VOCAB)
        assert m["rope_scaling"] == ROPE and m["rotary_emb_base"] == 500000.0
        assert m["padded_vocab_size"] == (512 if tp == 4 else 256)
        assert len(list(tag.glob("layer_*-model_*-model_states.pt"))) == tp * (3 + 3)
        assert len(list(tag.glob("mp_rank_*_model_states.pt"))) == tp * pp
        # Each file holds its shard's bytes only (a saved view would drag its whole base tensor along).
        weight_bytes = 4 * (model.num_parameters() + 2 * (m["padded_vocab_size"] - VOCAB) * 64)
        on_disk = sum(p.stat().st_size for p in tag.glob("layer_*"))
        assert weight_bytes < on_disk < weight_bytes + 8000 * tp * 6, (on_disk, weight_bytes)
        # model.yml is a valid config fragment that builds exactly this model at this layout.
        run = {"train_iters": 1, "data_path": "unused", "num_gpus": tp * pp}  # what a run file adds
        cfg = load_config([str(ROOT / "configs" / "tiny_cpu.yml"), str(root / "model.yml")], extra=run).config
        assert (cfg.model_parallel_size, cfg.pipe_parallel_size) == (tp, pp)
        ours = LlamaConfig.from_neox(cfg, cfg.vocab_size, torch.float32)
        theirs = hf_config.llama_config(hf_config.model_keys_from_neox(m, "meta"), m["padded_vocab_size"])
        for field in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
                      "vocab_size", "padded_vocab_size", "max_position_embeddings", "rms_norm_epsilon",
                      "rope_theta", "rope_scaling"):
            assert getattr(ours, field) == getattr(theirs, field), field


def test_mp_rank_files_describe_the_stages_deepspeed_builds(converted):
    """param_shapes in mp_rank_{pp*tp+tp_rank} list exactly that stage's parameters (DeepSpeed's partition)."""
    root = converted[(2, 2)] / "global_step0"
    stages = []
    for mp in range(4):
        state = torch.load(root / metadata.mp_rank_file(mp), weights_only=False)
        assert state["module"] is None and state["mp_world_size"] == 4 and state["dp_world_size"] == 1
        stages.append(sorted({int(n.split(".")[0]) for n in state["param_shapes"][0]}))
    # 3 layers over 2 stages by `type:transformer`: [embedding, layer 1, layer 2] and [layer 3, norm, output].
    assert stages == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]


# --------------------------------------------------------------------------------------------- round trips
def test_round_trip_gives_bit_identical_tensors_and_config(work, hf_source, converted):
    _, src = hf_source
    ref = read_safetensors_dir(src)
    for layout in ((4, 1), (1, 2)):
        out = neox_to_hf(converted[layout], work / f"back_{layout[0]}{layout[1]}", max_shard_size=120_000, **QUIET)
        back = read_safetensors_dir(out)
        assert set(back) == set(ref)
        for name, t in ref.items():
            assert back[name].dtype == t.dtype and torch.equal(back[name], t), (layout, name)
        assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
        assert json.loads((out / "generation_config.json").read_text()) == \
            json.loads((src / "generation_config.json").read_text())
        shards = sorted(out.glob("model-*.safetensors"))
        assert len(shards) > 1 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
        assert all(p.stat().st_size <= 120_000 + 4096 for p in shards if len(safetensors_torch.load_file(p)) > 1)


def test_round_trip_bf16_keeps_dtype_and_tied_source_is_untied(work):
    model = tiny_hf_llama(VOCAB, layers=2, seed=3, tie=True).to(torch.bfloat16)
    src = work / "hf_bf16_tied"
    model.save_pretrained(str(src))
    ckpt = hf_to_neox(src, work / "neox_bf16_tied", 2, 1, **QUIET).parent
    out = neox_to_hf(ckpt, work / "back_bf16_tied", **QUIET)
    ref, back = read_safetensors_dir(src), read_safetensors_dir(out)
    assert "lm_head.weight" not in ref  # tied: HF saved the embedding only
    assert torch.equal(back["lm_head.weight"], ref["model.embed_tokens.weight"])
    for name, t in ref.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], t), name
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["dtype"] == "bfloat16"
    fp32 = neox_to_hf(ckpt, work / "back_fp32", dtype="fp32", **QUIET)
    assert read_safetensors_dir(fp32)["model.norm.weight"].dtype == torch.float32
    assert json.loads((fp32 / "config.json").read_text())["dtype"] == "float32"


# --------------------------------------------------------------------------------------------- train, export
@pytest.mark.distributed
def test_train_at_2_2_1_then_export_equals_transformers(work, hf_source, trained, our_logits, tokens):
    proc, ckpt = trained
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    meta = metadata.read_meta(ckpt / metadata.tag_for(TRAIN_STEPS))
    assert meta["iteration"] == TRAIN_STEPS and meta["layout"] == {"tp": 2, "pp": 2, "dp": 1}

    out = neox_to_hf(ckpt, work / "exported", **QUIET)
    exported = read_safetensors_dir(out)
    source = read_safetensors_dir(hf_source[1])
    # Trained from the converted weights: every tensor moved, but only by a few Adam steps (a random restart
    # would be ~0.03 away).
    moved = max((exported[k] - source[k]).abs().max().item() for k in source)
    assert 0 < moved < 0.01, moved

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["rope_scaling"] == ROPE and config["rope_theta"] == 500000.0
    assert (config["num_key_value_heads"], config["tie_word_embeddings"], config["dtype"]) == (2, False, "float32")
    assert config["vocab_size"] == VOCAB and config["num_hidden_layers"] == 3

    ref = hf_logits(out, tokens)
    diff = (our_logits["trained"] - ref).abs().max().item()
    assert diff <= 1e-5, f"exported model vs this trainer: max |logit difference| {diff:.2e} > 1e-5"


# --------------------------------------------------------------------------------------------- a clean process
CLEAN_PROCESS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, vectors, messages = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
prompt = tok("The sky is", return_tensors="pt")
out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
print(json.dumps({
    "encoded": {text: tok.encode(text, add_special_tokens=False) for text in vectors},
    "with_bos": tok("This is a test sentence.").input_ids,
    "bos": tok.bos_token_id, "eos": tok.eos_token_id,
    "chat": tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False),
    "generated": out[0].tolist(), "prompt": prompt.input_ids[0].tolist(),
    "dtype": str(model.dtype), "ours_imported": any(m.split(".")[0] == "megatron" for m in sys.modules),
}))
"""


@pytest.mark.distributed
def test_export_with_llama3_vocab_loads_offline_in_a_clean_transformers_process(work):
    """Both CLIs, then a fresh `python -I` (no repo on the path, offline) loads model and tokenizer and generates."""
    src = work / "hf_llama3_vocab"
    tiny_hf_llama(vocab=hf_config.LLAMA3_VOCAB_SIZE, layers=2, seed=5, bos_token_id=128000,
            eos_token_id=128001).to(torch.bfloat16).save_pretrained(str(src))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    neox, hf = work / "neox_llama3_vocab", work / "hf_export_llama3_vocab"
    for cmd in (["convert_hf_llama_to_neox.py", "--hf-dir", src, "--output-dir", neox, "--tp", "2", "--pp", "2"],
                ["convert_neox_to_hf.py", "--input-dir", neox, "--output-dir", hf, "--max-shard-size", "20MB"]):
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "ckpts" / cmd[0]), *map(str, cmd[1:])],
                              capture_output=True, text=True, timeout=300, env=env, cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "peak RSS" in proc.stderr
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "config.json", INDEX_NAME):
        assert (hf / name).is_file(), name
    assert len(list(hf.glob("model-*-of-*.safetensors"))) >= 2
    assert yaml.safe_load((neox / "model.yml").read_text())["tokenizer_type"] == "Llama3Tokenizer"

    messages = [{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": "What is a quasar?"}]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    clean_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", "-c", CLEAN_PROCESS, str(hf), json.dumps(list(VECTORS)),
                           json.dumps(messages)], capture_output=True, text=True, timeout=300, env=clean_env,
                          cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["ours_imported"]
    assert got["encoded"] == VECTORS
    assert got["with_bos"] == [128000] + VECTORS["This is a test sentence."]
    assert (got["bos"], got["eos"]) == (128000, 128001)
    assert got["dtype"] == "torch.bfloat16"
    assert len(got["generated"]) == len(got["prompt"]) + 6 and got["generated"][: len(got["prompt"])] == got["prompt"]

    # The chat template gives Meta's reference ChatFormat tokens (llama_models, the same wheel as the BPE file).
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    reference = ChatFormat(Tokenizer.get_instance()).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in messages]).tokens
    assert got["chat"] == reference

    config = json.loads((hf / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (128000, 128001, 128256)


# --------------------------------------------------------------------------------------------- chat-model export
CHAT_PROCESS = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
messages = json.loads(sys.argv[3])
out = {}
for kind, path in (("chat", sys.argv[1]), ("base", sys.argv[2])):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = torch.tensor([prompt])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    turn = messages + [{"role": "assistant", "content": "A quasar is an active galactic nucleus."}]
    out[kind] = {
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "generation_config_eos": GenerationConfig.from_pretrained(path).eos_token_id,
        "model_eos": model.generation_config.eos_token_id,
        "prompt": prompt, "new": generated[0, len(prompt):].tolist(),
        "turn": tok.apply_chat_template(turn, tokenize=True, return_dict=False),
        "answer": tok.encode("A quasar is an active galactic nucleus.", add_special_tokens=False),
    }
print(json.dumps(out))
"""


def always_eot_llama3_model():
    """A tiny Llama-3-vocabulary model whose greedy next token is always <|eot_id|> (128009): every token embeds
    to the same vector e, the layers add nothing (o_proj and down_proj zero), and lm_head scores only row 128009
    (= e, so its logit e . norm(e) is positive while all others are 0)."""
    model = tiny_hf_llama(vocab=hf_config.LLAMA3_VOCAB_SIZE, layers=2, seed=7, bos_token_id=128000,
                          eos_token_id=128001)
    with torch.no_grad():
        e = torch.rand(64, generator=torch.Generator().manual_seed(7)) + 0.5
        model.model.embed_tokens.weight.copy_(e.expand_as(model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[128009] = e
    assert (model.model.norm.weight > 0).all()
    return model


@pytest.fixture(scope="module")
def eot_checkpoint(work) -> Path:
    src = work / "hf_always_eot"
    always_eot_llama3_model().save_pretrained(str(src))
    return hf_to_neox(src, work / "neox_always_eot", 1, 1, **QUIET).parent


@pytest.fixture(scope="module")
def eot_base_export(work, eot_checkpoint) -> Path:
    """The same checkpoint exported without --chat-model (a base model)."""
    return neox_to_hf(eot_checkpoint, work / "hf_eot_base", **QUIET)


def test_chat_model_export_stops_at_eot_in_transformers(work, eot_checkpoint, eot_base_export):
    """--chat-model: eos_token <|eot_id|>, eos_token_id [128001, 128008, 128009] as Meta's Llama-3.1-*-Instruct;
    in a clean transformers process the chat template gives ChatFormat's tokens, an assistant turn ends with
    <|eot_id|>, and generation stops at <|eot_id|>; the same checkpoint exported without the flag does not stop."""
    from megatron.checkpoint.hf_tokenizer import CHAT_TEMPLATE

    base = eot_base_export
    chat = work / "hf_eot_chat"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "ckpts" / "convert_neox_to_hf.py"), "--input-dir",
                           str(eot_checkpoint), "--output-dir", str(chat), "--chat-model", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "chat model: eos_token <|eot_id|>, eos_token_id [128001, 128008, 128009]" in proc.stderr

    files = {d: {n: json.loads((d / n).read_text()) for n in ("config.json", "generation_config.json",
                                                               "tokenizer_config.json", "special_tokens_map.json")}
             for d in (base, chat)}
    assert files[chat]["generation_config.json"] == {**files[base]["generation_config.json"],
                                                     "eos_token_id": [128001, 128008, 128009]}
    assert files[chat]["generation_config.json"]["bos_token_id"] == 128000
    assert files[chat]["config.json"] == {**files[base]["config.json"], "eos_token_id": [128001, 128008, 128009]}
    assert files[chat]["tokenizer_config.json"] == {**files[base]["tokenizer_config.json"], "eos_token": "<|eot_id|>"}
    assert files[chat]["special_tokens_map.json"]["eos_token"]["content"] == "<|eot_id|>"
    # Without the flag: the base model's, as before; the chat template is written in both.
    assert files[base]["generation_config.json"]["eos_token_id"] == 128001
    assert files[base]["config.json"]["eos_token_id"] == 128001
    assert files[base]["tokenizer_config.json"]["eos_token"] == "<|end_of_text|>"
    assert files[base]["tokenizer_config.json"]["chat_template"] == CHAT_TEMPLATE

    messages = [{"role": "system", "content": "detailed thinking off"},
                {"role": "user", "content": "What is a quasar?"}]
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    clean_env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", "-c", CHAT_PROCESS, str(chat), str(base), json.dumps(messages)],
                          capture_output=True, text=True, timeout=300, env=clean_env, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    c, b = got["chat"], got["base"]
    assert (c["eos_token"], c["eos_token_id"]) == ("<|eot_id|>", 128009)
    assert c["generation_config_eos"] == c["model_eos"] == [128001, 128008, 128009]
    assert c["new"] == [128009]  # stopped at the end of the assistant's turn
    assert (b["eos_token"], b["eos_token_id"], b["generation_config_eos"]) == ("<|end_of_text|>", 128001, 128001)
    assert b["new"] == [128009] * 5  # a base model's config does not stop there

    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    reference = ChatFormat(Tokenizer.get_instance()).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in messages]).tokens
    assert c["prompt"] == b["prompt"] == reference
    # A finished assistant turn is the prompt, the answer and <|eot_id|>: what SFT trains the model to produce.
    assert c["turn"] == reference + c["answer"] + [128009]


def test_chat_model_export_edits_copied_tokenizers_and_refuses_other_vocabularies(work, eot_base_export, converted,
                                                                                    capsys):
    import shutil

    from megatron.checkpoint.hf_tokenizer import CHAT_TEMPLATE, make_chat_model

    # Copied tokenizer files (--tokenizer-dir), e.g. a base model's without a chat template, eos as a mapping.
    d = work / "chat_copied"
    shutil.copytree(eot_base_export, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    cfg["eos_token"] = {"__type": "AddedToken", "content": "<|end_of_text|>", "special": True}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert sorted(make_chat_model(d)) == ["config.json", "generation_config.json", "special_tokens_map.json",
                                          "tokenizer_config.json"]
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == {"__type": "AddedToken", "content": "<|eot_id|>", "special": True}
    assert cfg["chat_template"] == CHAT_TEMPLATE

    cli = export_cli()
    out = work / "chat_refused"
    assert cli.main(["--input-dir", str(converted[(1, 1)]), "--output-dir", str(out), "--chat-model",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --chat-model needs the Llama-3 vocabulary") and f"vocab_size is {VOCAB}" in err
    assert not out.exists()  # refused before anything was written


# --------------------------------------------------------------------------------------------- Llama-3.1 config
def test_config_json_for_llama31_8b_matches_meta_release():
    """The exported config.json of an 8B-shaped checkpoint (model keys from configs/llama3.1-8b.yml)."""
    raw = yaml.safe_load((ROOT / "configs" / "llama3.1-8b.yml").read_text())
    keys = hf_config.model_keys_from_neox(raw, "llama3.1-8b.yml")
    config = hf_config.hf_config_from_keys(keys, "bfloat16")
    expected = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
                "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16", "hidden_act": "silu",
                "attention_bias": False, "mlp_bias": False,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert {k: config[k] for k in expected} == expected
    assert hf_config.same_model(hf_config.model_keys_from_hf(config), keys)
    parsed = transformers.LlamaConfig.from_dict(config)
    assert parsed.num_key_value_heads == 8 and parsed.tie_word_embeddings is False


# --------------------------------------------------------------------------------------------- errors
def _copy_hf(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_errors_name_the_file_tensor_and_shape(work, hf_source):
    _, src = hf_source
    index = json.loads((src / INDEX_NAME).read_text())["weight_map"]

    bad = _copy_hf(src, work / "err_missing_shard")
    shard = index["model.layers.1.mlp.up_proj.weight"]
    (bad / shard).unlink()
    with pytest.raises(ConversionError, match=f"missing: {shard}"):
        hf_to_neox(bad, work / "o1", **QUIET)

    bad = _copy_hf(src, work / "err_unknown")
    extra = bad / "model-extra.safetensors"
    safetensors_torch.save_file({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)}, str(extra))
    idx = json.loads((bad / INDEX_NAME).read_text())
    idx["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = extra.name
    (bad / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(ConversionError, match=r"no place for: model\.layers\.0\.self_attn\.q_norm\.weight "
                                              r"\(model-extra\.safetensors\)"):
        hf_to_neox(bad, work / "o2", **QUIET)

    bad = _copy_hf(src, work / "err_shape")
    _edit_config(bad, intermediate_size=192)
    shard = index["model.layers.0.mlp.gate_proj.weight"]
    with pytest.raises(ConversionError, match=rf"model\.layers\.0\.mlp\.gate_proj\.weight in {shard} has shape "
                                              rf"\[160, 64\], config\.json implies \[192, 64\]"):
        hf_to_neox(bad, work / "o3", **QUIET)

    with pytest.raises(ConversionError, match="TP 3 does not divide num_attention_heads 8"):
        hf_to_neox(src, work / "o4", tp=3, **QUIET)
    with pytest.raises(ConversionError, match="PP 4 is more stages than num_layers 3"):
        hf_to_neox(src, work / "o4", tp=1, pp=4, **QUIET)

    bad = _copy_hf(src, work / "err_arch")
    _edit_config(bad, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ConversionError, match="only LlamaForCausalLM"):
        hf_to_neox(bad, work / "o5", **QUIET)
    _edit_config(bad, architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=True)
    with pytest.raises(ConversionError, match="attention_bias = True"):
        hf_to_neox(bad, work / "o5", **QUIET)
    assert not (work / "o5").exists()  # refused before anything was written


def test_export_errors_and_cli_exit_code(work, converted, capsys):
    import shutil

    ckpt = work / "err_ckpt"
    shutil.copytree(converted[(2, 1)], ckpt)
    (ckpt / "global_step0" / metadata.layer_file(2, 1)).unlink()
    with pytest.raises(ConversionError, match=r"missing for TP 2, 3 layers: layer_02-model_01-model_states\.pt"):
        neox_to_hf(ckpt, work / "e1", **QUIET)

    # A checkpoint saved at TP 2 whose metadata claims another width: the shard shape is named.
    meta = metadata.read_meta(converted[(1, 1)] / "global_step0")
    meta["model"]["hidden_size"] = 128
    shutil.copytree(converted[(1, 1)], work / "err_shape_ckpt")
    metadata.write_meta(work / "err_shape_ckpt" / "global_step0", meta)
    with pytest.raises(ConversionError, match=r"word_embeddings\.weight has shape \[256, 64\], expected \[256, 128\]"):
        neox_to_hf(work / "err_shape_ckpt", work / "e2", **QUIET)

    # A layer file cut short (a copy that did not finish): named as unreadable; the shard being written when it was
    # reached is removed, so the output folder holds no half file.
    shutil.copytree(converted[(1, 1)], work / "err_cut_ckpt")
    cut = work / "err_cut_ckpt" / "global_step0" / metadata.layer_file(2, 0)
    cut.write_bytes(cut.read_bytes()[:1000])
    with pytest.raises(ConversionError, match=rf"{cut.name} cannot be read"):
        neox_to_hf(work / "err_cut_ckpt", work / "e_cut", **QUIET)
    assert list((work / "e_cut").iterdir()) == []

    # --overwrite writes the new export beside the old one and swaps it in when complete: a failed overwrite leaves
    # the old model whole; a finished one replaces it and keeps the folder's other files.
    neox_to_hf(converted[(1, 1)], work / "e_over", dtype="bf16", **QUIET)
    (work / "e_over" / "NOTES.md").write_text("mine\n")
    before = {f.name: f.read_bytes() for f in (work / "e_over").iterdir()}
    with pytest.raises(ConversionError, match="already holds a model"):
        neox_to_hf(converted[(1, 1)], work / "e_over", dtype="fp32", **QUIET)
    with pytest.raises(ConversionError, match=rf"{cut.name} cannot be read"):
        neox_to_hf(work / "err_cut_ckpt", work / "e_over", overwrite=True, **QUIET)
    assert {f.name: f.read_bytes() for f in (work / "e_over").iterdir()} == before
    neox_to_hf(converted[(1, 1)], work / "e_over", dtype="fp32", overwrite=True, **QUIET)
    assert json.loads((work / "e_over" / "config.json").read_text())["dtype"] == "float32"
    assert (work / "e_over" / "NOTES.md").read_text() == "mine\n"
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".e_over")) == []

    with pytest.raises(ConversionError, match="already holds a checkpoint"):
        hf_to_neox(work / "hf", converted[(1, 1)], **QUIET)

    cli = export_cli()
    assert cli.main(["--input-dir", str(work / "nowhere"), "--output-dir", str(work / "e3")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err
