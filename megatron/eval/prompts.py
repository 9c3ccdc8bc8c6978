"""The AstroMLab prompts (AstroMLab 2, de Haan et al. 2024, appendices B and C), transcribed into plain text.

The paper prints both prompts as typeset text; the transcription keeps every word, line and blank line and only
undoes the typesetting: bold labels ("Question:") become plain, the list dashes before "A:".."D:" go, the code
block around the JSON output format becomes its content, and the curly quotes of the JSON become straight quotes
(a JSON answer needs them). tests/eval/test_prompts.py holds these rules against a verbatim copy of the appendices.

- Next-token (appendix C): a three-line header, two solved example questions, then the question, ending in
  "Answer:" — the model's next token is read as the answer letter.
- Instruct (appendix B): the whole text; its first paragraph is the system prompt when the chat format has one
  (as the paper did), the rest is the user turn.
"""

from __future__ import annotations

LETTERS = ("A", "B", "C", "D")

NEXT_TOKEN_HEADER = "Astrophysics and Cosmology\nMultiple choice questions\nSolution set:"

INSTRUCT_SYSTEM = (
    "You are an expert in general astrophysics. Your task is to answer and explain the following multiple-choice "
    "question on astrophysics, sourced from a dataset. The question is:"
)

INSTRUCT_USER = """Question: {question}

Options:

A: {A}
B: {B}
C: {C}
D: {D}

Determine the correct answer using your astrophysics knowledge and provide a detailed explanation for why this \
answer is correct.

Ensure your explanation is thorough, clearly articulating your thought process based on astrophysical principles.

Output format:

{{
  "ANSWER": "[The choice you decide to choose]",
  "EXPLANATION": "[Provide a valid explanation for the answer mentioned in ANSWER]"
}}

Give only one answer, either A, B, C or D, but not more than one, and always give an answer.

Provide your response in valid JSON format only. Begin your output with the JSON structure immediately, without \
any preceding text. Strictly adhere to the specified output format."""


def _block(question: str, options: list[str] | tuple[str, ...], answer: str | None) -> str:
    lines = [f"Question: {question}", ""] + [f"{letter}: {text}" for letter, text in zip(LETTERS, options)]
    lines += ["", "Answer:" if answer is None else f"Answer: {answer}"]
    return "\n".join(lines)


def next_token_prompt(question: str, options, shots) -> str:
    """Appendix C's 2-shot prompt. shots: (question, options, answer letter) of each solved example."""
    blocks = [NEXT_TOKEN_HEADER] + [_block(q, o, a) for q, o, a in shots] + [_block(question, options, None)]
    return "\n\n".join(blocks)


def instruct_messages(question: str, options, system: bool = True) -> list[dict]:
    """Appendix B's prompt as chat messages: the first paragraph as the system prompt (system=True, the paper's
    choice wherever a system prompt exists), or the whole text as one user turn."""
    user = INSTRUCT_USER.format(question=question, **dict(zip(LETTERS, options)))
    if system:
        return [{"role": "system", "content": INSTRUCT_SYSTEM}, {"role": "user", "content": user}]
    return [{"role": "user", "content": INSTRUCT_SYSTEM + "\n\n" + user}]


def instruct_prompt_text(question: str, options) -> str:
    """The whole appendix B text for one question (system paragraph, blank line, the rest)."""
    return instruct_messages(question, options, system=False)[0]["content"]
