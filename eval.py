"""lm-evaluation-harness entry point, as GPT-NeoX's:

    python deepy.py eval.py CONFIG.yml [MORE.yml ...] --eval_tasks hellaswag arc_easy [--iteration 2000]

deepy.py merges and validates the configs with the evaluation rules (megatron/config/validate.py, `check_eval`),
writes RUN_DIR/config.yml and starts this script once (one process, on one GPU when there is one). The model is
`load`: a checkpoint folder of this trainer at any TP/PP (`load_iteration` / `--iteration` picks the step) or a
Hugging Face folder, scored by lm-eval's own `HFLM` through the registered model "neox" (megatron/eval/harness.py).
Unlike GPT-NeoX's adapter, every document of every task is scored unless `eval_limit` says otherwise. Keys:
eval_tasks, eval_results_prefix, eval_include_path, eval_num_fewshot, eval_batch_size, eval_limit, eval_log_samples
(docs/evaluation.md).

Results: lm-eval's table on stdout and PREFIX_eval_results_DATE.json (GPT-NeoX's file name; PREFIX defaults to
RUN_DIR/eval), plus PREFIX_samples_TASK.jsonl with eval_log_samples. The same work as
`tools/eval/harness.py --model neox`, which takes lm-eval's command-line flags instead of a config.
"""

import datetime
import difflib
import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron.checkpoint.metadata import atomic_write_text  # noqa: E402
from megatron.config.loader import single_process_entry  # noqa: E402


def unknown_tasks(task_manager, tasks: list[str]) -> list[str]:
    """Each requested name that lm-eval's registry (with eval_include_path) does not know, with close spellings."""
    known = set(task_manager.all_tasks)
    problems = []
    for name in tasks:
        if name in known or task_manager.match_tasks([name]):
            continue
        close = difflib.get_close_matches(name, known, n=3)
        problems.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return problems


def main() -> int:
    cfg, run_dir = single_process_entry(__doc__, "eval", "nothing was evaluated")
    if cfg is None:
        return 2
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError as e:
        print(f"error: lm-evaluation-harness is not installed ({e}); pip install -r requirements/eval.txt",
              file=sys.stderr)
        return 2

    task_manager = TaskManager(include_path=cfg.eval_include_path)
    bad = unknown_tasks(task_manager, cfg.eval_tasks)
    if bad:  # before the model loads: a 70B load takes minutes
        where = f" or in {cfg.eval_include_path}" if cfg.eval_include_path else ""
        print(f"error: eval_tasks: unknown lm-eval task {', '.join(bad)}; nothing was evaluated\n"
              f"    fix: use names lm-eval knows{where} (python tools/eval/harness.py --tasks list), or put your own "
              "task YAMLs in a folder and set eval_include_path", file=sys.stderr)
        return 2

    import megatron.eval.harness as harness
    from megatron.generation.loading import ModelLoadError
    from megatron.generation.run import device_default

    try:
        lm = harness.NeoXLM(path=cfg.load, step=cfg.load_iteration, dtype=cfg.precision, device=device_default(),
                            batch_size=cfg.eval_batch_size)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"model: {cfg.load}" + (f" step {cfg.load_iteration}" if cfg.load_iteration is not None else "")
          + f"; tasks: {', '.join(cfg.eval_tasks)}" + (f"; first {cfg.eval_limit} documents per task"
                                                       if cfg.eval_limit else "; every document"), flush=True)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.eval_tasks), num_fewshot=cfg.eval_num_fewshot,
                                      limit=cfg.eval_limit, log_samples=cfg.eval_log_samples,
                                      task_manager=task_manager)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))

    prefix = cfg.eval_results_prefix or os.path.join(run_dir, "eval")
    samples = results.pop("samples", None) or {}
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M")
    out = Path(f"{prefix}_eval_results_{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2, default=handle_non_serializable))
    print(f"results: {out}")
    for task, rows in samples.items():
        path = Path(f"{prefix}_samples_{task}.jsonl")
        atomic_write_text(path, "".join(json.dumps(r, default=handle_non_serializable) + "\n" for r in rows))
        print(f"samples: {path} ({len(rows)} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
