"""megatron/ is a namespace package shared with megatron-core: both must import together."""

import importlib
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_megatron_core_and_project_modules_import_together():
    import megatron.core
    from megatron.core import parallel_state, tensor_parallel  # noqa: F401

    for name in ("megatron.config", "megatron.model.llama", "megatron.parallel.layout", "megatron.data.tokenizer",
                 "megatron.trainer", "megatron.checkpoint.hf_keys"):
        importlib.import_module(name)
    paths = [str(p) for p in importlib.import_module("megatron").__path__]
    assert any(p.startswith(str(ROOT)) for p in paths) and any("site-packages" in p for p in paths)


def test_no_top_level_init_and_no_shadowing_of_megatron_core_packages():
    assert not (ROOT / "megatron" / "__init__.py").exists()
    for reserved in ("core", "training", "inference", "legacy", "rl", "post_training"):
        assert not (ROOT / "megatron" / reserved).exists(), reserved


def test_cpu_ranks_skip_deepspeeds_shared_memory_op(single_rank):
    """On CPU, DeepSpeed's backend would JIT-compile its inference all-reduce op and leave a /dev/shm buffer per
    rank; the layout stops the build (megatron/parallel/layout.py). If DeepSpeed moves the function, fail here."""
    import glob

    ds_comm = importlib.import_module("deepspeed.comm.comm")
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*")


def test_gpu_wheels_are_the_versions_the_cpu_suite_runs():
    """benchmarks/gpu/wheels.txt (what `make gpu-wheels` carries to the GPU machine) pins the packages `make test`
    installs: the Makefile's pins exactly, the others inside requirements/*.txt's ranges, so the GPU checks run the
    code the CPU suite checked."""
    from packaging.requirements import Requirement

    wheels = {}
    for line in (ROOT / "benchmarks" / "gpu" / "wheels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            wheels[req.name.lower().replace("_", "-")] = str(next(iter(req.specifier)).version)
    makefile = (ROOT / "Makefile").read_text()
    pins = next(line for line in makefile.splitlines() if line.startswith("PINS"))
    for pin in pins.split(":=", 1)[1].split():
        name, version = pin.split("==")
        if name != "torch":  # the GPU image has its own torch (2.11)
            assert wheels[name] == version, (name, wheels.get(name), version)
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if not line:
                continue
            req = Requirement(line)
            name = req.name.lower().replace("_", "-")
            if name in wheels:
                assert req.specifier.contains(wheels[name], prereleases=True), (path.name, line, wheels[name])
