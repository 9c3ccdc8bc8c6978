"""Draw the recipe's Figure 1 (after the AstroSage paper's): loss of both stages and the learning rate against
training tokens, the replay (general-text) validation loss beside the domain one, and the knowledge curve.

    python tools/recipe/figure.py --cpt runs/recipe/cpt --sft runs/recipe/sft --output runs/recipe/figure1.png

Reads each run's metrics.jsonl (the trainer's own log: train/loss, train/lr, valid/loss, valid_replay/loss,
mcq/accuracy with its Wilson interval) and config.yml (sequence length and global batch, to turn steps into
tokens). SFT tokens continue the CPT axis, as the paper draws them. Prints the numbers it drew.
"""
import argparse
import json
import sys
from pathlib import Path

import yaml


class RunError(ValueError):
    """A run folder the figure cannot be drawn from: what is missing or malformed, with its file (and line)."""


def read_run(run_dir: Path) -> tuple[list[dict], int]:
    """The run's records (the last one of each (step, metric) wins: a resumed run rewrites its tail) and its
    tokens per step."""
    config, metrics = run_dir / "config.yml", run_dir / "metrics.jsonl"
    for path in (metrics, config):
        if not path.is_file():
            raise RunError(f"{path} missing; run the training stage first (its run_dir holds both files)")
    try:
        cfg = yaml.safe_load(config.read_text())
        dp = cfg.get("num_gpus", 1) // (cfg.get("model_parallel_size", 1) * cfg.get("pipe_parallel_size", 1))
        tokens_per_step = (cfg["train_micro_batch_size_per_gpu"] * cfg.get("gradient_accumulation_steps", 1)
                           * max(1, dp) * cfg["seq_length"])
    except (yaml.YAMLError, AttributeError, KeyError, TypeError) as e:
        raise RunError(f"{config}: not the resolved config deepy.py writes ({type(e).__name__}: {e})") from None
    merged: dict[int, dict] = {}
    lines = metrics.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rec = json.loads(line)
                merged.setdefault(int(rec["step"]), {}).update(rec)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if n == len(lines):  # the last line of a killed run may be cut short: skipped
                    continue
                raise RunError(f"{metrics}:{n}: not a metrics record (a JSON object with a step)") from None
    if not any("train/loss" in r for r in merged.values()):
        raise RunError(f"{metrics}: no train/loss record; has the run logged a step?")
    return [merged[s] for s in sorted(merged)], tokens_per_step


def series(records, key, tokens_per_step, offset=0):
    pts = [(offset + r["step"] * tokens_per_step, r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpt", required=True, help="run_dir of the CPT stage")
    p.add_argument("--sft", required=True, help="run_dir of the SFT stage")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--base-eval", default=None,
                   help="summary.json of the next-token MCQ run on the base model: the curve's point at 0 tokens")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        cpt, cpt_tps = read_run(Path(args.cpt))
        sft, sft_tps = read_run(Path(args.sft))
    except RunError as e:
        print(f"error: {e}; nothing drawn", file=sys.stderr)
        return 2
    end = max(r["step"] for r in cpt) * cpt_tps
    fig, (ax_loss, ax_lr, ax_mcq) = plt.subplots(3, 1, figsize=(8, 9), sharex=True,
                                                 gridspec_kw={"height_ratios": [3, 1.3, 1.3]})
    lines = [("CPT train", cpt, "train/loss", cpt_tps, 0, "C0", "-"),
             ("CPT valid, domain", cpt, "valid/loss", cpt_tps, 0, "C0", "o--"),
             ("CPT valid, replay (general text)", cpt, "valid_replay/loss", cpt_tps, 0, "C2", "s--"),
             ("SFT train (assistant tokens)", sft, "train/loss", sft_tps, end, "C3", "-"),
             ("SFT valid", sft, "valid/loss", sft_tps, end, "C3", "o--")]
    for label, recs, key, tps, off, color, style in lines:
        x, y = series(recs, key, tps, off)
        if x:
            ax_loss.plot(x, y, style, color=color, label=label, markersize=3)
            print(f"{label}: {y[0]:.3f} -> {y[-1]:.3f} over {len(y)} points")
    for ax in (ax_loss, ax_lr, ax_mcq):
        ax.axvline(end, color="gray", lw=0.8, ls=":")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title("The recipe in miniature: continued pretraining with replay, then SFT")
    for label, recs, tps, off, color in (("CPT", cpt, cpt_tps, 0, "C0"), ("SFT", sft, sft_tps, end, "C3")):
        x, y = series(recs, "train/lr", tps, off)
        ax_lr.plot(x, y, color=color, label=label)
    ax_lr.set_ylabel("learning rate")
    ax_lr.legend(fontsize=8)
    x, acc = series(cpt, "mcq/accuracy", cpt_tps)
    if x:
        _, lo = series(cpt, "mcq/ci95_low", cpt_tps)
        _, hi = series(cpt, "mcq/ci95_high", cpt_tps)
        if args.base_eval and Path(args.base_eval).exists():  # the same method on the weights CPT starts from
            base = json.loads(Path(args.base_eval).read_text())
            x, acc, lo, hi = [0] + x, [base["accuracy"]] + acc, [base["ci95"][0]] + lo, [base["ci95"][1]] + hi
        ax_mcq.plot(x, acc, "o-", color="C1", label="MCQ accuracy (next-token)")
        ax_mcq.fill_between(x, lo, hi, color="C1", alpha=0.2, label="95% Wilson interval")
        ax_mcq.axhline(0.25, color="gray", lw=0.8, ls="--", label="chance")
        ax_mcq.legend(fontsize=8)
        print(f"knowledge curve: {acc[0]:.3f} -> {acc[-1]:.3f} over {len(acc)} points")
    ax_mcq.set_ylabel("accuracy")
    ax_mcq.set_xlabel("training tokens")
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"figure: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
