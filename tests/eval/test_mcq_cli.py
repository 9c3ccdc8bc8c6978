"""tools/eval/mcq.py as a user runs it: a memorising model scores 100% on what it memorised; a TP 2 x PP 2
checkpoint and its HF export give the same per-question predictions (the checkpoint run killed after one batch
and resumed); a random model lands in the binomial band around 25%; --compare of two runs."""

import json
from pathlib import Path

import pytest

import eval_helpers as H
from eval_helpers import run_tool

MCQ = "tools/eval/mcq.py"


def records(out: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}


@pytest.fixture(scope="session")
def checkpoint_run(eval_work, memorised, questions_file, shots_file) -> dict:
    out = eval_work / "run_checkpoint"
    cmd = [MCQ, "--model", memorised["checkpoint"], "--questions", questions_file, "--shots", shots_file,
           "--output", out, "--batch-size", "8", "--no-progress"]
    killed = run_tool(cmd + ["--stop-after-batches", "1"], check=False)
    partial = len((out / "predictions.jsonl").read_text().splitlines())
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "torn')  # a kill in the middle of a write
    resumed = run_tool(cmd)
    return {"out": out, "killed": killed, "partial": partial, "resumed": resumed}


def test_memorised_questions_score_100_percent(export_run):
    got = records(export_run)
    memorised = [got[q["id"]] for q in H.ASTRO_QUESTIONS]
    assert [r["prediction"] for r in memorised] == [q["answer"] for q in H.ASTRO_QUESTIONS]
    assert all(r["correct"] for r in memorised)
    summary = json.loads((export_run / "summary.json").read_text())
    # Llama-3 spells "Answer: B" as ..., ":", " B": the probe over the shots must find the leading-space set
    assert summary["spelling"] == "space-letter"
    assert summary["spelling_mass"]["space-letter"] > 10 * summary["spelling_mass"]["letter"]
    assert summary["n"] == summary["questions"] == 32 and summary["unparseable"] == 0
    assert summary["correct"] == sum(r["correct"] for r in got.values())
    lo, hi = summary["ci95"]
    assert lo < summary["accuracy"] < hi


def test_checkpoint_tp2_pp2_equals_its_export_after_a_resumed_kill(export_run, checkpoint_run):
    assert checkpoint_run["killed"].returncode != 0 and checkpoint_run["partial"] == 8
    assert "resuming" in checkpoint_run["resumed"].stderr and "8 of 32" in checkpoint_run["resumed"].stderr
    ours, theirs = records(checkpoint_run["out"]), records(export_run)
    assert len(ours) == 32 and set(ours) == set(theirs)  # the torn line was dropped, nothing scored twice
    assert len((checkpoint_run["out"] / "predictions.jsonl").read_text().splitlines()) == 32
    assert {i: r["prediction"] for i, r in ours.items()} == {i: r["prediction"] for i, r in theirs.items()}
    for i in ours:
        assert ours[i]["probs"] == pytest.approx(theirs[i]["probs"], abs=1e-4)
    a = json.loads((checkpoint_run["out"] / "summary.json").read_text())
    b = json.loads((export_run / "summary.json").read_text())
    assert (a["kind"], b["kind"], a["step"]) == ("checkpoint", "hf", 0)
    assert (a["accuracy"], a["spelling"]) == (b["accuracy"], b["spelling"])


def test_compare_two_runs(export_run, checkpoint_run):
    proc = run_tool([MCQ, "--compare", export_run, checkpoint_run["out"]])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == 32 and result["difference"] == 0 and result["mcnemar_p"] == 1.0
    assert "B - A = +0.0000" in proc.stdout


def test_a_changed_setting_is_refused_not_mixed_in(export_run, memorised, questions_file):
    proc = run_tool([MCQ, "--model", memorised["export"], "--questions", questions_file, "--output", export_run,
                     "--no-progress"], check=False)  # default shots this time
    assert proc.returncode == 2 and "shots" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_random_model_is_near_chance(eval_work, shots_file):
    import torch

    from hf_reference import tiny_hf_llama

    src = eval_work / "random_hf"
    tiny_hf_llama(vocab=H.LLAMA3_VOCAB, layers=2, seed=11).to(torch.float32).save_pretrained(str(src))
    questions = H.write_jsonl(eval_work / "synthetic200.jsonl", H.synthetic_questions(200, seed=7))
    out = eval_work / "run_random"
    run_tool([MCQ, "--model", src, "--questions", questions, "--shots", shots_file, "--output", out,
              "--batch-size", "25", "--no-progress"])  # short shots: 5x shorter prompts than the paper's examples
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 200
    # 25% +- 3 binomial standard deviations (sqrt(.25 * .75 / 200) = 3.1%)
    assert 0.158 <= summary["accuracy"] <= 0.342, summary


def test_instruct_method_end_to_end(eval_work, memorised):
    """Appendix B through the chat format and greedy generation: the memorising model was never taught to reply
    in JSON, so every reply is unparseable, counted, kept raw, and scored wrong."""
    questions = H.write_jsonl(eval_work / "astro8.jsonl", H.ASTRO_QUESTIONS)
    out = eval_work / "run_instruct"
    run_tool([MCQ, "--model", memorised["export"], "--questions", questions, "--method", "instruct",
              "--max-new-tokens", "6", "--output", out, "--no-progress"])
    summary = json.loads((out / "summary.json").read_text())
    got = records(out)
    assert summary["n"] == 8 and summary["unparseable"] == sum(not r["parsed"] for r in got.values())
    assert summary["correct"] == sum(bool(r["correct"]) for r in got.values())
    assert all(isinstance(r["text"], str) and r["stop"] in ("eos", "length") for r in got.values())
    assert all(r["correct"] is False for r in got.values() if not r["parsed"])


def test_instruct_next_token_prompt_is_one_user_turn():
    from megatron.data.tokenizer import build_tokenizer
    from megatron.eval.next_token import prompt_ids
    from megatron.eval.prompts import next_token_prompt
    from megatron.eval.questions import parse_row
    from megatron.eval.shots import PAPER_EXAMPLES, shots_for

    tok = build_tokenizer("Llama3Tokenizer")
    q = parse_row(H.ASTRO_QUESTIONS[0], "x", 1)
    text = next_token_prompt(q.question, q.options, shots_for(PAPER_EXAMPLES, q))
    ids = prompt_ids(tok, text, chat=True)
    decoded = "".join(tok.decode([i]) for i in ids)
    assert decoded == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + text
                       + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt_ids(tok, text, chat=False) == [128000] + tok.encode(text)
