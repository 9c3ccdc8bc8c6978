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
    lines = {tuple(c.strip() for c in line.split("|")[1:5]): line for line in text.splitlines()[2:]}
    fast, fused = lines[("1", "8b-4l", "ours", "fast")], lines[("2", "8b-4l", "ours", "fast-fusedgrad")]
    assert "71.2%" in fast and "1.21x" in fast and "+5.0%" in fast  # 555/780; 555/460; planned 42 vs 40 measured
    # The re-measured row replaced the failed one, against its own call's 750; the peer ran in another call (other
    # clocks), so no ratio.
    assert "80.0%" in fused and "| - |" in fused and "x |" not in fused
    assert "skipped: planner: 90.1 GiB" in lines[("2", "3b", "ours", "fast")]
    assert "1.00x" in lines[("1", "8b-4l", "hf", "sdpa")]
    notes = bench.report(rows, append=False, record=False, commit="abc1234").split("\n\n", 1)[1]
    assert notes.startswith("Call 1 on NVIDIA H100 80GB HBM3") and "\nCall 2 on" in notes and "780 TFLOP/s" in notes


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
    # A call that says which commit it ran keeps it: reports are often made later, at another commit.
    measured_at = {**call(780.0, [measured]), "commit": "def5678"}
    assert bench.memory_records(bench.merge([measured_at]), commit="abc1234")[0]["commit"] == "def5678"


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
            assert fused == ("fusedgrad" in variant or variant == "defaults"), (shape, variant)  # on by default
            assert planning.layout_of(cfg, 1).selective == (variant.endswith("selective")
                                                             and shape in bench.NEEDS_CHECKPOINTING)


# ---------------------------------------------------------------------------------------------------------------
# The GPU call's own bookkeeping, run here with the child processes stubbed: a 10-minute call must not come back
# empty or mis-measured.

FUSION_LINE = "gradient accumulation fusion: 29 weights, cuBLAS GEMM accumulating into the fp32 buffer"


def fake_trainer(speeds: list[float], peak: float, returncode: int | None = 0):
    """A stand-in for run_child running deepy.py: appends to run_dir/metrics.jsonl as MetricSinks does, writes a log
    with the trainer's setup lines; None = it ran past its timeout."""
    def run(cmd, timeout, log, cwd=None):
        run_dir = Path(cmd[-1]).parent
        with open(run_dir / "metrics.jsonl", "a") as f:
            for step, s in enumerate(speeds, 1):
                f.write(json.dumps({"step": step, "train/tokens_per_s": s, "train/tflops_per_gpu": s / 100,
                                    "train/peak_mem_gib": peak, "train/loss": 10.0 - step}) + "\n")
        log.write_text(f"[2026-11-24] deepspeed info\n{FUSION_LINE}\nLlama: 1,920.00M parameters | tp 1 pp 1 dp 1 | "
                       f"bf16\nstep 1/8 ...\n" + "x" * 5000 + "\nlast line of the log\n")
        return returncode
    return run


def test_a_rerun_of_the_same_run_reads_only_its_own_steps(bench, tmp_path, monkeypatch):
    """The trainer appends to run_dir/metrics.jsonl: a second run of the same shape and variant in the same --work
    (a re-run on a warm machine) must not take its median over both runs, nor its peak over both."""
    warm = [5000, 20000, 50000]
    monkeypatch.setattr(bench, "run_child", fake_trainer(warm + [55000] * 5, peak=45.0))
    first = bench.run_ours("8b-4l", "fast-fusedgrad", Path("data"), 8, tmp_path, {})
    monkeypatch.setattr(bench, "run_child", fake_trainer(warm + [60000] * 5, peak=40.0))
    second = bench.run_ours("8b-4l", "fast-fusedgrad", Path("data"), 8, tmp_path, {})
    assert first["tokens_per_s"] == 55000 and second["tokens_per_s"] == 60000
    assert second["peak_gib"] == 40.0 and len(second["step_tokens_per_s"]) == 8
    # What the log said comes back in the row (the log stays on the GPU machine): the wgrad kernel the fusion
    # chose and the setup lines, and the report shows the kernel.
    assert second["wgrad_kernel"] == "29 weights, cuBLAS GEMM accumulating into the fp32 buffer"
    assert FUSION_LINE in second["setup"] and any(x.startswith("Llama:") for x in second["setup"])
    assert "error" not in second
    text = bench.table(bench.merge([call(780.0, [second])]))
    assert "cuBLAS GEMM accumulating into the fp32 buffer" in text and "MFU vs median matmul peak" in text


