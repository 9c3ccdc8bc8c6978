"""The recipe's stage tools (tools/recipe/*.py) run one by one on a user's own files: bad input is refused with one
line naming the file (and line) and exit 2, nothing written; an interrupted merge leaves the previous output
whole. The refusals run each tool as a user does, in processes of their own; test_recipe.py runs the tools' good
paths through the recipe's driver."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "tools" / "recipe" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refusals(name: str, *argvs: list[str]) -> list[str]:
    """Run tools/recipe/NAME.py once per argv, side by side; each must exit 2 with an `error:` line last and no
    traceback. Returns their stderr."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tools" / "recipe" / f"{name}.py"), *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for argv in argvs]
    errs = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        # (the last line: importing mergekit or transformers may log warnings of their own before it)
        assert proc.returncode == 2 and err.strip().splitlines()[-1].startswith("error: "), err
        assert "Traceback" not in err, err
        errs.append(err.strip().splitlines()[-1])
    return errs


def test_make_questions_names_the_bad_line_and_writes_nothing(tmp_path):
    out = ["--output", str(tmp_path / "q.jsonl"), "--shots", str(tmp_path / "shots.jsonl")]
    (tmp_path / "bad.jsonl").write_text('{"text": "A sentence."}\n\n{"text": broken\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "A sentence."}\n')
    missing, bad, notext = refusals("make_questions", *(["--corpus", str(tmp_path / f), *out]
                                                        for f in ("nope.jsonl", "bad.jsonl", "notext.jsonl")))
    assert "nope.jsonl: file not found" in missing and "bad.jsonl:3: not valid JSON" in bad
    assert "notext.jsonl:1: expected an object with a string `text`" in notext
    assert not (tmp_path / "q.jsonl").exists() and not (tmp_path / "shots.jsonl").exists()


def test_init_base_refuses_a_config_without_the_model_keys(tmp_path):
    (tmp_path / "bad.yml").write_text("num_layers: [2,\n")
    (tmp_path / "run.yml").write_text("train_iters: 10\n")
    out = ["--output", str(tmp_path / "base")]
    bad, keys = refusals("init_base", ["--config", str(tmp_path / "bad.yml"), *out],
                         ["--config", str(tmp_path / "run.yml"), *out])
    assert "bad.yml: not valid YAML" in bad and "run.yml: model keys num_layers, hidden_size" in keys
    assert list(tmp_path.glob("*base*")) == []


def test_check_model_refuses_what_transformers_cannot_load(tmp_path):
    (tmp_path / "ckpt" / "global_step4").mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("global_step4")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama"')
    (tmp_path / "empty_export").mkdir()
    (tmp_path / "empty_export" / "config.json").write_text('{"model_type": "llama"}')
    ckpt, broken, empty = refusals("check_model", *([str(tmp_path / f)] for f in ("ckpt", "broken", "empty_export")))
    assert "checkpoint of this trainer, not a Hugging Face folder" in ckpt
    assert "config.json is not valid JSON" in broken and "no weights" in empty


@pytest.fixture
def merge_main():
    pytest.importorskip("mergekit", reason="pip install -r requirements/merge.txt")
    return tool("merge").main


def test_merge_refuses_bad_configs_before_writing(tmp_path):
    pytest.importorskip("mergekit", reason="pip install -r requirements/merge.txt")
    (tmp_path / "bad.yml").write_text("merge_method: [dare_ties\n")
    (tmp_path / "list.yml").write_text("- a\n- b\n")
    (tmp_path / "no_method.yml").write_text("base_model: cpt\nmodels:\n  - model: sft\n")
    bad, listed, no_method = refusals("merge", *([str(tmp_path / f), str(tmp_path / "merged")]
                                                 for f in ("bad.yml", "list.yml", "no_method.yml")))
    assert "bad.yml: not valid YAML" in bad and "list.yml: not a mergekit config" in listed
    assert "not a valid mergekit config (merge_method: Field required)" in no_method
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml", "list.yml", "no_method.yml"]


def test_an_interrupted_merge_leaves_the_previous_merge_whole(tmp_path, monkeypatch, merge_main):
    import mergekit.merge

    for name in ("cpt", "sft"):
        (tmp_path / name).mkdir()
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(tmp_path / "cpt"),
                                      "models": [{"model": str(tmp_path / "sft"),
                                                  "parameters": {"weight": 1.0, "density": 0.7}}]}))
    previous = tmp_path / "merged"
    previous.mkdir()
    (previous / "model.safetensors").write_bytes(b"the previous merge")
    written = []

    def killed_midway(config, out_path, options, config_source):
        Path(out_path).mkdir(parents=True)
        (Path(out_path) / "model.safetensors").write_bytes(b"half")
        written.append(out_path)
        raise KeyboardInterrupt

    monkeypatch.setattr(mergekit.merge, "run_merge", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        merge_main([str(config), str(previous)])
    assert Path(written[0]).name == "merged" and Path(written[0]).parent.name == ".merged.partial"
    assert (previous / "model.safetensors").read_bytes() == b"the previous merge"

    def completes(config, out_path, options, config_source):
        Path(out_path).mkdir(parents=True)
        (Path(out_path) / "model.safetensors").write_bytes(b"the new merge")

    monkeypatch.setattr(mergekit.merge, "run_merge", completes)
    assert merge_main([str(config), str(previous)]) == 0
    assert (previous / "model.safetensors").read_bytes() == b"the new merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpt", "merge.yml", "merged", "merged.merge.yml", "sft"]
    assert json.loads(json.dumps(yaml.safe_load((tmp_path / "merged.merge.yml").read_text())))["merge_method"] == \
        "dare_ties"


def test_figure_and_table_name_the_file_they_cannot_read(tmp_path):
    for run in ("cpt", "sft"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "config.yml").write_text(yaml.safe_dump(
            {"num_gpus": 2, "model_parallel_size": 1, "pipe_parallel_size": 1, "train_micro_batch_size_per_gpu": 2,
             "seq_length": 64}))
    (tmp_path / "cpt" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\nnot json\n'
                                                    '{"step": 2, "train/loss": 4.0}\n')
    figure = ["--cpt", str(tmp_path / "cpt"), "--sft", str(tmp_path / "sft"), "--output", str(tmp_path / "f.png")]
    (bad_line,) = refusals("figure", figure)
    assert "cpt/metrics.jsonl:2: not a metrics record" in bad_line
    # A line cut short by a kill is only ever the last: it is skipped, and the figure is drawn.
    (tmp_path / "cpt" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n{"step": 2, "tr')
    (tmp_path / "sft" / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n')
    proc = subprocess.run([sys.executable, str(ROOT / "tools/recipe/figure.py"), *figure], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and (tmp_path / "f.png").stat().st_size > 0, proc.stderr
    assert "CPT train: 5.000 -> 5.000 over 1 points" in proc.stdout

    (tmp_path / "eval" / "cpt-next-token").mkdir(parents=True)
    (tmp_path / "eval" / "cpt-next-token" / "summary.json").write_text('{"n": 4, "correct"')
    (bad_summary,) = refusals("table", ["--eval-dir", str(tmp_path / "eval")])
    assert "cpt-next-token/summary.json: not a summary.json of tools/eval/mcq.py (not JSON" in bad_summary
    assert not (tmp_path / "eval" / "table.md").exists()
