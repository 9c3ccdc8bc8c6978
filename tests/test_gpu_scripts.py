"""The scripts a GPU call runs (docs/gpu.md), run here the way that call runs them, as far as a CPU allows: the
session driver's stage mechanics, and the CPU modes of the two benchmark scripts it calls that no other test runs.
A broken script found here costs nothing; found on the GPU machine it costs a lease."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "2"}


def test_session_runs_stages_in_budget_and_reports_failures(tmp_path):
    """`bash benchmarks/gpu/session.sh recipe gen bogus`: the recipe stage is skipped for lack of budget (named, not
    a failure), gen fails without CUDA (its exit status recorded), an unknown stage is named; the log in $OUT ends
    with the outcome table and the call exits 1."""
    out = tmp_path / "out"
    env = {**ENV, "OUT": str(out), "BUDGET_S": "100", "GPU_WHEELS": str(tmp_path / "no_wheels"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this venv's
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "session.sh"), "recipe", "gen", "bogus"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "session.log").read_text()
    assert log == proc.stdout  # everything printed is in the file that comes back
    assert "note: no .whl here" in log and "error: --device cuda without a CUDA GPU" in log
    table = log[log.index("| stage | outcome | seconds |"):]
    assert "| recipe | skipped: " in table and "s left < 120s | 0 |" in table
    assert "| gen | exit 2 |" in table and "| bogus | unknown stage | 0 |" in table


def test_recipe_1b_speed_smoke_trains_the_recipe_configs(tmp_path):
    """benchmarks/recipe_1b_speed.py --smoke: configs/recipe/llama3.2-1b.yml + h100_1b_cpt.yml through deepy.py with
    only the data, init, length and (for the CPU) the shape replaced; the numbers it records are the run's."""
    out = tmp_path / "recipe_1b.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recipe_1b_speed.py"), "--smoke", "--steps", "2",
                           "--work", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["smoke"] and rec["steps"] >= 2 and rec["tokens_per_step"] == 256 * 2 * 2
    assert rec["tokens_per_s"] > 0 and math.isfinite(rec["final_loss"]) and rec["planned_peak_gib"] > 0
    log = (tmp_path / "work" / "train.log").read_text()
    assert "h100_1b_cpt.yml) -> " in log and "override  train_epochs: 2.5" in log  # the recipe's own config ran
    assert "epoch plan:" in log  # with replay
    metrics = [json.loads(x) for x in (tmp_path / "work" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in metrics if "train/loss" in r][-1] == rec["final_loss"]


@pytest.mark.filterwarnings("ignore")
def test_mcq_speed_agrees_with_lm_eval_and_times_the_tool(tmp_path):
    """benchmarks/mcq_speed.py at the tiny shape on the CPU: its predictions equal lm-eval's `hf` model's on the
    same questions, and --full-pass runs tools/eval/mcq.py itself (both methods) over every question."""
    out = tmp_path / "mcq.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mcq_speed.py"), "--shape", "tiny",
                           "--questions", "8", "--batch-size", "4", "--device", "cpu", "--no-report", "--full-pass",
                           "12", "--max-new-tokens", "4", "--json", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["agree"] == rec["questions"] == 8
    for method in ("next-token", "instruct"):
        run = rec["full_pass"][method]
        assert run["rc"] == 0 and run["summary"]["n"] == 12 and run["summary"]["method"] == method
    assert "`tools/eval/mcq.py` itself over 12 questions" in proc.stdout
