"""Nothing lost, nothing silent: checksummed checkpoints, `load` means load, one job per run, data checked before
launch — each bad state through deepy.py in real processes (CPU, gloo), refused or recovered, the file or key
named, no traceback, and the bytes of every good checkpoint that existed before unchanged.

One reference run (2 ranks, 6 steps, saves at 2, 4, 6) serves every test: a second job started on its `save`
while it runs is the lock test; copies of its checkpoints are corrupted for the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDatasetWriter, idx_path, bin_path
from test_checkpoints import VOCAB, _config, _deepy, _env, _losses, _ok, _spawn, _wait_for, data  # noqa: F401
from test_checkpoints import STEPS as STEPS_221, straight_221

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = (1, 1, 2)
STEPS = 6

pytestmark = pytest.mark.distributed


def _digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".run.lock"}


def _flip(path: Path, fill: int = 0, count: int = 4096) -> None:
    """Silent corruption: `count` bytes in the middle of the file overwritten, the size unchanged (bit rot, a bad
    copy). For a weights file, 4096 zero bytes are 1,024 fp32 weights set to 0."""
    raw = bytearray(path.read_bytes())
    start = max(0, len(raw) // 2 - count // 2)
    end = min(len(raw), start + count)
    raw[start:end] = bytes([fill]) * (end - start) if bytes(raw[start:end]) != bytes([fill]) * (end - start) \
        else bytes([fill ^ 0xFF]) * (end - start)
    path.write_bytes(bytes(raw))


def _logged_steps(run_dir: Path) -> list[int]:
    """Steps with a training loss in metrics.jsonl, in file order, duplicates kept."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "train/loss" in r]


def _clean(out: str) -> None:
    assert "Traceback" not in out, out[-4000:]


@pytest.fixture(scope="module")
def base(tmp_path_factory, data) -> dict:
    """The reference run; a second job on its `save` is started while it trains (the lock test reads the result)."""
    run = tmp_path_factory.mktemp("integrity_base")
    cfg = _config(run, data, LAYOUT, train_iters=STEPS)
    first = _spawn(cfg, NEOX_FAULT_STEP_SLEEP="1.0")
    head = _wait_for(first, "step      1/")  # the first job holds the lock and trains
    t0 = time.time()
    second = _deepy(cfg, timeout=120)
    second_seconds = time.time() - t0
    rest, _ = first.communicate(timeout=400)
    assert first.returncode == 0, (head + rest)[-4000:]
    return {"run": run, "ckpt": run / "ckpt", "config": cfg, "first_pid": first.pid, "second": second,
            "second_seconds": second_seconds, "first_out": head + rest, "digests": _digests(run / "ckpt")}


def test_a_second_job_on_the_same_save_exits_2_at_once_naming_the_first(base):
    second = base["second"]
    out = second.stdout + second.stderr
    assert second.returncode == 2, out[-3000:]
    assert base["second_seconds"] < 30, base["second_seconds"]
    assert "another job is running on this save folder" in second.stderr
    assert f"host {socket.gethostname()}, pid {base['first_pid']}" in second.stderr
    assert "launch:" not in out
    _clean(out)
    # The first job was not disturbed: every step logged once, every save complete, the lock gone with it.
    assert _logged_steps(base["run"] / "run") == list(range(1, STEPS + 1))
    assert [p.name for p in sorted(base["ckpt"].glob("global_step*"))] == ["global_step2", "global_step4",
                                                                           "global_step6"]
    assert not (base["ckpt"] / ".run.lock").exists()
    meta = json.loads((base["ckpt"] / "global_step6" / "neox_meta.json").read_text())
    files = {p.name for p in (base["ckpt"] / "global_step6").iterdir()} - {"neox_meta.json"}
    assert set(meta["checksums"]) == files and all(v.startswith("xxh3_128:") for v in meta["checksums"].values())


