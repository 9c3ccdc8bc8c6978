"""The AstroSage recipe in miniature: raw text -> cleaned corpora -> CPT with replay -> SFT -> HF export -> mergekit
DARE-TIES merge -> MCQ evaluation -> chat -> Figure 1, as a chain of plain commands (docs/recipe.md).

    python tools/recipe/run_recipe.py            # `make recipe`: every stage, resuming where outputs are missing
    python tools/recipe/run_recipe.py --list     # print the stages' commands (run them by hand on your own data)
    python tools/recipe/run_recipe.py --from sft # redo from a stage on (its outputs and later ones are removed)

Each stage is a list of commands of the project's tools, run in the working directory (data under data/recipe,
runs under runs/recipe, relative paths as the configs in configs/recipe/ use them). A stage is complete when its
marker (runs/recipe/.stages/NAME.done, written after its last command succeeded) and its outputs exist; the run
starts at the first stage that is not complete, after removing what that stage may have half-written, so killing
it anywhere and rerunning finishes with the same numbers (every stage is seeded). A failing command stops the
chain with the stage's name and the command; earlier stages' outputs are kept.

`--variant light` is the CI variant (tests/test_recipe.py): the same chain with less data, fewer steps and
questions and one evaluation method per model.
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA, RUNS = Path("data/recipe"), Path("runs/recipe")
ALL_METHODS = ("next-token", "instruct", "instruct-next-token")

VARIANTS = {
    # `make recipe`
    "full": dict(domain_chars=150000, general_chars=60000, general_valid_chars=40000, questions=40, chat_rows=120,
                 extra_cpt=[], extra_sft=[], max_new_tokens=24, chat_tokens=48,
                 methods={m: ALL_METHODS for m in ("base", "cpt", "sft", "merged")}),
    # tests/test_recipe.py: same stages, a fraction of the work
    "light": dict(domain_chars=150000, general_chars=60000, general_valid_chars=40000, questions=8, chat_rows=30,
                  extra_cpt=["configs/recipe/light_cpt.yml"], extra_sft=["configs/recipe/light_sft.yml"],
                  max_new_tokens=8, chat_tokens=16,
                  methods={"base": ("next-token",), "cpt": ("next-token",), "sft": ("instruct-next-token",),
                           "merged": ("instruct",)}),
}


@dataclass
class Stage:
    name: str
    what: str
    commands: list  # argv lists; a (argv, path) pair also saves the command's stdout to path
    outputs: list  # paths that must exist when the stage is complete
    clean: list = field(default_factory=list)  # removed before the stage (re)starts


def py(tool: str, *args) -> list:
    return ["python", tool, *map(str, args)]  # all strings: printed and passed as they are


def stages(v: dict) -> list:
    d, r = DATA, RUNS
    parts = ("domain", "domain_valid", "general", "general_valid")
    corpus = [py("tools/datasets/build_demo_replay_corpus.py", "--output-dir", d, "--domain-chars", v["domain_chars"],
                 "--general-chars", v["general_chars"], "--general-valid-chars", v["general_valid_chars"])]
    corpus += [py("tools/datasets/preprocess_data.py", "--input", d / f"{p}.jsonl", "--output-prefix", d / p,
                  "--append-eod", "--ftfy", "--remove-repetitions", "--workers", 1, "--no-progress") for p in parts]
    corpus += [py("tools/recipe/make_questions.py", "--corpus", d / "domain.jsonl", "--output", d / "questions.jsonl",
                  "--shots", d / "shots.jsonl", "--count", v["questions"])]
    chat = [py("tools/datasets/build_demo_chat.py", "--output-dir", d / "sft", "--rows", v["chat_rows"]),
            py("tools/datasets/build_sft_mix.py", "--output-prefix", d / "sft/mix", "--seq-length", 256,
               "--valid-fraction", 0.05, "--source", d / "sft/astro_qa.jsonl", "share=0.3",
               "--source", d / "sft/hermes.jsonl", "--source", d / "sft/nemotron.jsonl", "--no-progress")]
    base = [py("tools/recipe/init_base.py", "--config", "configs/tiny_cpu.yml", "--output", r / "hf/base"),
            py("tools/ckpts/convert_hf_llama_to_neox.py", "--hf-dir", r / "hf/base", "--output-dir", r / "base_neox",
               "--tp", "2", "--pp", "2", "--overwrite", "--no-progress")]
    cpt = [py("deepy.py", "train.py", "configs/tiny_cpu.yml", "configs/recipe/cpt.yml", *v["extra_cpt"])]
    sft = [py("deepy.py", "train.py", "configs/tiny_cpu.yml", "configs/recipe/sft.yml", *v["extra_sft"])]
    export = [py("tools/ckpts/convert_neox_to_hf.py", "--input-dir", r / "cpt/checkpoints",
                 "--output-dir", r / "hf/cpt", "--overwrite", "--no-progress"),
              py("tools/ckpts/convert_neox_to_hf.py", "--input-dir", r / "sft/checkpoints",
                 "--output-dir", r / "hf/sft", "--chat-model", "--overwrite", "--no-progress")]
    merge = [py("tools/recipe/merge.py", "configs/recipe/merge.yml", r / "hf/merged"),
             (py("tools/recipe/check_model.py", r / "hf/merged"), r / "hf/merged.check.txt")]
    evals, outs = [], []
    for model, methods in v["methods"].items():
        for method in methods:
            out = r / f"eval/{model}-{method}"
            cmd = py("tools/eval/mcq.py", "--model", r / f"hf/{model}", "--questions", d / "questions.jsonl",
                     "--shots", d / "shots.jsonl", "--method", method, "--output", out, "--device", "cpu",
                     "--batch-size", 8, "--no-progress")
            if method == "instruct":
                cmd += ["--max-new-tokens", str(v["max_new_tokens"])]
            evals.append(cmd)
            outs.append(out / "summary.json")
    compare = r / "eval/compare_cpt_vs_base.txt"
    evals.append((py("tools/eval/mcq.py", "--compare", r / "eval/base-next-token", r / "eval/cpt-next-token"), compare))
    evals.append(py("tools/recipe/table.py", "--eval-dir", r / "eval", "--compare", compare))
    chat_cmds = [(py("tools/generate.py", "--model", r / "hf/sft", "--device", "cpu", "--max-new-tokens",
                     v["chat_tokens"], "--prompt", "Quick question (k42): what is a pulsar?", *flag),
                  r / f"chat/{name}.txt")
                 for name, flag in (("reasoning_on", ["--reasoning"]), ("reasoning_off", []))]
    figure = [py("tools/recipe/figure.py", "--cpt", r / "cpt", "--sft", r / "sft", "--output", r / "figure1.png",
                 "--base-eval", r / "eval/base-next-token/summary.json")]
    return [
        Stage("corpus", "domain corpus + general-text pool, cleaned (ftfy, repetition rules); MCQ questions", corpus,
              [d / f"{p}_text_document.idx" for p in parts] + [d / "questions.jsonl"]),
        Stage("chat-data", "generated chat sources mixed by the mix tool", chat,
              [d / "sft/mix_train_messages_label_document.idx"], [d / "sft"]),
        Stage("base", "the base model: random-init HF Llama, converted at TP 2 x PP 2", base,
              [r / "hf/base/config.json", r / "base_neox/latest"], [r / "hf/base", r / "base_neox"]),
        Stage("cpt", "continued pretraining, 2.5 epochs with replay, TP 2 x PP 2, knowledge curve", cpt,
              [r / "cpt/checkpoints/latest", r / "cpt/metrics.jsonl"], [r / "cpt"]),
        Stage("sft", "SFT from the CPT checkpoint (finetune), assistant-only loss, DP 2", sft,
              [r / "sft/checkpoints/latest", r / "sft/metrics.jsonl"], [r / "sft"]),
        Stage("export", "CPT and SFT checkpoints to HF (SFT as a chat model)", export,
              [r / "hf/cpt/config.json", r / "hf/sft/config.json"], [r / "hf/cpt", r / "hf/sft"]),
        Stage("merge", "mergekit DARE-TIES (CPT as base), reloaded by transformers in a new process", merge,
              [r / "hf/merged/config.json", r / "hf/merged.check.txt"], [r / "hf/merged"]),
        Stage("eval", "MCQ evaluation, table with Wilson intervals, paired CPT-vs-base difference", evals,
              outs + [r / "eval/table.md"]),  # mcq.py resumes a killed run itself
        Stage("chat", "chat with the SFT model, reasoning on and off", chat_cmds,
              [r / "chat/reasoning_on.txt", r / "chat/reasoning_off.txt"], [r / "chat"]),
        Stage("figure", "Figure 1: losses, replay validation, LR and knowledge curve against tokens", figure,
              [r / "figure1.png"]),
    ]


def show(cmd) -> str:
    argv, saved = cmd if isinstance(cmd, tuple) else (cmd, None)
    return " ".join(shlex.quote(str(a)) for a in argv) + (f" > {saved}" if saved else "")


def run_command(cmd, env) -> int:
    argv, saved = cmd if isinstance(cmd, tuple) else (cmd, None)
    # The project's own files (tools, train.py, configs/) resolve against the repository, data and runs against the
    # working directory: the chain also runs from another folder (the CI test runs it in a temporary one).
    if argv[0] == "python":
        argv = [sys.executable] + [str(REPO / a) if (str(a).endswith(".py") or str(a).startswith("configs/"))
                                   and (REPO / a).exists() and not Path(a).exists() else str(a) for a in argv[1:]]
    if saved is None:
        return subprocess.call(argv, env=env)
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    sys.stdout.flush()
    if proc.returncode == 0:
        Path(saved).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(saved) + ".tmp")
        tmp.write_text(proc.stdout)
        tmp.replace(saved)
    return proc.returncode


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="full")
    p.add_argument("--list", action="store_true", help="print every stage's commands and exit")
    p.add_argument("--from", dest="start", default=None, help="redo from this stage on")
    p.add_argument("--until", default=None, help="stop after this stage")
    args = p.parse_args(argv)
    chain = stages(VARIANTS[args.variant])
    names = [s.name for s in chain]
    for opt in (args.start, args.until):
        if opt is not None and opt not in names:
            print(f"error: no stage {opt!r}; the stages are {', '.join(names)}", file=sys.stderr)
            return 2
    if args.list:
        for i, s in enumerate(chain, 1):
            print(f"# {i}. {s.name}: {s.what}")
            print("\n".join(show(c) for c in s.commands) + "\n")
        return 0
    marks = RUNS / ".stages"
    if args.start:
        for s in chain[names.index(args.start):]:
            remove(marks / f"{s.name}.done")
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    t_all = time.time()
    for i, s in enumerate(chain, 1):
        done = (marks / f"{s.name}.done").exists() and all(Path(o).exists() for o in s.outputs)
        if done:
            print(f"== [{i}/{len(chain)}] {s.name}: complete, skipped", flush=True)
        else:
            print(f"== [{i}/{len(chain)}] {s.name}: {s.what}", flush=True)
            remove(marks / f"{s.name}.done")
            for path in s.clean:
                remove(Path(path))
            t0 = time.time()
            for cmd in s.commands:
                print(f"$ {show(cmd)}", flush=True)
                rc = run_command(cmd, env)
                if rc != 0:
                    print(f"recipe: stage {i} '{s.name}' failed (exit {rc}) in: {show(cmd)}\n"
                          f"recipe: outputs of the stages before it are kept; fix the cause and rerun to resume at "
                          f"'{s.name}'", file=sys.stderr, flush=True)
                    return 1
            missing = [str(o) for o in s.outputs if not Path(o).exists()]
            if missing:
                print(f"recipe: stage {i} '{s.name}' finished without writing {', '.join(missing)}",
                      file=sys.stderr, flush=True)
                return 1
            marks.mkdir(parents=True, exist_ok=True)
            (marks / f"{s.name}.done").write_text("\n".join(show(c) for c in s.commands) + "\n")
            print(f"== {s.name} done in {time.time() - t0:.0f} s", flush=True)
        if s.name == args.until:
            break
    print(f"recipe: all stages complete ({time.time() - t_all:.0f} s this run); table "
          f"{RUNS / 'eval/table.md'}, figure {RUNS / 'figure1.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
