"""An MCQ run: score a question file with one method, write per-question records as it goes, resume, summarise.

OUT/run.json          the settings (model, step, questions file and its sha256, method, shots, ...)
OUT/predictions.jsonl one record per question, appended batch by batch (flushed): a killed run keeps every
                      finished batch, and the same command continues with the questions not in it yet
OUT/summary.json      accuracy, its 95% Wilson interval, n, unparseable count, the letter spelling; written last
A rerun into an OUT whose run.json differs is refused (another OUT, or --overwrite).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from megatron.eval.stats import wilson_interval

METHODS = ("next-token", "instruct", "instruct-next-token")


class RunError(ValueError):
    """A run that cannot start or be resumed as asked; the message says why and what to do."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def summarize(records: list[dict], **extra) -> dict:
    """Accuracy over the questions that have an answer; unparseable replies count as wrong."""
    keyed = [r for r in records if r.get("answer") is not None]
    correct = sum(bool(r["correct"]) for r in keyed)
    n = len(keyed)
    out = {"questions": len(records), "n": n, "correct": correct,
           "accuracy": correct / n if n else None, "ci95": list(wilson_interval(correct, n)) if n else None,
           "unparseable": sum(1 for r in records if r.get("prediction") is None)}
    out.update(extra)
    return out


def format_summary(s: dict) -> str:
    if s["accuracy"] is None:
        return f"{s['questions']} questions, predictions only (no answer key); unparseable {s['unparseable']}"
    lo, hi = s["ci95"]
    return (f"accuracy {s['accuracy']:.4f} (95% Wilson CI {lo:.4f}-{hi:.4f}), n={s['n']}, "
            f"unparseable {s['unparseable']}")


def _read_done(path: Path, repair: bool = True) -> list[dict]:
    """Records of a previous run; a last line torn by a kill is ignored (and, with repair, cut off the file)."""
    if not path.is_file():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("torn line")
                records.append(json.loads(raw))
            except ValueError:
                break
            good_bytes += len(raw)
    if repair and good_bytes != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return records


def check_settings(out: Path, settings: dict, ignore: tuple = ()) -> None:
    """RunError if OUT holds a run whose settings differ from `settings` (keys in `ignore` aside)."""
    run_json = out / "run.json"
    if not run_json.is_file():
        return
    previous = json.loads(run_json.read_text())
    changed = sorted(k for k in set(previous) | set(settings)
                     if k not in ignore and previous.get(k) != settings.get(k))
    if changed:
        raise RunError(f"{out} holds a run with other settings ({', '.join(changed)} differ); use another "
                       "--output, or --overwrite to start it again")


def prepare_output(out: Path, settings: dict, overwrite: bool) -> list[dict]:
    """Make OUT for `settings`; return the records a previous run with the same settings already wrote."""
    run_json = out / "run.json"
    if run_json.is_file() and not overwrite:
        check_settings(out, settings)
        return _read_done(out / "predictions.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("predictions.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)
    tmp = run_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1) + "\n")
    os.replace(tmp, run_json)
    return []


def run_questions(scorer, questions, out: Path, done: list[dict], batch_size: int, progress: bool = True,
                  stop_after: Optional[int] = None) -> list[dict]:
    """Score the questions not in `done`, longest prompts first (little padding), appending each batch's records
    to OUT/predictions.jsonl; returns every record in question-file order. stop_after: stop (as a kill would)
    after that many batches — for tests of resuming."""
    from tqdm import tqdm

    by_id = {r["id"]: r for r in done}
    todo = [q for q in questions if q.id not in by_id]
    lengths = {q.id: len(scorer.prompt(q)) for q in todo}
    todo.sort(key=lambda q: -lengths[q.id])
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), unit="q", desc="mcq", disable=not progress,
               dynamic_ncols=True)
    with open(out / "predictions.jsonl", "a", encoding="utf-8") as f:
        for b, start in enumerate(range(0, len(todo), batch_size)):
            if stop_after is not None and b >= stop_after:
                raise SystemExit(f"stopped after {stop_after} batches (--stop-after-batches)")
            batch = todo[start:start + batch_size]
            for record in scorer.score(batch):
                by_id[record["id"]] = record
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))
    bar.close()
    return [by_id[q.id] for q in questions]


def write_summary(out: Path, summary: dict) -> None:
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "summary.json")


def read_run(path: str) -> dict[str, dict]:
    """{id: record} of a finished run (its OUT folder or its predictions.jsonl)."""
    p = Path(path)
    if p.is_dir():
        p = p / "predictions.jsonl"
    if not p.is_file():
        raise RunError(f"{path}: no predictions.jsonl there; pass a run's --output folder")
    return {r["id"]: r for r in _read_done(p, repair=False)}


def compare_runs(path_a: str, path_b: str, resamples: int = 10000) -> dict:
    """The paired difference B - A over the questions both runs scored with an answer key."""
    from megatron.eval.stats import paired_difference

    a, b = read_run(path_a), read_run(path_b)
    ids = [i for i in a if i in b and a[i].get("correct") is not None and b[i].get("correct") is not None]
    if not ids:
        raise RunError(f"{path_a} and {path_b} share no scored question (same question file, with answers?)")
    result = paired_difference([a[i]["correct"] for i in ids], [b[i]["correct"] for i in ids], resamples)
    result.update({"run_a": str(path_a), "run_b": str(path_b), "only_in_a": len(set(a) - set(b)),
                   "only_in_b": len(set(b) - set(a))})
    return result


def format_compare(c: dict) -> str:
    lo, hi = c["ci95"]
    return (f"B - A = {c['difference']:+.4f} (95% paired-bootstrap CI {lo:+.4f} to {hi:+.4f}; McNemar exact "
            f"p = {c['mcnemar_p']:.4g}) on n={c['n']} shared questions: A {c['accuracy_a']:.4f}, "
            f"B {c['accuracy_b']:.4f}; only A right {c['only_a_correct']}, only B right {c['only_b_correct']}")
