"""The two solved examples of the next-token prompt.

`--shots FILE` (a question file whose rows have answers) gives the pool; without it the pool is the paper's own
published examples (AstroMLab 2, appendix A), which are not a scored question there: example 1 (answer B) and
example 3 (answer A) by default, so the two shots do not share a letter; example 2 (answer B) stands in when a
pool question is the very question being asked (never shown its own answer). Each question uses the first two pool
entries whose text differs from its own.
"""

from __future__ import annotations

from megatron.eval.questions import Question, QuestionFileError, read_questions

PAPER_EXAMPLES = [
    Question(id="appendixA-1", line=0, answer="B",
             question="What is the most likely range of initial masses for stars that become planetary nebulae?",
             options=("0.5 to 1.0 solar masses", "1.0 to 1.5 solar masses", "1.5 to 2.0 solar masses",
                      "2.0 to 2.5 solar masses")),
    Question(id="appendixA-3", line=0, answer="A",
             question="What are the primary advantages of directly imaged spectra of exoplanets compared to "
                      "transmission spectra?",
             options=("Directly imaged spectra typically have higher resolution and signal-to-noise ratio, "
                      "allowing for more precise measurements of atmospheric features.",
                      "Directly imaged spectra provide information about the planet's atmospheric composition at "
                      "all orbital phases, while transmission spectra only probe the day-night terminator region.",
                      "Direct imaging allows for the detection of exoplanets at much smaller orbital separations "
                      "than transit spectroscopy.",
                      "Directly imaged spectra are less affected by the presence of clouds and hazes in the "
                      "planet's atmosphere, leading to more accurate abundance estimates.")),
    Question(id="appendixA-2", line=0, answer="B",
             question="What is the primary advantage of using weak gravitational lensing to map dark matter compared "
                      "to methods that rely on the distribution of light?",
             options=("Weak lensing is less affected by dust obscuration, providing a clearer view of dark matter.",
                      "Weak lensing directly measures the mass distribution, including dark matter, rather than "
                      "just the distribution of luminous matter.",
                      "Weak lensing is sensitive to the motion of dark matter, revealing its dynamic behavior.",
                      "Weak lensing can probe dark matter at higher redshifts than traditional methods.")),
]


def read_shots(path: str) -> list[Question]:
    pool = read_questions(path)
    unsolved = [q for q in pool if q.answer is None]
    if unsolved:
        raise QuestionFileError(f"{path}:{unsolved[0].line}: a shot needs its 'answer' (a letter A-D)")
    if len(pool) < 2:
        raise QuestionFileError(f"{path}: --shots needs at least two solved questions (has {len(pool)})")
    return pool


def shots_for(pool: list[Question], question) -> list[tuple]:
    """(question, options, answer) of the two shots for `question` (None: the first two of the pool)."""
    text = None if question is None else question.question.strip()
    chosen = [q for q in pool if q.question.strip() != text][:2]
    if len(chosen) < 2:
        raise QuestionFileError(f"question {question.id!r} is itself one of the only two shots; give --shots a "
                                "third solved question")
    return [q.as_shot() for q in chosen]
