"""The rendered prompts equal the paper's appendices B and C character for character.

golden/appendix_*_prompt.md are verbatim copies of the two prompts as the paper's text prints them (markdown of the
typeset PDF: bold labels, list dashes, a code fence, curly quotes, two-space line breaks). `plain()` undoes only
that typesetting, by the rules megatron/eval/prompts.py states; filling the paper's placeholders with the
placeholder texts themselves must then give the appendix exactly. The rendered_*.txt files pin a real question.
"""

import re
from pathlib import Path

from megatron.eval.prompts import INSTRUCT_SYSTEM, instruct_messages, instruct_prompt_text, next_token_prompt

GOLDEN = Path(__file__).parent / "golden"
OPTS = ("[Option A]", "[Option B]", "[Option C]", "[Option D]")


def plain(markdown: str) -> str:
    text = markdown.rstrip("\n")
    text = re.sub(r"^```\n", "", text, flags=re.M)  # the code fence around the JSON output format
    text = text.replace("**", "")  # bold labels
    text = re.sub(r"^- ", "", text, flags=re.M)  # list dashes before the options
    text = re.sub(r" {2}$", "", text, flags=re.M)  # markdown's two-space line breaks
    return text.replace("\u201c", '"').replace("\u201d", '"')  # the JSON's typeset quotes


def test_next_token_prompt_is_appendix_c():
    shots = [("[Example Question 1]", OPTS, "[Correct Answer]"), ("[Example Question 2]", OPTS, "[Correct Answer]")]
    rendered = next_token_prompt("[Actual Test Question]", OPTS, shots)
    assert rendered == plain((GOLDEN / "appendix_C_prompt.md").read_text())
    assert rendered.endswith("\n\nAnswer:")


def test_instruct_prompt_is_appendix_b():
    rendered = instruct_prompt_text("[Question text]", OPTS)
    assert rendered == plain((GOLDEN / "appendix_B_prompt.md").read_text())
    system, user = instruct_messages("[Question text]", OPTS)
    assert system == {"role": "system", "content": INSTRUCT_SYSTEM}  # the first paragraph, as the paper did
    assert system["content"] + "\n\n" + user["content"] == rendered


def test_rendered_real_question_goldens():
    from megatron.eval.shots import PAPER_EXAMPLES

    q = PAPER_EXAMPLES[2]
    shots = [PAPER_EXAMPLES[0].as_shot(), PAPER_EXAMPLES[1].as_shot()]
    assert next_token_prompt(q.question, q.options, shots) == (GOLDEN / "rendered_next_token.txt").read_text()
    assert instruct_prompt_text(q.question, q.options) == (GOLDEN / "rendered_instruct.txt").read_text()
