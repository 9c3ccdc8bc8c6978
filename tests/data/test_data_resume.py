"""Resuming with another global batch than the checkpoint's: the data must neither run out, hang nor repeat."""

import numpy as np
import pytest
from data_helpers import random_docs, write_dataset

from megatron.data.data_utils import DataExhaustedError, MicroBatchSampler, make_data_loader, train_samples_needed
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.replay import ReplayPlan, build_epoch_indices

SEQ = 16


def test_sampler_refuses_consumed_samples_past_the_end():
    # Saved at step 6 with global batch 8 (48 samples), resumed on 4 DP ranks with a 40-sample dataset.
    with pytest.raises(ValueError, match=r"consumed_samples 48 is past the end of the dataset \(40 samples"):
        MicroBatchSampler(40, 48, 1, 0, 4)
    assert len(MicroBatchSampler(40, 40, 1, 0, 4)) == 0  # the end exactly: a finished run, nothing left


def test_samples_needed_covers_the_steps_left_at_the_new_global_batch(tmp_path):
    train_iters, old_gbs, new_gbs, iteration = 10, 8, 4, 6
    consumed = iteration * old_gbs
    needed = train_samples_needed(train_iters, iteration, consumed, new_gbs)
    assert needed == consumed + (train_iters - iteration) * new_gbs == 64
    # Unchanged or larger batch, or past train_iters: what a fresh run builds, or at least what was consumed.
    assert train_samples_needed(train_iters, iteration, iteration * new_gbs, new_gbs) == train_iters * new_gbs
    assert train_samples_needed(train_iters, 3, 3 * 2, 4) == train_iters * 4
    assert train_samples_needed(5, 12, 96, 4) == 96

    # The resumed run on 4 DP ranks (micro batch 1) gets its 4 steps from samples it has not served since resuming.
    prefix = write_dataset(str(tmp_path / "d"), random_docs(40, seed=1))
    ds = GPTDataset(IndexedDataset(prefix), "train", needed, SEQ, 1, cache_dir=str(tmp_path / "c"))
    per_rank = [list(make_data_loader(ds, 1, r, new_gbs, consumed)) for r in range(new_gbs)]
    assert [len(batches) for batches in per_rank] == [train_iters - iteration] * new_gbs
    served = [tuple(b["tokens"][0].tolist()) for batches in per_rank for b in batches]
    assert len(set(served)) == len(served) == needed - consumed


class _CountingLoader:
    """A loader that holds `n` batches and fails if it is iterated a second time."""

    def __init__(self, n):
        self.n, self.passes = n, 0

    def __iter__(self):
        self.passes += 1
        assert self.passes == 1, "the loader was restarted: its samples would be served again"
        import torch

        return iter([{"tokens": torch.full((2, SEQ + 1), i)} for i in range(self.n)])


