"""mcq_eval: the knowledge curve during training. A TP 2 x PP 2 run through deepy.py (from the memorised
checkpoint) scores the MCQ on the training model at step 2 and logs mcq/accuracy; tools/eval/mcq.py on the
checkpoint saved at that step gives the same per-question predictions and accuracy."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

from eval_helpers import ENV, ROOT, run_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def training_run(eval_work, memorised, questions_file, shots_file):
    from megatron.data.indexed_dataset import IndexedDatasetWriter

    prefix = str(eval_work / "corpus_text_document")
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(60):
            w.add_document(rng.integers(0, 128000, rng.integers(60, 200)))
        w.finalize()
    run = {"num_gpus": 4, "load": str(memorised["checkpoint"]), "save": str(eval_work / "mcq_ckpt"),
           "checkpoint_factor": 2, "data_path": prefix, "split": "100,0,0", "seq_length": 128,
           "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_iters": 2,
           "log_interval": 1, "eval_iters": 0, "eval_interval": 1000, "warmup": 0.0, "min_lr": 1.0e-5,
           "optimizer": {"type": "Adam", "params": {"lr": 1.0e-4}}, "run_dir": str(eval_work / "mcq_run"),
           "use_wandb": False, "tensorboard_dir": None, "master_port": free_port(),
           "mcq_eval": {"questions": questions_file, "shots": shots_file, "interval": 2}}
    (eval_work / "mcq_run.yml").write_text(yaml.safe_dump(run))
    cmd = [sys.executable, str(ROOT / "deepy.py"), "train.py", str(ROOT / "configs" / "tiny_cpu.yml"),
           str(memorised["checkpoint"] / "model.yml"), str(eval_work / "mcq_run.yml")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**ENV, "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tool = eval_work / "mcq_tool_step2"
    run_tool(["tools/eval/mcq.py", "--model", eval_work / "mcq_ckpt", "--step", "2", "--questions",
              questions_file, "--shots", shots_file, "--output", tool, "--no-progress"])
    return proc, eval_work / "mcq_run", tool


def test_in_training_curve_equals_the_standalone_tool(training_run):
    proc, run_dir, tool = training_run
    out = proc.stdout + proc.stderr
    assert "TP 2 x PP 2" in out and "MCQ (next-token) at step 2: accuracy" in out
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mcq = [r for r in logged if "mcq/accuracy" in r]
    assert [r["step"] for r in mcq] == [2]
    assert (run_dir / "curves.png").is_file()  # the run's plot carries the MCQ curve
    summary = json.loads((tool / "summary.json").read_text())
    assert summary["step"] == 2 and summary["n"] == 32
    assert mcq[0]["mcq/accuracy"] == summary["accuracy"]
    assert [mcq[0]["mcq/ci95_low"], mcq[0]["mcq/ci95_high"]] == pytest.approx(summary["ci95"])
    ours = {r["id"]: r for r in map(json.loads, (run_dir / "mcq" / "step_2.jsonl").read_text().splitlines())}
    theirs = {r["id"]: r for r in map(json.loads, (tool / "predictions.jsonl").read_text().splitlines())}
    assert {i: r["prediction"] for i, r in ours.items()} == {i: r["prediction"] for i, r in theirs.items()}
    for i in ours:
        assert ours[i]["probs"] == pytest.approx(theirs[i]["probs"], abs=1e-4)


def test_a_bad_mcq_eval_file_is_a_config_error_before_launch(eval_work):
    bad = eval_work / "bad_questions.jsonl"
    bad.write_text('{"question": "Q?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "B"}\n'
                   '{"question": "Q2?", "options": ["a", "b"]}\n')
    (eval_work / "bad_mcq.yml").write_text(yaml.safe_dump({"mcq_eval": {"questions": str(bad), "interval": 5}}))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(ROOT / "configs" / "tiny_cpu.yml"),
                           str(ROOT / "configs" / "demo.yml"), str(eval_work / "bad_mcq.yml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2
    assert f"mcq_eval.questions = '{bad}': {bad}:2: 'options' must be a list of exactly 4 strings" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_question_longer_than_seq_length_is_refused_before_launch(eval_work, training_run, shots_file):
    long_q = eval_work / "long_questions.jsonl"
    long_q.write_text(json.dumps({"id": "long-one", "question": "Why? " * 150, "A": "a", "B": "b", "C": "c",
                                  "D": "d", "answer": "A"}) + "\n")
    (eval_work / "long_mcq.yml").write_text(yaml.safe_dump({
        "save": str(eval_work / "long_ckpt"), "run_dir": str(eval_work / "long_run"),
        "mcq_eval": {"questions": str(long_q), "shots": shots_file, "interval": 2}}))
    proc = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(ROOT / "configs" / "tiny_cpu.yml"),
                           str(eval_work / "memorised_tp2_pp2" / "model.yml"), str(eval_work / "mcq_run.yml"),
                           str(eval_work / "long_mcq.yml")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=ENV)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{long_q}:1: the next-token prompt of question 'long-one' is" in proc.stderr
    assert "longer than seq_length 128" in proc.stderr and "launch:" not in proc.stdout
    assert not (eval_work / "long_ckpt").exists()
