"""tests_vllm uses the CPU suite's fixtures (the one-process model layout). Loaded by path: both files are
named conftest.py."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("cpu_suite_conftest",
                                               Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cpu)
single_rank = _cpu.single_rank
