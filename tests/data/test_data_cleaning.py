import random

import pytest

from megatron.data.cleaning import gopher_repetition_reason, split_words


def prose_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)[:30]]


def repetitive_documents() -> list[str]:
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from data model train loss token".split()

    def sentence(n=12):
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

    docs = []
    for reps in (1, 2, 3, 5, 10):  # the same line repeated more and more
        docs.append("\n".join([sentence() for _ in range(8)] + ["Click here to subscribe now!"] * reps))
    for reps in (1, 2, 4, 8):  # repeated paragraphs
        paragraph = "\n".join(sentence() for _ in range(3))
        docs.append("\n\n".join([paragraph] * reps + [sentence(30) for _ in range(4)]))
    for reps in (3, 10, 30, 80):  # a dominating bigram / trigram
        docs.append(" ".join([sentence(20)] * 2 + ["buy now"] * reps + [sentence(20)]))
        docs.append(" ".join([sentence(40)] + ["best price online"] * reps))
    for reps in (1, 2, 3, 6):  # long duplicated n-grams (copied sentences)
        body = [sentence(25) for _ in range(10)]
        docs.append(" ".join(body + body[:reps]))
    for _ in range(6):  # random word salad: no structure, little repetition
        docs.append(" ".join(rng.choice(words) for _ in range(rng.randint(20, 400))))
    docs += ["word", "a a a a a a a a a a a a", "Line one\nLine one\nLine two", "Short.\n\nShort.\n\nLong enough."]
    return docs


def test_enough_varied_documents():
    docs = prose_documents() + repetitive_documents()
    reasons = [gopher_repetition_reason(d) for d in docs]
    assert len(docs) >= 50
    assert reasons.count(None) >= 15 and len(set(reasons)) >= 6, reasons


def test_agrees_with_datatrove(monkeypatch):
    from datatrove.data import Document
    from datatrove.pipeline.filters import gopher_repetition_filter

    # datatrove's English word splitter needs spaCy; share ours so the comparison is about the rules themselves.
    monkeypatch.setattr(gopher_repetition_filter, "split_into_words", lambda text, language: split_words(text))
    peer = gopher_repetition_filter.GopherRepetitionFilter()
    names = {"duplicated_{}_n_grams".format(n): f"dup_{n}_gram" for n in range(5, 11)}
    for i, text in enumerate(prose_documents() + repetitive_documents()):
        verdict = peer.filter(Document(text=text, id=str(i)))
        expected = None if verdict is True else names.get(verdict[1], verdict[1])
        assert gopher_repetition_reason(text) == expected, (i, text[:200])


@pytest.mark.parametrize(
    "text,reason",
    [
        ("", "empty"),
        ("spam line\nspam line\nspam line\nreal content here", "dup_line_frac"),
        (
            "Language models learn from text. Careful filtering removes boilerplate, spam and pages that repeat "
            "themselves, while keeping varied prose such as this short paragraph about data quality.",
            None,
        ),
    ],
)
def test_obvious_cases(text, reason):
    assert gopher_repetition_reason(text) == reason
