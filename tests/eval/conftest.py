"""Models and runs shared by the evaluation tests (session-scoped: built once, read by several tests).

- `memorised`: a tiny Llama-3-vocabulary model trained to know ASTRO_QUESTIONS, converted to a TP 2 x PP 2
  checkpoint of this trainer and exported back to an HF folder (with tokenizer files), both by the project's CLIs.
- `questions_file`: the eight memorised questions plus 24 synthetic ones (the model's answers to those are
  arbitrary: a sharper check that the checkpoint and its export agree).
"""

from pathlib import Path

import pytest

import eval_helpers as H
from eval_helpers import run_tool


@pytest.fixture(scope="session")
def eval_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="session")
def memorised(eval_work) -> dict:
    import torch

    model, loss = H.memorising_model()
    src = eval_work / "memorised_src"
    model.to(torch.float32).save_pretrained(str(src))
    ckpt, export = eval_work / "memorised_tp2_pp2", eval_work / "memorised_hf"
    run_tool(["tools/ckpts/convert_hf_llama_to_neox.py", "--hf-dir", src, "--output-dir", ckpt, "--tp", "2",
              "--pp", "2", "--no-progress"])
    run_tool(["tools/ckpts/convert_neox_to_hf.py", "--input-dir", ckpt, "--output-dir", export, "--no-progress"])
    return {"checkpoint": ckpt, "export": export, "loss": loss}


@pytest.fixture(scope="session")
def questions_file(eval_work) -> str:
    return H.write_jsonl(eval_work / "questions.jsonl", H.ASTRO_QUESTIONS + H.synthetic_questions(24, seed=3))


@pytest.fixture(scope="session")
def shots_file(eval_work) -> str:
    return H.write_jsonl(eval_work / "shots.jsonl", H.SHOTS)


@pytest.fixture(scope="session")
def export_run(eval_work, memorised, questions_file, shots_file) -> Path:
    out = eval_work / "run_export"
    run_tool(["tools/eval/mcq.py", "--model", memorised["export"], "--questions", questions_file, "--shots",
              shots_file, "--output", out, "--batch-size", "8", "--no-progress"])
    return out
