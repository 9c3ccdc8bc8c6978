"""The answer letter in an instruct model's reply to the appendix B prompt.

The prompt asks for {"ANSWER": "...", "EXPLANATION": "..."}. The parser takes, in order:
1. with reasoning on, only the answer after </think> (megatron.generation.chat.split_reasoning; a reply still
   thinking has none);
2. the first JSON object in the reply (text before it is allowed) that has an ANSWER key (any case);
3. else a regex over the text: a quoted ANSWER value ('"answer": "B"' in JSON that does not parse, e.g. with an
   unescaped newline), or "answer: B" / "answer is (B)".
An ANSWER value counts when it names exactly one letter (any case, optionally in brackets, optionally followed by
":", ".", ")" or "-" and the option text); "A or B", "A, B" or two regex hits that disagree are unparseable, as
is a reply with no answer at all. Unparseable replies are counted as wrong and reported.
"""

from __future__ import annotations

import json
import re
from typing import Optional

_ONE_LETTER = re.compile(r"\s*(?:option\s*)?[(\[]?\s*([A-Da-d])\s*[)\]]?\s*(?:[:.)\-]\s*.*)?", re.S | re.I)
_QUOTED_ANSWER = re.compile(r"""["']?answer["']?\s*[:=]\s*["']([^"'\n]*)["']""", re.I)
_BARE_ANSWER = re.compile(r"(?i:\banswer\b)\s*(?i:is\s*:?|:)\s*[(\[]?([A-D])\b")


def letter_of(value) -> Optional[str]:
    """'B', 'b', '(B)', 'B: option text' -> 'B'; anything naming no letter or several -> None."""
    if not isinstance(value, str):
        return None
    m = _ONE_LETTER.fullmatch(value)
    return m.group(1).upper() if m else None


def _json_answer(text: str):
    """(found, letter) from the first JSON object with an ANSWER key."""
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            for key, value in obj.items():
                if isinstance(key, str) and key.strip().upper() == "ANSWER":
                    return True, letter_of(value)
    return False, None


def parse_answer(text: str, reasoning: bool = False) -> Optional[str]:
    """The letter A-D the reply gives, or None (unparseable)."""
    if reasoning:  # the reply continues the "<think>\n" prefill: keep what follows </think> ("" if it never closed)
        from megatron.generation.chat import split_reasoning

        text = split_reasoning(text, prefilled=True)[1]
    found, letter = _json_answer(text)
    if found:
        return letter
    hits = {letter_of(v) for v in _QUOTED_ANSWER.findall(text)}
    hits |= {v.upper() for v in _BARE_ANSWER.findall(text)}
    return hits.pop() if len(hits) == 1 and None not in hits else None