def test_bad_load_settings_and_bad_data_are_refused_before_launch(base, data, tmp_path):
    before = _digests(base["ckpt"])

    def refused(name: str, **overrides) -> str:
        run = tmp_path / name
        proc = _deepy(_config(run, data, LAYOUT, train_iters=STEPS, **overrides), timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out[-3000:]
        assert "nothing was launched" in proc.stderr and "launch:" not in out
        assert not (run / "run").exists() and not (run / "ckpt").exists()  # nothing written
        _clean(out)
        return proc.stderr

    # 1. A typo in `load`, together with every kind of bad data: all named at once.
    d = tmp_path / "data"
    d.mkdir()
    good = data["train_data_paths"][0]
    floats = str(d / "float_text_document")  # an .idx whose dtype code says float32
    shutil.copy(bin_path(good), bin_path(floats))
    raw = bytearray(Path(idx_path(good)).read_bytes())
    raw[17] = 7  # the dtype code byte (after the 9-byte magic and the u64 version): float32
    Path(idx_path(floats)).write_bytes(bytes(raw))
    big = str(d / "bigids_text_document")  # ids past the vocabulary
    with IndexedDatasetWriter(big, np.int32) as w:
        w.add_document(np.arange(100) % VOCAB)
        w.add_document(np.array([1, 2, VOCAB + 5, 3]))
        w.finalize()
    short = str(d / "short_text_document")  # a truncated .bin
    shutil.copy(idx_path(good), idx_path(short))
    Path(bin_path(short)).write_bytes(Path(bin_path(good)).read_bytes()[:-10])
    err = refused("typo", load=str(tmp_path / "chekpoints"), train_data_weights=None,
                  train_data_paths=[floats, big, short], valid_data_paths=[str(d / "missing_text_document")])
    assert f"load = '{tmp_path / 'chekpoints'}'" in err and "it does not exist" in err and "allow_fresh_start" in err
    assert f"{idx_path(floats)}: dtype code 7 means float32, not an integer token type" in err
    assert f"{bin_path(big)} holds token id {VOCAB + 5}, outside the vocabulary (vocab_size {VOCAB}" in err
    assert f"{bin_path(short)}: data file is" in err and "truncated" in err
    assert f"{idx_path(str(d / 'missing_text_document'))} and" in err and "valid_data_paths" in err
    assert "Config errors (5)" in err
    # The id range of each file is cached (in data_cache_dir here) for the next launch.
    assert list(Path(data["data_cache_dir"]).glob("bigids_text_document-*.token_range.json"))

    # 2. A `load` holding only an interrupted save.
    partial = tmp_path / "partial"
    (partial / "global_step6").mkdir(parents=True)
    (partial / "global_step6" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    err = refused("interrupted", load=str(partial))
    assert "global_step6 (interrupted save: no neox_meta.json)" in err and "load = " in err

    # 3. load_iteration without load: would have trained from scratch over the run's checkpoints.
    err = refused("no_load", load_iteration=4, save=str(base["ckpt"]))
    assert "load_iteration = 4: there is no `load`" in err

    # 4. A roll-back to step 2 in the run's own folder: steps 4 and 6 would be overwritten.
    err = refused("rollback", load=str(base["ckpt"]), save=str(base["ckpt"]), load_iteration=2)
    assert "global_step4, global_step6" in err and "allow_rollback: true" in err
    assert _digests(base["ckpt"]) == before


def test_corrupt_checkpoints_fall_back_loudly_to_the_newest_that_verifies(base, data, tmp_path):
    """The run's own folder (load = save, as a requeued job) with step 6's marker damaged and 1,024 weights of
    step 4 zeroed: the job skips 6, finds 4 corrupt by its checksum, resumes step 2 and retrains 3..6 exactly."""
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    shutil.copytree(base["ckpt"], ckpt)
    shutil.copytree(base["run"] / "run", run)
    meta = ckpt / "global_step6" / "neox_meta.json"
    meta.write_text(meta.read_text().replace('"consumed_samples": 48', '"consumed_samples": 40'))
    layer = sorted((ckpt / "global_step4").glob("layer_*-model_states.pt"))[1]
    _flip(layer)
    # A lock left by a job that was killed on this host (its pid is gone): taken over with a warning.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (ckpt / ".run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                "heartbeat": time.time()}))
    before = _digests(ckpt)

    out = _ok(_deepy(_config(tmp_path, data, LAYOUT, train_iters=STEPS, load=str(ckpt), save=str(ckpt))))
    _clean(out)
    assert "took over the stale run lock" in out
    assert out.count(f"skipping checkpoint {ckpt / 'global_step6'}") == 1 and "meta_checksum" in out
    assert out.count("WARNING: checkpoint") == 1
    assert f"WARNING: checkpoint {ckpt / 'global_step4'} is corrupt: {layer.name} does not match its recorded " \
           f"checksum" in out and f"falling back to {ckpt / 'global_step2'}" in out
    assert "step 2, 16 samples consumed" in out
    ref, resumed = _losses(base["run"]), _losses(tmp_path)
    assert _logged_steps(run) == list(range(1, STEPS + 1))  # metrics.jsonl: steps 3..6 once, not twice
    assert [resumed[s] for s in range(3, STEPS + 1)] == [ref[s] for s in range(3, STEPS + 1)]  # bitwise
    assert len((run / "metrics.rolled_back.jsonl").read_text().splitlines()) == STEPS - 2

    # Nothing deleted: step 2 untouched, the corrupt steps moved aside byte for byte, new 4 and 6 saved.
    after = _digests(ckpt)
    for name, digest in before.items():
        if name.startswith("global_step2/"):
            assert after[name] == digest, name
        elif name.startswith(("global_step4/", "global_step6/")):
            tag, rest = name.split("/", 1)
            aside = [k for k in after if k.startswith(tag + ".corrupt-") and k.endswith("/" + rest)]
            assert len(aside) == 1 and after[aside[0]] == digest, name
    assert (ckpt / "latest").read_text() == "global_step6"
    sys.path.insert(0, str(ROOT / "tools" / "ckpts"))
    import inspect_checkpoint

    assert inspect_checkpoint.main([str(ckpt), "--verify"]) == 0


def test_load_iteration_naming_a_corrupt_checkpoint_is_refused_once_without_traceback(base, data, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(base["ckpt"], ckpt)
    shard = ckpt / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's optimizer partition
    _flip(shard, fill=0x7F)
    before = _digests(ckpt)
    proc = _deepy(_config(tmp_path / "resume", data, LAYOUT, train_iters=STEPS, load=str(ckpt), load_iteration=4))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert out.count(f"checkpoint file {shard} does not match its recorded checksum") == 1
    assert "load_iteration names this checkpoint, so nothing was loaded" in out
    _clean(out)
    assert _digests(ckpt) == before
    assert not list((tmp_path / "resume").glob("ckpt/global_step*"))


@pytest.mark.parametrize("kind", ["layer_", "mp_rank_", "zero_pp_rank_", "rng_state_", "config.yml",
                                  "neox_meta.json"])
def test_silent_corruption_of_any_checkpoint_file_is_found(base, tmp_path, kind, capsys):
    """Offline, with the same checksums a load verifies: one file of each type changed, its size unchanged."""
    sys.path.insert(0, str(ROOT / "tools" / "ckpts"))
    import inspect_checkpoint

    tag = tmp_path / "global_step2"
    shutil.copytree(base["ckpt"] / "global_step2", tag)
    assert inspect_checkpoint.main([str(tag), "--verify"]) == 0
    assert "OK (" in capsys.readouterr().out
    victim = sorted(p for p in tag.iterdir() if p.name.startswith(kind))[-1]
    if kind == "neox_meta.json":  # still valid JSON, one number changed
        victim.write_text(victim.read_text().replace('"iteration": 2', '"iteration": 3'))
    else:
        _flip(victim, count=16)
    assert inspect_checkpoint.main([str(tag), "--verify"]) == 2
    out = capsys.readouterr().out
    assert str(victim) in out and ("does not match its recorded checksum" in out or "meta_checksum" in out)


def test_a_killed_writer_leaves_no_temporary_file_behind(tmp_path):
    prefix = str(tmp_path / "corpus_text_document")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = Path(bin_path(prefix) + f".tmp-{int(dead.stdout)}")
    stale.write_bytes(b"\0" * 1000)
    live = Path(bin_path(prefix) + f".tmp-{os.getppid()}")  # a writer still running: left alone
    live.write_bytes(b"\0")
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_document(np.arange(10))
        w.finalize()
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("layout", [LAYOUT, (2, 2, 1)], ids=["dp2", "tp2-pp2"])
def test_kill_9_at_a_random_moment_then_the_resume_matches_the_straight_run(base, data, tmp_path, tmp_path_factory,
                                                                          layout):
    """SIGKILL to the whole job (launcher and ranks) after a random step plus a random delay — mid-step, mid-save
    or between — then the same command again: it takes over the dead job's lock, resumes from the newest complete
    checkpoint, and every logged loss equals the uninterrupted run's (at the same layout), each step once in
    metrics.jsonl. Two layouts, DP 2 and TP 2 x PP 2: data, tensor and pipeline parallel each hold state a resume
    must restore (ZeRO-1 optimizer shards; per-TP-rank weight and RNG shards; per-stage layer files)."""
    import random
    import signal

    if layout == LAYOUT:
        ref_run, steps = base["run"], STEPS
    else:  # the uninterrupted run at this layout, shared with test_checkpoints' resharding tests
        ref_run, steps = straight_221(tmp_path_factory, data), STEPS_221
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    after_step, delay = rng.randint(1, steps - 1), rng.uniform(0.0, 1.5)
    cfg = _config(tmp_path, data, layout, train_iters=steps, load=str(tmp_path / "ckpt"))
    proc = _spawn(cfg, NEOX_FAULT_STEP_SLEEP="0.5")
    _wait_for(proc, f"step {after_step:>6}/")
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = _ok(_deepy(cfg))
    _clean(out)
    assert "took over the stale run lock" in out, (seed, out[-3000:])
    assert out.count("skipping incomplete checkpoint") <= 1  # said once (rank 0), not once per rank
    ref, resumed = _losses(ref_run), _losses(tmp_path)
    assert _logged_steps(tmp_path / "run") == list(range(1, steps + 1)), (seed, after_step, delay)
    assert [resumed[s] for s in resumed] == [ref[s] for s in resumed], (seed, after_step, delay)


def test_run_lock_judges_another_hosts_lock_by_its_heartbeat(tmp_path):
    """On a shared file system the owner may be on another host: its pid means nothing here, its heartbeat does."""
    from megatron.checkpoint.run_lock import RunLock, RunLocked

    lock_file = tmp_path / ".run.lock"
    other = {"host": "node-that-is-not-this-one", "pid": 1, "job_id": "SLURM_JOB_ID=42"}
    lock_file.write_text(json.dumps({**other, "heartbeat": time.time() - 10}))
    with pytest.raises(RunLocked) as held:
        RunLock(tmp_path, stale_seconds=60).acquire()
    assert held.value.args[0]["job_id"] == "SLURM_JOB_ID=42"
    lock_file.write_text(json.dumps({**other, "heartbeat": time.time() - 120}))
    lock = RunLock(tmp_path, stale_seconds=60, heartbeat_seconds=0.05)
    lock.acquire()
    assert lock.took_over["host"] == other["host"]
    first = json.loads(lock_file.read_text())
    assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
    time.sleep(0.3)
    assert json.loads(lock_file.read_text())["heartbeat"] > first["heartbeat"]  # the owner keeps it fresh
    with pytest.raises(RunLocked):  # a second taker in this very process (same host, live pid) is refused
        RunLock(tmp_path).acquire()
    lock.release()
    assert not lock_file.exists()


def test_bad_steps_from_the_first_step_after_a_load_save_nothing():
    """Non-finite from the first step after the load: the loaded weights are the fault, so they are not saved as
    'the weights from before the fault' (a later streak still saves)."""
    from types import SimpleNamespace

    from megatron.trainer import Trainer, TrainingDiverged

    def stopped(first_bad: int, resumed_from: int = 4):
        saved, printed = [], []
        trainer = SimpleNamespace(
            guard=SimpleNamespace(consecutive=3, first_bad_step=first_bad, max_bad_steps=3),
            checkpoints=SimpleNamespace(resumed_from=resumed_from), cfg=SimpleNamespace(save="ckpt"),
            iteration=first_bad + 2, save=lambda: saved.append(1) or "ckpt/global_step9",
            sinks=SimpleNamespace(print=printed.append, close=lambda: None))
        with pytest.raises(TrainingDiverged):
            Trainer._stop_on_bad_steps(trainer)
        return saved, printed[-1]

    saved, message = stopped(first_bad=5)
    assert not saved and "No step since the start (step 4) was finite, so nothing was saved" in message
    saved, message = stopped(first_bad=7)
    assert saved and "The weights from before the fault are saved in ckpt/global_step9" in message


def test_a_fault_only_the_workers_see_is_printed_once_and_no_rank_prints_a_traceback(data, tmp_path):
    """Data damaged after deepy.py checked it (or a launch of the DeepSpeed runner command that deepy.py prints,
    which skips deepy.py's checks): the workers find it; one rank names the file, once, and no rank prints a
    traceback (before, every rank printed a ~30-line traceback)."""
    d = tmp_path / "data"
    d.mkdir()
    good, late = data["train_data_paths"][0], str(d / "late_text_document")
    shutil.copy(bin_path(good), bin_path(late))
    shutil.copy(idx_path(good), idx_path(late))
    cfg = _config(tmp_path, {**data, "train_data_paths": [late], "train_data_weights": None}, LAYOUT,
                  train_iters=STEPS)
    dry = subprocess.run([sys.executable, str(ROOT / "deepy.py"), "train.py", str(cfg), "--dry-run"], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]
    cmd = shlex.split(dry.stdout.split("launch: ", 1)[1].splitlines()[0])
    with open(bin_path(late), "r+b") as f:  # the data changes under the run: half the tokens are gone
        f.truncate(os.path.getsize(bin_path(late)) // 2)
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    named = [line for line in out.splitlines() if line.startswith("error:") and bin_path(late) in line]
    assert len(named) == 1, out[-4000:]
    assert "truncated" in named[0] or "size" in named[0], named
    _clean(out)
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").glob("global_step*"))
