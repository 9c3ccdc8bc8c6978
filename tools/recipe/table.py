"""Print the recipe's evaluation table: every model x method run of tools/eval/mcq.py in one table, accuracy with
its 95% Wilson interval, and the paired CPT-vs-base difference (the saved output of `mcq.py --compare`).

    python tools/recipe/table.py --eval-dir runs/recipe/eval --compare runs/recipe/eval/compare_cpt_vs_base.txt

Runs are the folders EVAL_DIR/<model>-<method> (the layout `--output` gives them in the recipe); the table is also
written to EVAL_DIR/table.md.
"""
import argparse
import json
import sys
from pathlib import Path

METHODS = ("next-token", "instruct", "instruct-next-token")
MODELS = ("base", "cpt", "sft", "merged")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval-dir", required=True)
    p.add_argument("--compare", default=None, help="saved output of mcq.py --compare (its JSON line is used)")
    args = p.parse_args(argv)
    root = Path(args.eval_dir)
    cells = {}
    for model in MODELS:
        for method in METHODS:
            summary = root / f"{model}-{method}" / "summary.json"
            if summary.exists():
                try:
                    s = json.loads(summary.read_text())
                    problem = None if isinstance(s, dict) and {"n", "correct", "accuracy"} <= s.keys() else \
                        "no n, correct and accuracy"
                except json.JSONDecodeError as e:
                    problem = f"not JSON: {e}"
                if problem:
                    print(f"error: {summary}: not a summary.json of tools/eval/mcq.py ({problem}); rerun that "
                          "evaluation (its folder holds the per-question predictions.jsonl)", file=sys.stderr)
                    return 2
                cells[model, method] = s
    if not cells:
        print(f"error: no {root}/<model>-<method>/summary.json; run the eval stage first", file=sys.stderr)
        return 2
    methods = [m for m in METHODS if any((mod, m) in cells for mod in MODELS)]
    head = "| model | " + " | ".join(methods) + " |"
    rows = [head, "|" + "---|" * (len(methods) + 1)]
    for model in MODELS:
        if not any((model, m) in cells for m in methods):
            continue
        out = []
        for m in methods:
            s = cells.get((model, m))
            if s is None:
                out.append("-")
                continue
            extra = f", {s['unparseable']} unparseable" if s.get("unparseable") else ""
            if s["accuracy"] is None:  # a question file without answers: mcq.py wrote predictions only
                out.append(f"predictions only ({s.get('questions', 0)} questions{extra})")
                continue
            lo, hi = s["ci95"]
            out.append(f"{s['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] ({s['correct']}/{s['n']}{extra})")
        rows.append(f"| {model} | " + " | ".join(out) + " |")
    lines = ["Accuracy on the recipe's questions, 95% Wilson interval in brackets (chance 0.25):", ""] + rows
    if args.compare and not Path(args.compare).is_file():
        print(f"error: --compare {args.compare}: file not found; save the output of mcq.py --compare there",
              file=sys.stderr)
        return 2
    if args.compare:
        text = Path(args.compare).read_text().strip().splitlines()
        if text:
            lines += ["", "Paired difference, CPT vs base (mcq.py --compare):", text[0]]
    table = "\n".join(lines)
    print(table)
    (root / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
