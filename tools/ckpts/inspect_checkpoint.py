#!/usr/bin/env python3
"""What a checkpoint holds: its steps (complete or interrupted), layout, progress, versions, model shape, and how
its config differs from a YAML you are about to resume with.

    python tools/ckpts/inspect_checkpoint.py runs/astro/checkpoints
    python tools/ckpts/inspect_checkpoint.py runs/astro/checkpoints --iteration 4000 \\
        --config configs/llama3.1-70b.yml configs/astrosage70b_cpt.yml
    python tools/ckpts/inspect_checkpoint.py runs/astro/checkpoints/global_step4000 --json
    python tools/ckpts/inspect_checkpoint.py runs/astro/checkpoints --verify

Reads only the small metadata files (neox_meta.json, config.yml, file sizes), never the tensors; `--verify` also
reads every file of the step once to check it against the checksum recorded at save (bit rot, a bad copy).
Exit status: 0, or 2 when the folder holds no complete checkpoint, the config does not load, or --verify finds a
missing or corrupt file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # run from a checkout without installing

from tqdm import tqdm  # noqa: E402

from megatron.checkpoint import metadata  # noqa: E402


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict, paths: list[str]) -> list[tuple[str, object, object]]:
    """(key, checkpoint value, YAML value) for every key whose resolved value differs."""
    from megatron.config.loader import load_config

    ours = load_config(paths).config.to_yaml_dict()
    a, b = _flatten(saved or {}), _flatten(ours)
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (YAML/JSON lists vs pydantic tuples)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if norm(a.get(k)) != norm(b.get(k))]


def inspect(path: Path, iteration: int | None) -> dict:
    if metadata.tag_iteration(path.name) is not None:  # a single step folder
        root, tag = path.parent, path.name
    else:
        root = path
        tag = metadata.find_loadable_tag(root, metadata.tag_for(iteration) if iteration is not None else None)
    steps = []
    for p in metadata.step_dirs(root):
        step = {"tag": p.name, "complete": metadata.is_complete(p), "bytes": _size(p)}
        if step["complete"]:  # cheap checks (no file is read): a damaged marker, files listed but absent
            problem = metadata.meta_problem(p)
            listed = {} if problem else (metadata.read_meta(p).get("checksums") or {})
            missing = sorted(n for n in listed if not (p / n).is_file())
            if problem or missing:
                step["damaged"] = problem or f"missing: {', '.join(missing)}"
        steps.append(step)
    latest = (root / metadata.LATEST).read_text().strip() if (root / metadata.LATEST).is_file() else None
    report = {"root": str(root), "latest": latest, "steps": steps, "tag": tag}
    if tag is not None:
        meta = metadata.read_meta(root / tag)
        report["meta"] = meta
        report["files"] = sorted(p.name for p in (root / tag).iterdir())
    return report


def verify(tag_dir: Path, progress: bool = False) -> tuple[list[tuple[str, str]], int]:
    """(bad files with what is wrong, number of files checked) for one complete step folder; `progress` shows a bar
    over the bytes read (a 70B step with its optimizer states is about a terabyte)."""
    try:
        meta = metadata.read_meta(tag_dir)
    except (OSError, ValueError) as e:
        return [(metadata.META_NAME, str(e))], 1
    checksums = meta.get("checksums") or {}
    total = sum((tag_dir / n).stat().st_size for n in checksums if (tag_dir / n).is_file())
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {tag_dir.name}", disable=not progress,
              leave=False) as bar:
        bad = metadata.verify_files(tag_dir, checksums, sorted(checksums),
                                    on_file=lambda path: bar.update(path.stat().st_size))
    return bad, len(checksums)


def _print(report: dict, diff: list | None) -> None:
    print(f"checkpoint root: {report['root']}   latest -> {report['latest']}")
    for s in report["steps"]:
        state = "complete" if s["complete"] else "INCOMPLETE (interrupted save; never loaded)"
        if s.get("damaged"):
            state = f"DAMAGED ({s['damaged']}; a resume skips it)"
        print(f"  {s['tag']:<20} {s['bytes'] / 2**20:10.1f} MiB  {state}")
    if report["tag"] is None:
        return
    m = report["meta"]
    lay, model = m["layout"], m.get("model", {})
    seq = model.get("seq_length")
    tokens = m.get("tokens_seen") or (m["consumed_samples"] * seq if seq else None)
    print(f"\n{report['tag']} (saved {m.get('saved_at')}, source: {m.get('source')})")
    print(f"  layout          TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']} = {lay['tp'] * lay['pp'] * lay['dp']} ranks")
    print(f"  iteration       {m['iteration']}")
    print(f"  samples         {m['consumed_samples']:,}" + (f"  ({tokens:,} tokens seen)" if tokens else ""))
    print(f"  optimizer state {'yes' if m.get('has_optimizer') else 'no (weights only: loads as a new run or finetune)'}")
    if "skipped_steps" in m:
        print(f"  skipped steps   {m['skipped_steps']} (non-finite loss or gradient norm)")
    shape = ", ".join(f"{k}={model[k]}" for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                   "num_kv_heads", "intermediate_size", "vocab_size") if k in model)
    print(f"  model           {shape}")
    if m.get("schedule"):
        print("  lr schedule     " + ", ".join(f"{k}={v}" for k, v in m["schedule"].items()))
    print("  versions        " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()))
    print(f"  files           {len(report['files'])}")
    if diff is not None:
        if not diff:
            print("\nconfig: identical to the given YAML")
        else:
            print(f"\nconfig differences (checkpoint -> given YAML), {len(diff)} keys:")
            for k, a, b in diff:
                print(f"  {k}: {a!r} -> {b!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="checkpoint root (with `latest`) or one global_stepN folder")
    ap.add_argument("--iteration", type=int, default=None, help="which step (default: the one a resume would load)")
    ap.add_argument("--config", nargs="+", default=None, help="YAML file(s), merged as deepy.py does, to diff against")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="--verify: hide the progress bar")
    ap.add_argument("--verify", action="store_true",
                    help="read every file of the step and check it against the checksums recorded at save")
    args = ap.parse_args(argv)
    path = Path(args.path)
    if not path.is_dir():
        print(f"error: {path} is not a directory", file=sys.stderr)
        return 2
    if args.verify:
        return _verify_main(path, args.iteration, args.progress)
    try:
        report = inspect(path, args.iteration)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    diff = None
    if args.config and report["tag"] is not None:
        from megatron.config import ConfigError

        try:
            diff = config_diff(report["meta"].get("config") or {}, args.config)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        report["config_diff"] = [{"key": k, "checkpoint": a, "yaml": b} for k, a, b in diff]
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        _print(report, diff)
    if report["tag"] is None:
        print(f"error: no complete checkpoint in {path}", file=sys.stderr)
        return 2
    return 0


def _verify_main(path: Path, iteration: int | None, progress: bool = True) -> int:
    """--verify: the step named (a step folder, or --iteration), else every complete step of the root, newest
    first, as a resume would try them."""
    if metadata.tag_iteration(path.name) is not None:
        root, tags = path.parent, [path.name]
    elif iteration is not None:
        root, tags = path, [metadata.tag_for(iteration)]
    else:
        root, tags = path, list(reversed(metadata.tags_in_save_order(path)))
    tags = [t for t in tags if metadata.is_complete(root / t)]
    if not tags:
        print(f"error: no complete checkpoint in {path}", file=sys.stderr)
        return 2
    failed = 0
    for tag in tags:
        bad, checked = verify(root / tag, progress)
        if not bad and not checked:
            print(f"{root / tag}: no checksums recorded (saved before they existed, or by a converter): not verified")
        elif not bad:
            print(f"{root / tag}: OK ({checked} files match their checksums)")
        else:
            failed += 1
            for name, why in bad:
                print(f"{root / tag / name}: {why}")
    if failed:
        print(f"error: {failed} of {len(tags)} checkpoint(s) failed verification", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
