"""lm-evaluation-harness: `python deepy.py eval.py` (GPT-NeoX's surface; the registered "neox" model) on the TP 2 x
PP 2 checkpoint scores a local task (a JSONL this test writes, no hub) end to end, every document, with the accuracy
lm-eval's own `hf` model gets on the exported folder through tools/eval/harness.py; and lm-eval's per-document choice equals tools/eval/mcq.py's next-token prediction on the same
prompts (lm-eval compares log-likelihoods of " A".." D", the tool the four next-token logits)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eval_helpers import ENV, ROOT, run_tool

pytest.importorskip("lm_eval")


@pytest.fixture(scope="session")
def task_dir(eval_work, questions_file, shots_file) -> Path:
    """The questions of the MCQ runs, each doc's text the tool's own next-token prompt (same shots)."""
    from megatron.eval.lm_eval_task import write_mcq_task
    from megatron.eval.questions import read_questions
    from megatron.eval.shots import read_shots

    d = eval_work / "tasks"
    write_mcq_task(read_questions(questions_file), read_shots(shots_file), d, "astro_local")
    return d


def harness(eval_work, task_dir, model, model_args, name) -> dict:
    out = eval_work / f"harness_{name}"
    run_tool(["tools/eval/harness.py", "--model", model, "--model_args", model_args, "--tasks", "astro_local",
              "--include_path", task_dir, "--batch_size", "8", "--device", "cpu", "--output_path", out,
              "--log_samples"])
    results = json.loads(Path(sorted(glob.glob(f"{out}/**/results_*.json", recursive=True))[-1]).read_text())
    samples = [json.loads(x) for f in glob.glob(f"{out}/**/samples_astro_local_*.jsonl", recursive=True)
               for x in Path(f).read_text().splitlines()]
    return {"results": results, "samples": samples}


def deepy_eval(eval_work, task_dir, checkpoint) -> dict:
    """GPT-NeoX's surface: `python deepy.py eval.py CONFIG --eval_tasks ...` on the TP 2 x PP 2 checkpoint."""
    out = eval_work / "deepy_eval"
    cfg = eval_work / "eval.yml"
    cfg.write_text(yaml.safe_dump({"load": str(checkpoint), "precision": "fp32", "eval_include_path": str(task_dir),
                                   "eval_log_samples": True, "eval_batch_size": 8, "run_dir": str(out)}))
    proc = run_tool(["deepy.py", "eval.py", cfg, "--eval_tasks", "astro_local", "--eval_results_prefix",
                     out / "neox"])
    assert "; every document" in proc.stdout
    assert yaml.safe_load((out / "config.yml").read_text())["eval_tasks"] == ["astro_local"]  # from the command line
    assert "|astro_local|" in proc.stdout.replace(" ", "")  # lm-eval's table
    results = json.loads(Path(sorted(glob.glob(f"{out}/neox_eval_results_*.json"))[-1]).read_text())
    samples = [json.loads(x) for x in (out / "neox_samples_astro_local.jsonl").read_text().splitlines()]
    return {"results": results, "samples": samples}


@pytest.fixture(scope="session")
def neox_vs_hf(eval_work, task_dir, memorised):
    ours = deepy_eval(eval_work, task_dir, memorised["checkpoint"])
    ref = harness(eval_work, task_dir, "hf", f"pretrained={memorised['export']},dtype=float32", "hf")
    return ours, ref


def test_every_document_scored_and_accuracy_equals_lm_eval_hf(neox_vs_hf):
    ours, ref = neox_vs_hf
    for run in (ours, ref):
        assert run["results"]["n-samples"]["astro_local"]["effective"] == 32
        assert len(run["samples"]) == 32
    acc = ours["results"]["results"]["astro_local"]["acc,none"]
    assert acc == ref["results"]["results"]["astro_local"]["acc,none"]
    assert acc >= 8 / 32  # the eight memorised questions at least


def test_lm_eval_choices_equal_the_mcq_tool(neox_vs_hf, export_run):
    ours, _ = neox_vs_hf
    tool = {r["id"]: r["prediction"] for r in map(json.loads, (export_run / "predictions.jsonl").read_text()
                                                 .splitlines())}
    picked = {}
    for s in ours["samples"]:
        lls = [float(r[0]) for r in s["filtered_resps"]]  # lm-eval logs (log-likelihood, is-greedy) as strings
        picked[s["doc"]["id"]] = "ABCD"[max(range(4), key=lambda i: lls[i])]
    assert picked == tool