def test_a_run_past_its_timeout_or_failing_is_an_error_row_with_its_log_tail(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_child", fake_trainer([], peak=0.0, returncode=None))
    row = bench.run_ours("8b-4l", "fast", Path("data"), 8, tmp_path, {}, timeout=123)
    assert row["timed_out"] and "timed out after 123 s" in row["error"]
    assert row["error"].rstrip().endswith("last line of the log") and FUSION_LINE in row["setup"]
    assert "timed out after" in bench.table(bench.merge([call(780.0, [row])]))
    monkeypatch.setattr(bench, "run_child", fake_trainer([5000] * 2, peak=1.0, returncode=1))
    row = bench.run_ours("8b-4l", "fast", Path("data"), 8, tmp_path, {})
    assert "tflops" not in row and row["error"].startswith("exit 1") and "last line of the log" in row["error"]


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for a reaper that is not ours."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_run_child_ends_the_whole_process_group(bench, tmp_path):
    """A launcher's workers (and torch.compile's) are grandchildren: on a timeout, and after a normal exit, none of
    them may keep the GPU or the output file. No timing is asserted: a 0.5 s timeout on a 60 s sleep."""
    import time

    for timeout, expected in ((60.0, 0), (0.5, None)):
        log = tmp_path / f"log{expected}.txt"
        script = "sleep 60 & echo $!; " + ("exit 0" if expected == 0 else "wait")
        assert bench.run_child(["sh", "-c", script], timeout, log) == expected
        pid = int(log.read_text().split()[0])
        for _ in range(100):  # SIGKILL is delivered at once; the orphan's reaping may take a moment
            if _gone(pid):
                break
            time.sleep(0.05)
        assert _gone(pid), (timeout, pid)


def test_the_call_writes_its_header_first_runs_in_the_order_given_and_stops_at_its_deadline(bench, tmp_path,
                                                                                            monkeypatch):
    """One GPU call end to end, children stubbed, on a fake clock: the JSON holds the peak and the tests' outcome
    before the first run; runs go in --variants order (`hf` places the peer); each child's timeout comes from
    --deadline; a run that cannot finish in what is left is not started but recorded."""
    clock = [0.0]
    monkeypatch.setattr(bench, "now", lambda: clock[0])
    monkeypatch.setattr(bench, "STARTED", 0.0)
    out = tmp_path / "out" / "c1.json"
    out.parent.mkdir()
    seen = []

    def probe(timeout, log):
        seen.append(("probe", timeout))
        clock[0] += 10
        return {"device": "NVIDIA H100 80GB HBM3", "total_gib": H100_GIB, "torch": "2.11.0+cu130", "cuda": "13.0",
                "peak_tflops": 760.0, "peak_tflops_max": 771.0, "peak_windows": [771.0, 760.0, 755.0, 762.0, 758.0],
                "peak_tflops_burst": 780.0,
                "peak_method": "median of 5 windows"}

    def gpu_tests(timeout, log):
        seen.append(("tests", timeout))
        assert json.loads(out.read_text())["peak_tflops"] == 760.0  # the header is there before the tests run
        clock[0] += 100
        return "9 passed in 100.0s", ""

    def header_then(row):
        def run(*args, timeout):
            written = json.loads(out.read_text())
            assert written["gpu_tests"] == "9 passed in 100.0s" and written["peak_tflops_max"] == 771.0
            seen.append((row["variant"], round(timeout)))
            clock[0] += 200
            return dict(row, rows_before=len(written["rows"]))
        return run

    monkeypatch.setattr(bench, "measure_device", probe)
    monkeypatch.setattr(bench, "run_gpu_tests", gpu_tests)
    monkeypatch.setattr(bench, "ensure_tokens", lambda prefix, deadline: prefix)
    monkeypatch.setattr(bench, "run_peer", lambda shape, steps, work, timeout: header_then(
        row("hf", shape, "sdpa", 460.0))(timeout=timeout))
    monkeypatch.setattr(bench, "run_ours", lambda shape, variant, *a, timeout: header_then(
        row("ours", shape, variant, 600.0))(timeout=timeout))
    bench.main(["--shapes", "8b-4l", "--variants", "fast-fusedgrad,hf,fast", "--json", str(out),
                "--work", str(tmp_path / "work"), "--deadline", "560"])
    # 560 s: the probe (10 s) and the tests (capped at 200, took 100) leave 450, less the 10 s margin for the
    # fused run's timeout; it and the peer take 200 s each and leave 50: too few for `fast`, recorded as skipped.
    assert seen == [("probe", 180), ("tests", 200), ("fast-fusedgrad", 440), ("sdpa", 240)]
    written = json.loads(out.read_text())
    assert [(r["variant"], r.get("rows_before")) for r in written["rows"]] == [
        ("fast-fusedgrad", 0), ("sdpa", 1), ("fast", None)]
    assert written["rows"][2]["skipped"].startswith("deadline: 50 s left of --deadline 560")
    assert [p.name for p in out.parent.iterdir()] == ["c1.json"]  # written atomically: no temporary left
    assert bench.plan_runs(["1b"], ["fast", "fast-fusedgrad"], no_peer=False) == [
        ("1b", "hf"), ("1b", "fast"), ("1b", "fast-fusedgrad")]
    assert bench.plan_runs(["1b"], ["fast", "hf"], no_peer=True) == [("1b", "fast")]
