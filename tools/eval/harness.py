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

if __name__ == "__main__":
    cli_evaluate()