def test_lm_batches_raise_when_the_data_runs_out(tmp_path):
    from megatron.trainer import _lm_batches  # imported here: the trainer module takes seconds to import

    # An empty loader used to spin forever, a short one to start again from its first batch.
    with pytest.raises(DataExhaustedError, match="ran out after 0 micro-batches"):
        next(_lm_batches(_CountingLoader(0)))
    batches = _lm_batches(_CountingLoader(3))
    assert [int(next(batches)[0][0, 0]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(DataExhaustedError):
        next(batches)

    # With the real loader the message says where the data ended and why.
    prefix = write_dataset(str(tmp_path / "d"), random_docs(40, seed=1))
    ds = GPTDataset(IndexedDataset(prefix), "train", 40, SEQ, 1, cache_dir=str(tmp_path / "c"))
    batches = _lm_batches(make_data_loader(ds, 4, 0, 1, consumed_samples=24))
    for _ in range(4):
        next(batches)
    with pytest.raises(DataExhaustedError) as info:
        next(batches)
    message = str(info.value)
    assert "at sample 40 of a dataset of 40 samples" in message and "consumed_samples 24" in message
    assert "global batch" in message and "gradient_accumulation_steps" in message


def _plan(global_batch):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, 50)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    _, plan = build_epoch_indices([(starts, lengths, np.arange(50))], [], [], [], 0.0, 1.5, SEQ, 0,
                                  global_batch_size=global_batch)
    return ReplayPlan.from_json(plan)


def test_epoch_plan_refuses_a_resume_that_would_run_out():
    plan = _plan(4)
    total, train_iters = plan.total_samples, plan.train_iters()
    assert plan.check_resume(0, 0, train_iters, 4) is None
    assert plan.check_resume(12, 3, train_iters, 4) is None  # same global batch
    # Saved with global batch 8 after 3 steps: the steps left at 4 need 12 samples more than the plan has.
    with pytest.raises(ValueError) as info:
        plan.check_resume(24, 3, train_iters, 4)
    message = str(info.value)
    assert f"need {total + 12:,} samples" in message and f"the plan holds {total:,}" in message
    assert "24 samples in 3 steps (global batch 8)" in message and "gradient_accumulation_steps" in message
    # Saved with global batch 2: the run would end 6 samples before the plan does; said, not refused.
    note = plan.check_resume(6, 3, train_iters, 4)
    assert note and f"the last 6 samples of the {total:,}-sample plan are not trained" in note
    # A checkpoint of a longer run (same batch) is past this plan's end.
    with pytest.raises(ValueError, match="run with more epochs"):
        plan.check_resume(total + 8, train_iters + 2, train_iters, 4)


def test_trainer_builds_enough_data_for_a_resume_with_a_smaller_global_batch(tmp_path, monkeypatch):
    """Trainer._build_data on a stand-in trainer (no engine): saved at step 6 of 10 with global batch 8, resumed
    on 4 DP ranks with global batch 4."""
    from types import SimpleNamespace

    import megatron.trainer as trainer_mod
    from megatron.data.lm_batches import GlobalTokenBatches

    prefix = write_dataset(str(tmp_path / "d"), random_docs(40, seed=1))
    cfg = SimpleNamespace(
        train_iters=10, train_data_paths=[prefix], train_data_weights=None, valid_data_paths=None,
        valid_data_weights=None, test_data_paths=None, test_data_weights=None, data_path=None, split="969,30,1",
        seq_length=SEQ, seed=1, eval_iters=0, data_cache_dir=str(tmp_path / "c"), train_micro_batch_size_per_gpu=1,
        num_workers=0, eod_mask_loss=False, train_label_data_paths=None, valid_label_data_paths=None,
        test_label_data_paths=None, gradient_accumulation_steps=1, resolved_pack_impl="packed")
    printed = []
    loaders = []

    def recording_loader(dataset, *args, **kwargs):
        loaders.append(make_data_loader(dataset, *args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(trainer_mod, "make_data_loader", recording_loader)
    # No process group here: count each rank's loss tokens alone (the DP all-reduce is tested in test_sft_loss.py).
    monkeypatch.setattr(trainer_mod, "GlobalTokenBatches", lambda batches, gas, dp, group: GlobalTokenBatches(
        batches, gas, 1, group))
    fake = SimpleNamespace(cfg=cfg, epoch_data=None, label_epochs=None, iteration=6, consumed_samples=48, global_batch=4,
                           layout=SimpleNamespace(dp_rank=0, dp=4, mpu=lambda: SimpleNamespace(
                               get_data_parallel_group=lambda: None)), sinks=SimpleNamespace(print=printed.append),
                           tokenizer=SimpleNamespace(eod_id=0))
    trainer_mod.Trainer._build_data(fake)
    assert len(loaders[0].dataset) == 64 and len(loaders[0]) == 4  # one micro-batch per step left on this rank
    assert "the training set holds 64 samples" in printed[0]
    for _ in range(4):
        next(fake.train_iter)
    with pytest.raises(DataExhaustedError):
        next(fake.train_iter)

    # An epoch run cannot grow its plan: it refuses before any step rather than running out at the end.
    plan = _plan(4)
    fake.epoch_data = SimpleNamespace(plan=plan, train=None, replay_valid=None)
    fake.iteration, fake.consumed_samples, cfg.train_iters = 3, 24, plan.train_iters()
    with pytest.raises(ValueError, match="cannot resume this 1.5-epoch run with global batch 4"):
        trainer_mod.Trainer._build_data(fake)
