"""Question files: both row shapes read alike; a bad row is named FILE:LINE by the CLI (exit 2, no traceback,
nothing written)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.eval.questions import QuestionFileError, read_questions

ROOT = Path(__file__).resolve().parents[2]
GOOD = {"question": "Q?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "B", "id": "q1"}


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_both_shapes(tmp_path):
    rows = [GOOD, "", {"question": "Q2?", "options": ["w", "x", "y", "z"], "answer": 2},
            {"question": "Q3?", "options": ["w", "x", "y", "z"], "answer": "d"},
            {"question": "Q4?", "A": "1", "B": "2", "C": "3", "D": "4"}]
    qs = read_questions(write(tmp_path / "q.jsonl", rows))
    assert [q.id for q in qs] == ["q1", "line3", "line4", "line5"]  # no id: named by line (blank lines count)
    assert [q.answer for q in qs] == ["B", "C", "D", None]
    assert qs[1].options == ("w", "x", "y", "z")


@pytest.mark.parametrize("row, words", [
    ("{not json", "not valid JSON"),
    ({"question": "Q?", "A": "a", "B": "b", "C": "c"}, "option(s) D missing"),
    ({"question": "Q?", "options": ["a", "b", "c"]}, "exactly 4"),
    ({"question": "", "A": "a", "B": "b", "C": "c", "D": "d"}, "'question' is missing or empty"),
    ({**GOOD, "answer": "E"}, "give a letter A-D"),
    ({**GOOD, "answer": 4}, "index 4 is out of range"),
])
def test_bad_rows(tmp_path, row, words):
    path = write(tmp_path / "q.jsonl", [GOOD, row])
    with pytest.raises(QuestionFileError, match=f"q.jsonl:2: .*{re.escape(words)}"):
        read_questions(path)


def test_repeated_id(tmp_path):
    with pytest.raises(QuestionFileError, match=r"q.jsonl:3: id 'q1' repeats line 1"):
        read_questions(write(tmp_path / "q.jsonl", [GOOD, "", GOOD]))


def test_cli_names_the_bad_line_and_writes_nothing(tmp_path):
    path = write(tmp_path / "q.jsonl", [GOOD, GOOD | {"id": "q2"}, {"question": "Q?", "options": "abcd"}])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "tools/eval/mcq.py", "--model", str(tmp_path / "no_model"),
                        "--questions", path, "--output", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"{path}:3: 'options' must be a list of exactly 4 strings" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_default_shots_never_show_the_question_its_own_answer(tmp_path):
    from megatron.eval.shots import PAPER_EXAMPLES, read_shots, shots_for

    ex1, ex3, ex2 = PAPER_EXAMPLES
    other = read_questions(write(tmp_path / "q.jsonl", [GOOD]))[0]
    assert [s[0] for s in shots_for(PAPER_EXAMPLES, other)] == [ex1.question, ex3.question]
    assert [s[2] for s in shots_for(PAPER_EXAMPLES, other)] == ["B", "A"]  # the two shots differ in letter
    asked = read_questions(write(tmp_path / "q1.jsonl", [{**GOOD, "question": ex1.question}]))[0]
    assert [s[0] for s in shots_for(PAPER_EXAMPLES, asked)] == [ex3.question, ex2.question]
    with pytest.raises(QuestionFileError, match="at least two solved questions"):
        read_shots(write(tmp_path / "s.jsonl", [GOOD]))
    with pytest.raises(QuestionFileError, match=r"s2.jsonl:1: a shot needs its 'answer'"):
        unsolved = {k: v for k, v in GOOD.items() if k != "answer"}
        read_shots(write(tmp_path / "s2.jsonl", [unsolved, GOOD | {"id": "q2"}]))
