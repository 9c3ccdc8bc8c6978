"""Checkpoint bookkeeping without launching a run: which tag a resume picks, what pruning keeps, how resharding
reads the old files. (Runs through deepy.py are in tests/distributed/test_checkpoints.py.)"""

import types
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron.checkpoint import metadata, reshard
from megatron.checkpoint.manager import CheckpointManager


def _save(root: Path, iteration: int) -> None:
    """What CheckpointManager.save does with the marker and the pointer, without the tensors."""
    tag = root / metadata.tag_for(iteration)
    tag.mkdir(parents=True, exist_ok=True)
    metadata.write_meta(tag, {"iteration": iteration, "save_serial": metadata.next_save_serial(root)})
    metadata.write_latest(root, tag.name)


def _prune(root: Path, keep: int) -> None:
    manager = CheckpointManager.__new__(CheckpointManager)
    manager.cfg = types.SimpleNamespace(keep_last_n_checkpoints=keep)
    manager._prune(root)


def test_a_rolled_back_run_resumes_and_prunes_by_save_order(tmp_path):
    # Steps 100..300, then a loss spike: the user resumes step 100 (load_iteration) and saves step 150.
    for it in (100, 200, 300, 150):
        _save(tmp_path, it)
    assert metadata.find_loadable_tag(tmp_path) == "global_step150"  # not the abandoned, higher step 300
    _prune(tmp_path, keep=2)
    assert metadata.complete_tags(tmp_path) == ["global_step150", "global_step300"]
    assert metadata.find_loadable_tag(tmp_path) == "global_step150"


def test_a_save_marked_complete_before_the_pointer_moved_is_taken(tmp_path):
    for it in (100, 200):
        _save(tmp_path, it)
    metadata.write_latest(tmp_path, "global_step100")  # the job died between the marker and the pointer
    assert metadata.find_loadable_tag(tmp_path) == "global_step200"


def test_checkpoints_from_before_the_save_serial_order_by_step(tmp_path):
    for it in (100, 200):
        (tmp_path / metadata.tag_for(it)).mkdir()
        metadata.write_meta(tmp_path / metadata.tag_for(it), {"iteration": it})
    assert metadata.find_loadable_tag(tmp_path) == "global_step200"
    metadata.write_latest(tmp_path, "global_step100")
    assert metadata.find_loadable_tag(tmp_path) == "global_step200"
    _save(tmp_path, 50)  # a save by this code is newer than both
    assert metadata.find_loadable_tag(tmp_path) == "global_step50"


def test_folders_that_are_not_checkpoints_are_ignored(tmp_path):
    _save(tmp_path, 100)
    (tmp_path / "global_step200_bad").mkdir()  # set aside by hand
    (tmp_path / "global_step300").mkdir()  # a save that was killed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert metadata.find_loadable_tag(tmp_path) == "global_step100"
    assert [str(w.message).split(" (")[0] for w in caught] == [
        f"skipping incomplete checkpoint {tmp_path / 'global_step300'}"]
    assert [p.name for p in metadata.step_dirs(tmp_path)] == ["global_step100", "global_step300"]


# ---- resharding reads each old file once and reassembles ZeRO fragments split across DP ranks
TP, DP, SPECS, WIDTH = 8, 2, 7, 4


def _zero_checkpoint(tag: Path) -> None:
    """A TP 8 x PP 1 x DP 2 layout: one parameter `w` of WIDTH values per spec and TP rank; each model-parallel
    rank's flat fp32 partition is split between 2 DP ranks, so spec 3's values straddle the two files."""
    tag.mkdir()
    half = SPECS * WIDTH // 2
    for mp in range(TP):
        names = {f"{s}.w": torch.Size([WIDTH]) for s in range(SPECS)}
        torch.save({"param_shapes": [names]}, tag / metadata.mp_rank_file(mp))
        flat = torch.arange(SPECS * WIDTH, dtype=torch.float32) + 1000 * mp
        for d in range(DP):
            frags = {}
            for s in range(SPECS):
                lo, hi = max(s * WIDTH, d * half), min((s + 1) * WIDTH, (d + 1) * half)
                if lo < hi:
                    frags[f"{s}.w"] = types.SimpleNamespace(start=lo - d * half, numel=hi - lo)
            part = flat[d * half:(d + 1) * half].clone()
            state = {"exp_avg": 2 * part, "exp_avg_sq": 3 * part, "step": 7}
            torch.save({"optimizer_state_dict": {
                "param_slice_mappings": [frags], "single_partition_of_fp32_groups": [part],
                "base_optimizer_state": {"state": [state]}}}, tag / metadata.optim_file(d, mp))
        for s in range(SPECS):
            torch.save({"w": flat[s * WIDTH:(s + 1) * WIDTH].bfloat16()}, tag / metadata.layer_file(s, mp))


