"""The AstroMLab questions as a local lm-evaluation-harness `multiple_choice` task (a JSONL and a task YAML in a
folder passed to lm-eval's --include_path; nothing from a hub).

Each document's text is the next-token method's prompt (appendix C, megatron.eval.prompts) with its two shots, and
its choices are the letters: lm-eval then compares the log-likelihoods of " A".." D" after the prompt, which is what
tools/eval/mcq.py's next-token method reads from one forward pass. Used to check the "neox" lm-eval model against
lm-eval's own `hf` model (tests/eval/test_harness.py) and to time both scorers (benchmarks/mcq_speed.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron.eval.prompts import next_token_prompt
from megatron.eval.shots import shots_for

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_mcq_task(questions, shots_pool, folder: Path, name: str) -> list[dict]:
    """Write FOLDER/NAME.jsonl (id, prompt, gold index) and FOLDER/NAME.yaml; returns the rows written."""
    rows = [{"id": q.id, "prompt": next_token_prompt(q.question, q.options, shots_for(shots_pool, q)),
             "gold": "ABCD".index(q.answer)} for q in questions]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return rows
