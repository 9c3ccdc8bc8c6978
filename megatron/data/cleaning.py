"""Document-level cleaning used by tools/datasets/preprocess_data.py.

`gopher_repetition_reason` implements the repetition rules of the Gopher paper (Rae et al. 2021, table A1) with
the same conventions as datatrove's GopherRepetitionFilter, so keep/drop decisions agree with it:
  * paragraphs are split on 2+ newlines of the stripped text, lines on 1+ newlines;
  * duplicate fractions count each repeat of an earlier element (the first occurrence is not a duplicate);
  * character fractions are over the full text length;
  * a top n-gram's characters are its words joined by single spaces, times its count; ties go to the n-gram
    seen first;
  * duplicate n-gram characters come from a left-to-right scan that, on meeting an n-gram seen before, counts
    its characters (words without separators) and jumps past it, so overlapping repeats are not double counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")
# Words and individual punctuation marks, like a blank spaCy/NLTK English tokenizer's output on prose.
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def split_words(text: str) -> list[str]:
    return _WORD.findall(text)


@dataclass(frozen=True)
class GopherRepetitionThresholds:
    dup_line_frac: float = 0.30
    dup_para_frac: float = 0.30
    dup_line_char_frac: float = 0.20
    dup_para_char_frac: float = 0.20
    top_n_gram_char_frac: Sequence[tuple[int, float]] = field(default=((2, 0.20), (3, 0.18), (4, 0.16)))
    dup_n_gram_char_frac: Sequence[tuple[int, float]] = field(
        default=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    )


def _duplicates(elements: list[str]) -> tuple[int, int]:
    """(number of elements that repeat an earlier one, their total characters)."""
    seen: set[str] = set()
    count = chars = 0
    for element in elements:
        if element in seen:
            count += 1
            chars += len(element)
        else:
            seen.add(element)
    return count, chars


def _top_n_gram_chars(words: list[str], n: int) -> int:
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
    if not counts:
        return 0
    top = max(counts, key=counts.__getitem__)  # dicts keep insertion order: ties go to the earliest n-gram
    return (sum(map(len, top)) + n - 1) * counts[top]


def _duplicate_n_gram_chars(words: list[str], n: int) -> int:
    seen: set[tuple[str, ...]] = set()
    chars = 0
    i = 0
    while i <= len(words) - n:
        gram = tuple(words[i : i + n])
        if gram in seen:
            chars += sum(map(len, gram))
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_repetition_reason(
    text: str, thresholds: GopherRepetitionThresholds = GopherRepetitionThresholds()
) -> str | None:
    """Name of the first Gopher repetition rule `text` breaks, or None to keep it."""
    if not text:
        return "empty"
    t = thresholds
    size = len(text)
    paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
    count, chars = _duplicates(paragraphs)
    if count / len(paragraphs) > t.dup_para_frac:
        return "dup_para_frac"
    if chars / size > t.dup_para_char_frac:
        return "dup_para_char_frac"
    lines = _LINE_SPLIT.split(text)
    count, chars = _duplicates(lines)
    if count / len(lines) > t.dup_line_frac:
        return "dup_line_frac"
    if chars / size > t.dup_line_char_frac:
        return "dup_line_char_frac"
    words = split_words(text)
    for n, limit in t.top_n_gram_char_frac:
        if _top_n_gram_chars(words, n) / size > limit:
            return f"top_{n}_gram"
    for n, limit in t.dup_n_gram_char_frac:
        if _duplicate_n_gram_chars(words, n) / size > limit:
            return f"dup_{n}_gram"
    return None