def test_resharding_opens_each_old_file_once_and_joins_split_fragments(tmp_path, monkeypatch):
    _zero_checkpoint(tmp_path / "global_step7")
    opened = Counter()
    load = torch.load

    def counting_load(path, *args, **kwargs):
        opened[Path(path).name] += 1
        return load(path, *args, **kwargs)

    monkeypatch.setattr(reshard.torch, "load", counting_load)
    src = reshard.SourceCheckpoint(tmp_path / "global_step7", {"layout": {"tp": TP, "pp": 1, "dp": DP}}, None)
    for kind, scale in (("fp32", 1), ("exp_avg", 2), ("exp_avg_sq", 3)):
        for spec in range(SPECS):
            for t in range(TP):
                expected = scale * (torch.arange(spec * WIDTH, (spec + 1) * WIDTH, dtype=torch.float32) + 1000 * t)
                torch.testing.assert_close(src.shard(kind, spec, t)[f"{spec}.w"], expected, rtol=0, atol=0)
    assert src.optimizer_step() == 7
    zero_reads = {n: c for n, c in opened.items() if n.startswith("zero_")}
    assert len(zero_reads) == TP * DP and set(zero_reads.values()) == {1}, zero_reads
    assert all(c == 1 for n, c in opened.items() if n.startswith("mp_rank")), opened


@pytest.mark.parametrize("bad", ["global_step200_bad", "global_stepX"])
def test_inspect_checkpoint_lists_only_step_folders(tmp_path, bad, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "ckpts"))
    import inspect_checkpoint

    _save(tmp_path, 100)
    (tmp_path / bad).mkdir()
    report = inspect_checkpoint.inspect(tmp_path, None)
    assert [s["tag"] for s in report["steps"]] == ["global_step100"] and report["tag"] == "global_step100"


def test_resuming_under_other_rope_or_norm_settings_is_refused_unless_finetuning(tmp_path):
    import yaml

    from megatron.checkpoint.manager import CheckpointMismatchError, model_meta
    from megatron.config.schema import NeoXConfig
    from megatron.model.config import LlamaConfig

    root = Path(__file__).resolve().parents[1]
    llama31 = {**yaml.safe_load((root / "configs" / "tiny_cpu.yml").read_text()), "rotary_emb_base": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    saved = NeoXConfig(**llama31)
    meta = {"model": model_meta(saved, LlamaConfig.from_neox(saved, 256, torch.float32))}
    logged = []

    def manager(**changes) -> CheckpointManager:
        cfg = NeoXConfig(**{**llama31, **changes})
        m = CheckpointManager.__new__(CheckpointManager)
        m.cfg, m.model_cfg, m.log = cfg, LlamaConfig.from_neox(cfg, 256, torch.float32), logged.append
        return m

    manager()._check_model(meta, tmp_path)  # the same settings load
    for changes, named in (({"rotary_emb_base": 10000.0, "rope_scaling": None}, "rotary_emb_base: 500000.0 -> 10000.0"),
                           ({"rms_norm_epsilon": 1e-6}, "rms_norm_epsilon"),
                           ({"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}, "rope_scaling")):
        with pytest.raises(CheckpointMismatchError, match="finetune: true") as err:
            manager(**changes)._check_model(meta, tmp_path)
        assert named in str(err.value) and str(tmp_path) in str(err.value)
    manager(rotary_emb_base=1e6, finetune=True)._check_model(meta, tmp_path)  # context extension, on purpose
    assert "rotary_emb_base: 500000.0 -> 1000000.0" in logged[-1]
    # Another shape is refused even when fine-tuning (deepy.py's preflight refuses it first; a launch without it,
    # e.g. train.py under srun directly, meets this check on every rank).
    with pytest.raises(CheckpointMismatchError, match="different: hidden_size") as err:
        manager(hidden_size=128, finetune=True)._check_model(meta, tmp_path)
    assert "hidden_size=64" in str(err.value) and "hidden_size=128" in str(err.value)


def test_an_unloadable_checkpoint_names_its_truncated_file(tmp_path):
    from megatron.checkpoint.manager import _load_failure

    for name in ("layer_00-model_00-model_states.pt", "layer_01-model_00-model_states.pt"):
        torch.save({"w": torch.ones(1000)}, tmp_path / name)
    failure = RuntimeError("PytorchStreamReader failed reading zip archive")
    assert "do not match this model" in _load_failure(tmp_path, failure)
    bad = tmp_path / "layer_01-model_00-model_states.pt"
    bad.write_bytes(bad.read_bytes()[:-200])
    message = _load_failure(tmp_path, failure)
    assert message.startswith(f"checkpoint file {bad} is truncated or corrupt") and "load_iteration" in message
