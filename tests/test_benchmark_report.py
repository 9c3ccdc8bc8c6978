"""benchmarks/train_throughput.py's bookkeeping, which runs without a GPU: which of our runs the planner lets run
on one H100, how the JSON files of several short GPU calls merge into one table, and how measured peaks become
records that tests/test_plan.py holds the planner to."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron import planning

ROOT = Path(__file__).resolve().parents[1]
H100_GIB = 79.19  # torch.cuda.get_device_properties(0).total_memory of an H100 80GB HBM3, in GiB


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_planner_picks_which_runs_fit_one_h100(bench):
    fits = {(shape, variant): bench.predicted_to_fit(bench.planned_gib(bench.our_config(shape, variant)), H100_GIB)
            for shape in ("8b-4l", "1b", "3b") for variant in ("fast", "fast-fusedgrad")}
    # Measured on the H100 (docs/performance.md): 8b-4l and 1b ran at 47.5 and 44.3 GiB; 3B ran out of memory.
    assert fits[("8b-4l", "fast")] and fits[("1b", "fast")]
    assert not fits[("3b", "fast")]
    # The fusion drops the bf16 gradient of every matrix: 2 bytes per parameter but the norms' vectors.
    shape = planning.shape_of(planning.config_from_keys(bench.our_config("8b-4l", "fast")))
    norms = (2 * shape.layers + 1) * shape.hidden
    saved = (bench.planned_gib(bench.our_config("8b-4l", "fast"))["allocated"]
             - bench.planned_gib(bench.our_config("8b-4l", "fast-fusedgrad"))["allocated"])
    assert saved >= 2 * (shape.parameter_count() - norms) / 2**30 - 0.02
    # Selective recompute is dropped where a shape is not checkpointed (the config would refuse it) ...
    assert "recompute_granularity" not in bench.our_config("8b-4l", "fast-fusedgrad-selective")
    # ... and keeps the matmul outputs where it is: more memory than full recompute.
    full = bench.planned_gib(bench.our_config("3b", "fast-fusedgrad"))["allocated"]
    assert bench.planned_gib(bench.our_config("3b", "fast-fusedgrad-selective"))["allocated"] > full


def call(peak: float, rows: list[dict], date: str = "2026-11-23") -> dict:
    return {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "python": "3.12.3", "peak_tflops": peak,
            "date": date, "gpu_tests": "7 passed in 80.0s", "rows": rows}


def row(who: str, shape: str, variant: str, tflops: float | None, **extra) -> dict:
    r = {"who": who, "shape": shape, "variant": variant, **extra}
    if tflops is not None:
        r.update(tflops=tflops, tokens_per_s=tflops * 100, peak_gib=40.0)
    return r


def test_calls_merge_into_one_table_each_row_against_its_own_peak(bench):
    first = call(780.0, [row("hf", "8b-4l", "sdpa", 460.0), row("ours", "8b-4l", "fast", 555.0, planned_gib=42.0),
                         row("ours", "8b-4l", "fast-fusedgrad", None, error="Traceback ...", planned_gib=39.0)])
    second = call(750.0, [row("ours", "8b-4l", "fast-fusedgrad", 600.0, planned_gib=39.0),
                          row("ours", "3b", "fast", None, skipped="planner: 90.1 GiB on the device > 79.2 GiB",
                              planned_gib=85.7)], date="2026-11-24")
    rows = bench.merge([first, second])
    assert [(r["shape"], r["variant"]) for r in rows] == [
        ("8b-4l", "sdpa"), ("8b-4l", "fast"), ("8b-4l", "fast-fusedgrad"), ("3b", "fast")]
    text = bench.table(rows)
    lines = {tuple(c.strip() for c in line.split("|")[1:4]): line for line in text.splitlines()[2:]}
    fast, fused = lines[("8b-4l", "ours", "fast")], lines[("8b-4l", "ours", "fast-fusedgrad")]
    assert "71.2%" in fast and "1.21x" in fast and "+5.0%" in fast  # 555/780; 555/460; planned 42 vs 40 measured
    assert "80.0%" in fused and "1.30x" in fused  # the re-measured row replaced the failed one, against 750
    assert "skipped: planner: 90.1 GiB" in lines[("3b", "ours", "fast")]
    assert "1.00x" in lines[("8b-4l", "hf", "sdpa")]


def test_measured_peaks_become_records_the_planner_test_reads(bench, tmp_path):
    config = bench.our_config("8b-4l", "fast-fusedgrad")
    measured = row("ours", "8b-4l", "fast-fusedgrad", 600.0, config=config, steps=8)
    rows = bench.merge([call(780.0, [measured, row("hf", "8b-4l", "sdpa", 460.0)])])
    (record,) = bench.memory_records(rows, commit="abc1234")
    # Every key that decides memory is written out, so the record means the same if a default changes later ...
    assert record["config"]["gradient_accumulation_fusion"] is True
    assert record["config"]["fuse_pointwise"] is True and record["config"]["seq_length"] == 8192
    assert "data_path" not in record["config"] and "run_dir" not in record["config"]
    # ... and the planner reads the record exactly as it read the run's own keys.
    assert record["predicted_peak_gib"] == round(planning.predict_peak_gib(config, 1), 3)
    assert planning.predict_peak_gib(json.loads(json.dumps(record["config"])), 1) == planning.predict_peak_gib(
        config, 1)
    assert record["measured_peak_gib"] == 40.0 and record["device"] == "NVIDIA H100 80GB HBM3"
    assert record["steps"] == 8 and record["commit"] == "abc1234"


def test_every_benchmark_config_passes_the_launchers_checks(bench, tmp_path):
    """A GPU call is short: a run the validator would refuse must fail here, not there. Each shape x variant's
    config, as run_ours writes it, goes through the config loader's full validation (what deepy.py does first)."""
    import yaml

    for shape in bench.SHAPES:
        for variant in bench.VARIANTS:
            path = tmp_path / f"{shape}_{variant}.yml"
            path.write_text(yaml.safe_dump({**bench.our_config(shape, variant), "train_iters": 8,
                                            "split": "100,0,0", "run_dir": str(tmp_path / "run")}))
            cfg = planning.load_for_planning([str(path)]).config  # raises ConfigError naming file and key
            assert cfg.resolved_precision == "bf16" and cfg.zero_optimization.stage == 1, (shape, variant)
            fused = planning.precision_of(cfg).grads_fused
            assert fused == ("fusedgrad" in variant), (shape, variant)
            assert planning.layout_of(cfg, 1).selective == (variant.endswith("selective")
                                                             and shape in bench.NEEDS_CHECKPOINTING)
