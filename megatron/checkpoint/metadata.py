"""This project's layer on top of DeepSpeed's checkpoint files: a completeness marker and an atomic `latest`.

A checkpoint root holds one folder per tag (`global_step{N}`) with DeepSpeed's files:

    layer_{spec:02d}-model_{tp:02d}-model_states.pt   weights of one pipeline spec on one TP rank
    mp_rank_{mp:02d}_model_states.pt                   per model-parallel rank (mp = pp_rank * tp + tp_rank):
                                                       scheduler, client state, param shapes
    zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt ZeRO-1 optimizer partitions (absent for weights-only)

plus `neox_meta.json`, written by rank 0 only after every rank has written its files. A tag folder without it is
incomplete (a save that was killed) and is never loaded. `latest` names the newest complete tag; it is replaced
by an atomic rename, so a crash leaves either the old or the new pointer, never a torn one.

Integrity: the marker records an xxh3-128 checksum of every other file of the folder (`checksums`, computed by the
ranks in parallel after the files are written) and one of its own content (`meta_checksum`), so bit rot or a bad
copy — same size, other bytes — is found before a load uses the file (`verify_files`), and a damaged marker is
never mistaken for a good one. Checkpoints without `checksums` (older saves, converter outputs) load unverified.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional

import xxhash

META_NAME = "neox_meta.json"
LATEST = "latest"
FORMAT_VERSION = 1
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(iteration: int) -> str:
    return f"global_step{iteration}"


def tag_iteration(tag: str) -> Optional[int]:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def layer_file(spec_index: int, tp_rank: int) -> str:
    return f"layer_{spec_index:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_rank_file(mp_rank: int) -> str:
    return f"mp_rank_{mp_rank:02d}_model_states.pt"


def optim_file(dp_rank: int, mp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def library_versions() -> dict:
    import deepspeed
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__}
    try:
        from importlib.metadata import version

        out["megatron-core"] = version("megatron-core")
    except Exception:  # running from a wheel unpacked on PYTHONPATH without metadata
        out["megatron-core"] = "unknown"
    return out


def build_meta(*, iteration: int, consumed_samples: int, tp: int, pp: int, dp: int, model: dict,
               has_optimizer: bool, config: Optional[dict] = None, data_state: Optional[dict] = None,
               source: str = "train") -> dict:
    """The metadata every checkpoint carries. `model` holds the shape keys (num_layers, hidden_size, ...)."""
    return {
        "format_version": FORMAT_VERSION,
        "source": source,  # "train", or "hf" for a converter's output
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "layout": {"tp": tp, "pp": pp, "dp": dp},
        "model": model,
        "has_optimizer": has_optimizer,
        "data_state": data_state or {},
        "config": config,
        "versions": library_versions(),
        "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (also used by eval.py for its results)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one


def swap_in_folder(new_dir: Path, final_dir: Path, keep: Optional[Callable[[str], bool]] = None) -> None:
    """Put the finished folder `new_dir` (written beside `final_dir`, on the same file system) at `final_dir`,
    replacing what was there: the old folder is renamed aside, the new one renamed into place, then the old one
    removed. Files of the old folder for which `keep(name)` is true, and which the new one lacks, move over first.
    Used by the exporter's --overwrite and the recipe's merge and base stages: until the new folder is complete, the
    old one stays whole."""
    final_dir, new_dir = Path(final_dir), Path(new_dir)
    if final_dir.is_dir() and keep:
        for p in final_dir.iterdir():
            if keep(p.name) and not (new_dir / p.name).exists():
                shutil.move(str(p), new_dir / p.name)
    old = final_dir.with_name(f".{final_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final_dir.exists():
        final_dir.rename(old)
    new_dir.rename(final_dir)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- checksums
HASH_NAME = "xxh3_128"
_CHUNK = 8 << 20


def file_checksum(path: Path) -> str:
    """xxh3-128 of a file's bytes (several GB/s per core: a small share of a save's write time)."""
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return f"{HASH_NAME}:{h.hexdigest()}"


def checksum_files(tag_dir: Path, names: Iterable[str]) -> dict[str, str]:
    return {name: file_checksum(Path(tag_dir) / name) for name in names}


def files_to_checksum(tag_dir: Path) -> list[str]:
    """Every file of a tag folder but the marker, sorted (the same list on every rank, so ranks can split it)."""
    return sorted(p.name for p in Path(tag_dir).iterdir() if p.is_file() and p.name != META_NAME)


def verify_files(tag_dir: Path, checksums: dict[str, str], names: Iterable[str],
                 on_file: Optional[Callable[[Path], None]] = None) -> list[tuple[str, str]]:
    """(file, what is wrong) for each of `names` that is missing or whose bytes differ from the recorded checksum;
    `on_file` is told each file once it is checked (a progress bar)."""
    bad = []
    for name in names:
        path = Path(tag_dir) / name
        if not path.is_file():
            bad.append((name, "is missing"))
            continue
        got = file_checksum(path)
        if on_file:
            on_file(path)
        if got != checksums[name]:
            bad.append((name, f"does not match its recorded checksum (its bytes changed since the save: bit rot, "
                              f"a bad copy or an edit; {got.split(':')[-1][:12]}... != "
                              f"{checksums[name].split(':')[-1][:12]}...)"))
    return bad


def _meta_digest(meta: dict) -> str:
    body = json.dumps({k: v for k, v in meta.items() if k != "meta_checksum"}, sort_keys=True)
    return f"{HASH_NAME}:{xxhash.xxh3_128_hexdigest(body.encode())}"


def write_meta(tag_dir: Path, meta: dict) -> None:
    meta = {**meta, "meta_checksum": _meta_digest(meta)}
    atomic_write_text(Path(tag_dir) / META_NAME, json.dumps(meta, indent=1, sort_keys=True) + "\n")


def read_meta(tag_dir: Path) -> dict:
    path = Path(tag_dir) / META_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint: {META_NAME} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e}); this checkpoint cannot be trusted") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is corrupt (not a JSON object); this checkpoint cannot be trusted")
    if "meta_checksum" in meta and meta["meta_checksum"] != _meta_digest(meta):
        raise ValueError(f"{path} is corrupt (its content does not match its meta_checksum: edited or damaged "
                         "since the save); this checkpoint cannot be trusted")
    return meta


def meta_problem(tag_dir: Path) -> Optional[str]:
    """Why a complete tag's marker cannot be trusted, or None."""
    try:
        read_meta(tag_dir)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def write_latest(root: Path, tag: str) -> None:
    atomic_write_text(Path(root) / LATEST, tag)


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / META_NAME).is_file()


