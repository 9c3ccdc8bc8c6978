"""megatron/ is a namespace package shared with megatron-core: both must import together."""

import importlib
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
