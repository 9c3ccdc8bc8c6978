"""Reading multiple-choice question files (JSONL, one question a line).

Two row shapes are accepted:
- the public Astrobench shape: "question", "A", "B", "C", "D", optional "answer" (a letter) and "id";
- "question", "options" (a list of exactly four strings), optional "answer" as a letter or a 0-based index, "id".

A bad row is reported as FILE:LINE with what is wrong and how to fix it; nothing is scored from a file with a
bad row. Blank lines are skipped. Without "id" a question is named by its line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from megatron.eval.prompts import LETTERS


class QuestionFileError(ValueError):
    """A question file that cannot be used; the message names FILE:LINE and the fix."""


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: Optional[str]  # "A".."D", or None without an answer key
    line: int

    def as_shot(self) -> tuple[str, tuple[str, ...], str]:
        return self.question, self.options, self.answer


def _answer(value, where: str) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bool):
        raise QuestionFileError(f"{where}: 'answer' is {value!r}; give a letter A-D or an index 0-3")
    if isinstance(value, int):
        if 0 <= value <= 3:
            return LETTERS[value]
        raise QuestionFileError(f"{where}: 'answer' index {value} is out of range; give 0-3 (or a letter A-D)")
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return value.strip().upper()
    raise QuestionFileError(f"{where}: 'answer' is {value!r}; give a letter A-D (or an index 0-3)")


def parse_row(row, where: str, line: int) -> Question:
    if not isinstance(row, dict):
        raise QuestionFileError(f"{where}: a row must be a JSON object with 'question' and the four options")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise QuestionFileError(f"{where}: 'question' is missing or empty; every row needs the question text")
    if "options" in row:
        options = row["options"]
        if not isinstance(options, list) or len(options) != 4:
            n = len(options) if isinstance(options, list) else type(options).__name__
            raise QuestionFileError(f"{where}: 'options' must be a list of exactly 4 strings (got {n})")
    else:
        missing = [k for k in LETTERS if k not in row]
        if missing:
            raise QuestionFileError(f"{where}: option(s) {', '.join(missing)} missing; give keys A, B, C and D "
                                    "or a list 'options' of four strings")
        options = [row[k] for k in LETTERS]
    for letter, text in zip(LETTERS, options):
        if not isinstance(text, str):
            raise QuestionFileError(f"{where}: option {letter} is {text!r}; options must be strings")
    qid = row.get("id", f"line{line}")
    return Question(id=str(qid), question=question, options=tuple(options), answer=_answer(row.get("answer"), where),
                    line=line)


def read_questions(path: str) -> list[Question]:
    questions, seen = [], {}
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise QuestionFileError(f"{path}: cannot read the question file ({e.strerror}); check --questions") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise QuestionFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); one JSON object "
                                        "per line") from None
            q = parse_row(row, where, line_no)
            if q.id in seen:
                raise QuestionFileError(f"{where}: id {q.id!r} repeats line {seen[q.id]}; ids must be unique")
            seen[q.id] = line_no
            questions.append(q)
    if not questions:
        raise QuestionFileError(f"{path}: no questions in the file; one JSON object per line")
    return questions