def step_dirs(root: Path) -> list[Path]:
    """The `global_step{N}` folders in `root`, complete or not, by step; other names (a `global_step200_bad` a user
    set aside) are not checkpoints and are ignored."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and tag_iteration(p.name) is not None),
                  key=lambda p: tag_iteration(p.name))


def complete_tags(root: Path) -> list[str]:
    """Complete tags in `root`, by step."""
    return [p.name for p in step_dirs(root) if is_complete(p)]


def save_order(root: Path, tag: str) -> tuple[int, int]:
    """When a complete tag was saved relative to the others: its `save_serial`, then its step.

    Steps alone do not order saves: a run resumed from an earlier step (`load_iteration`, after a loss spike) saves
    step 150 after an abandoned step 300. Checkpoints from before the serial (and converter outputs) count as 0,
    older than any serial-numbered save, and among themselves by step."""
    try:
        serial = int(json.loads((Path(root) / tag / META_NAME).read_text()).get("save_serial", 0))
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable: loading it will say so
        serial = 0
    return serial, tag_iteration(tag) or 0


def tags_in_save_order(root: Path) -> list[str]:
    """Complete tags in `root`, oldest save first."""
    return sorted(complete_tags(root), key=lambda t: save_order(root, t))


def next_save_serial(root: Path) -> int:
    """The serial for a checkpoint about to be saved in `root`: one past every complete tag's."""
    return 1 + max((save_order(root, t)[0] for t in complete_tags(root)), default=0)


def find_loadable_tag(root: Path, tag: Optional[str] = None, *, exclude: Iterable[str] = (),
                      warn: Optional[Callable[[str], None]] = None) -> Optional[str]:
    """The tag to load: `tag` if given, else the one `latest` names, else the last complete one saved.

    Incomplete folders (a save that was interrupted), folders whose marker is damaged, and the `exclude`d tags (found
    corrupt by a load) are skipped with a warning, falling back to the newest good checkpoint, so a job killed while
    saving resumes from the previous one. `warn` prints the warnings (one rank's logger; default: warnings.warn).
    """
    root = Path(root)
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    if tag is not None:
        if not is_complete(root / tag):
            raise FileNotFoundError(f"checkpoint {root / tag} is missing or incomplete (no {META_NAME})")
        problem = meta_problem(root / tag)
        if problem:
            raise ValueError(problem)
        return tag
    exclude = set(exclude)
    damaged = {t: meta_problem(root / t) for t in complete_tags(root) if t not in exclude}
    damaged = {t: why for t, why in damaged.items() if why}
    ordered = [t for t in tags_in_save_order(root) if t not in exclude and t not in damaged]
    latest_path = root / LATEST
    named = latest_path.read_text().strip() if latest_path.is_file() else None
    if named in ordered:
        # A tag saved after the one `latest` names means the job died after marking that save complete but before
        # moving the pointer: take it. A higher step saved earlier (an abandoned branch) is not newer.
        chosen = ordered[-1] if save_order(root, ordered[-1]) > save_order(root, named) else named
    else:
        chosen = ordered[-1] if ordered else None
    chosen_step = -1 if chosen is None else tag_iteration(chosen)
    instead = f"loading {chosen} instead" if chosen else "no other complete checkpoint to load"
    for p in step_dirs(root):
        if tag_iteration(p.name) <= chosen_step or p.name in exclude:
            continue
        if not is_complete(p):
            warn(f"skipping incomplete checkpoint {p} (no {META_NAME}: the save was interrupted); {instead}")
        elif p.name in damaged:
            warn(f"warning: skipping checkpoint {p}: {damaged[p.name]}; {instead}")
    return chosen