def test_deepy_eval_limit_and_fewshot_reach_lm_eval(eval_work, task_dir, memorised):
    """eval_limit scores the first N documents (and says so); eval_num_fewshot sets the task's shots."""
    out = eval_work / "deepy_eval_limited"
    cfg = eval_work / "eval_limited.yml"
    cfg.write_text(yaml.safe_dump({"load": str(memorised["export"]), "eval_tasks": ["astro_local"],
                                   "eval_include_path": str(task_dir), "eval_limit": 5, "eval_num_fewshot": 1,
                                   "run_dir": str(out)}))
    proc = run_tool(["deepy.py", "eval.py", cfg])
    assert "; first 5 documents per task" in proc.stdout
    results = json.loads(Path(sorted(glob.glob(f"{out}/eval_eval_results_*.json"))[-1]).read_text())
    assert results["n-samples"]["astro_local"]["effective"] == 5
    assert results["configs"]["astro_local"]["num_fewshot"] == 1
    assert not list(out.glob("eval_samples_*"))  # eval_log_samples is off by default


def test_deepy_eval_refuses_an_unknown_task_before_loading(eval_work, task_dir, memorised):
    cfg = eval_work / "eval_bad.yml"
    cfg.write_text(yaml.safe_dump({"load": str(memorised["checkpoint"]), "eval_include_path": str(task_dir),
                                   "eval_tasks": ["astro_locl"], "run_dir": str(eval_work / "deepy_eval_bad")}))
    proc = run_tool(["deepy.py", "eval.py", cfg], check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unknown lm-eval task 'astro_locl' (did you mean astro_local" in proc.stderr
    assert "Traceback" not in proc.stderr and "model:" not in proc.stdout
    proc = run_tool(["deepy.py", "eval.py", cfg, "--eval_tasks", "astro_local", "--iteration", "7"], check=False)
    assert proc.returncode == 2 and "has no checkpoint of step 7; complete steps: 0" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_harness_tool_names_a_bad_model_folder_and_an_unknown_task(eval_work, task_dir, tmp_path):
    """tools/eval/harness.py is lm-eval's command line: its two usual mistakes end in one line and exit 2."""
    cases = ((f"path={tmp_path / 'nope'}", "astro_local", "error: --model_args: "),
             (f"path={tmp_path}", "astro_locl", "error: Tasks not found: astro_locl"))
    procs = [subprocess.Popen([sys.executable, "tools/eval/harness.py", "--model", "neox", "--model_args", model_args,
                               "--tasks", task, "--include_path", str(task_dir)], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for model_args, task, _ in cases]
    for proc, (_, _, message) in zip(procs, cases):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert err.strip().splitlines()[-1].startswith(message), err[-3000:]


def test_deepy_eval_config_errors_and_a_missing_lm_eval(eval_work, task_dir, memorised, tmp_path):
    cfg = tmp_path / "eval_incomplete.yml"
    cfg.write_text(yaml.safe_dump({"load": str(memorised["checkpoint"]), "eval_include_path": str(tmp_path / "none"),
                                   "run_dir": str(tmp_path / "run")}))
    proc = run_tool(["deepy.py", "eval.py", cfg], check=False)
    assert proc.returncode == 2 and "launch:" not in proc.stdout
    assert "eval_tasks = None: eval.py needs the tasks to score" in proc.stderr, proc.stderr
    assert f"eval_include_path = '{tmp_path / 'none'}': folder not found" in proc.stderr
    # Without lm-eval installed (a package that fails to import stands in for it): one line, exit 2.
    fake = tmp_path / "no_lm_eval" / "lm_eval"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named lm_eval')\n")
    cfg.write_text(yaml.safe_dump({"load": str(memorised["checkpoint"]), "eval_tasks": ["astro_local"],
                                   "run_dir": str(tmp_path / "run")}))
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(fake.parent), ENV.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "deepy.py", "eval.py", str(cfg)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: lm-evaluation-harness is not installed" in proc.stderr and "requirements/eval.txt" in proc.stderr
    assert "Traceback" not in proc.stderr
