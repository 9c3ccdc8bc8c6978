#!/usr/bin/env python
"""lm-evaluation-harness with this trainer's checkpoints: lm-eval's own command line, with the model "neox"
registered (megatron/eval/harness.py). Every lm-eval option works; every document is scored unless --limit.

    python tools/eval/harness.py --model neox --model_args path=checkpoints/run,step=2000 --tasks arc_easy
    python tools/eval/harness.py --model neox --model_args path=ckpt --tasks my_task --include_path tasks/

Needs requirements/eval.txt (pip install -r requirements/eval.txt).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

try:
    from lm_eval.__main__ import cli_evaluate
except ImportError as e:
    print(f"error: lm-evaluation-harness is not installed ({e}); pip install -r requirements/eval.txt",
          file=sys.stderr)
    sys.exit(2)

import megatron.eval.harness  # noqa: E402,F401  registers --model neox
from megatron.generation.loading import ModelLoadError  # noqa: E402


def main() -> int:
    """lm-eval's command line; the two mistakes a user makes most (a model folder that cannot be loaded, a task
    name lm-eval does not know) end in one line and exit 2 instead of lm-eval's traceback."""
    try:
        cli_evaluate()
    except ModelLoadError as e:
        print(f"error: --model_args: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if not str(e).startswith("Tasks not found"):
            raise
        print(f"error: {e}; `python tools/eval/harness.py ls tasks` lists the known ones (--include_path DIR adds "
              "your own YAML tasks)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
