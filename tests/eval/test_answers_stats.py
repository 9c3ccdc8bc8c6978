"""The instruct-reply parser, the Wilson interval and the paired comparison (pure functions, no model)."""

import math

import numpy as np
import pytest

from megatron.eval.answers import letter_of, parse_answer
from megatron.eval.stats import paired_difference, wilson_interval


@pytest.mark.parametrize("reply, expected", [
    ('{"ANSWER": "B", "EXPLANATION": "Lensing traces mass."}', "B"),
    ('Sure! Here is my answer:\n{\n  "ANSWER": "C",\n  "EXPLANATION": "..." \n}', "C"),  # text before the JSON
    ('{"answer": "d", "explanation": "lowercase key and letter"}', "D"),
    ('{"ANSWER": "(A)", "EXPLANATION": "x"}', "A"),
    ('{"ANSWER": "B: Weak lensing directly measures the mass", "EXPLANATION": "x"}', "B"),
    ('{"ANSWER": "A or B", "EXPLANATION": "two letters"}', None),
    ('{"ANSWER": "A, C", "EXPLANATION": "two letters"}', None),
    ('{"ANSWER": "", "EXPLANATION": "no letter"}', None),
    # bad JSON (a raw newline inside the string, a trailing comma): the regex fallback reads the quoted value
    ('{"ANSWER": "B", "EXPLANATION": "line one\nline two",}', "B"),
    ("{'ANSWER': 'c', 'EXPLANATION': 'single quotes'}", "C"),
    ("The correct answer is (D) because of the virial theorem.", "D"),
    ("Answer: A", "A"),
    ('"ANSWER": "A" ... later "ANSWER": "B"', None),  # two answers that disagree
    ("The answer is a bit unclear to me.", None),  # the article "a" is not a letter
    ("I cannot decide.", None),
    ("", None),
])
def test_parse_answer(reply, expected):
    assert parse_answer(reply) == expected


def test_reasoning_is_stripped_before_parsing():
    # the reply continues the "<think>\n" prefill: the answer the thinking mentions must not count
    reply = 'The answer might be "ANSWER": "A"... no.\n</think>\n{"ANSWER": "C", "EXPLANATION": "x"}'
    assert parse_answer(reply, reasoning=True) == "C"
    assert parse_answer('still thinking, "ANSWER": "A"', reasoning=True) is None  # never closed: no answer
    assert parse_answer(reply) == "C"  # without the switch the first JSON object still wins


def test_letter_of():
    assert [letter_of(x) for x in ("B", " b ", "[C]", "Option D", "D.", 3, None, "AB")] == \
        ["B", "B", "C", "D", "D", None, None, None]


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (81, 263), (3395, 4425), (1, 200)])
def test_wilson_matches_scipy(k, n):
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)


def test_wilson_known_values():
    # textbook values (Newcombe 1998, table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=5e-5)


def test_paired_difference():
    rng = np.random.default_rng(1)
    a = rng.random(400) < 0.6
    b = a.copy()
    flip = rng.choice(400, 60, replace=False)
    b[flip[:45]] = True  # B gains on 45 questions (some already right) and loses 15
    b[flip[45:]] = False
    r = paired_difference(a, b)
    assert r["difference"] == pytest.approx(b.mean() - a.mean())
    assert r["ci95"][0] < r["difference"] < r["ci95"][1]
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.binomtest(r["only_a_correct"], r["only_a_correct"] + r["only_b_correct"], 0.5).pvalue
    assert r["mcnemar_p"] == pytest.approx(ref, rel=1e-9)
    same = paired_difference(a, a)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0
    # a real gain is seen as one: the interval excludes 0 when B fixes 40 of A's wrong answers
    c = a.copy()
    c[np.flatnonzero(~a)[:40]] = True
    assert paired_difference(a, c)["ci95"][0] > 0 and paired_difference(a, c)["mcnemar_p"] < 1e-6
    assert math.isclose(paired_difference(a, c)["difference"], 0.1)


def test_summary_without_an_answer_key_is_predictions_only():
    from megatron.eval.mcq import format_summary, summarize

    s = summarize([{"id": "a", "prediction": "B", "answer": None, "correct": None},
                   {"id": "b", "prediction": None, "answer": None, "correct": None}])
    assert (s["questions"], s["n"], s["accuracy"], s["ci95"], s["unparseable"]) == (2, 0, None, None, 1)
    assert "predictions only" in format_summary(s)
    keyed = summarize([{"id": "a", "prediction": "B", "answer": "B", "correct": True},
                       {"id": "b", "prediction": None, "answer": "C", "correct": False}])
    assert (keyed["n"], keyed["correct"], keyed["accuracy"], keyed["unparseable"]) == (2, 1, 0.5, 1)
    assert keyed["ci95"] == list(wilson_interval(1, 2))
