"""Write a small multiple-choice question set whose answers are in the recipe's domain corpus.

    python tools/recipe/make_questions.py --corpus data/recipe/domain.jsonl --output data/recipe/questions.jsonl \
        --shots data/recipe/shots.jsonl --count 40

Each question is a sentence of a training document with one word blanked ("Fill in the blank: ... ____ ..."); the
four options are the missing word and three other words of the same length class drawn from the corpus, so the
answer is something continued pretraining on that corpus can plausibly teach (a cloze question). Two more
questions go to --shots, the solved examples of the next-token prompt (short ones: the in-training evaluation
needs the whole prompt within seq_length). The answer letters are balanced over A-D. Deterministic for a seed.
"""
import argparse
import json
import random
import re
import sys
from pathlib import Path

WORD = re.compile(r"[A-Za-z]{5,12}")


def sentences(text: str):
    for line in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
        line = " ".join(line.split())
        words = line.split(" ")
        if 8 <= len(words) <= 18 and line[0].isupper() and line.endswith(".") and "::=" not in line:
            yield line


class CorpusError(ValueError):
    """The corpus cannot be read: missing, or a line that is not a JSON object with a string `text`."""


def read_texts(corpus: Path) -> list[str]:
    if not corpus.is_file():
        raise CorpusError(f"{corpus}: file not found; pass the domain corpus JSONL (one {{\"text\": ...}} per line)")
    docs = []
    for n, line in enumerate(corpus.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{corpus}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CorpusError(f"{corpus}:{n}: expected an object with a string `text` field")
        docs.append(row["text"])
    return docs


def build(corpus: Path, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    docs = read_texts(corpus)
    pool = sorted({s for d in docs for s in sentences(d)})
    vocab = sorted({w.lower() for d in docs for w in WORD.findall(d)})
    rng.shuffle(pool)
    out, seen = [], set()
    for sentence in pool:
        candidates = [m for m in WORD.finditer(sentence) if m.group(0).islower()]
        if not candidates:
            continue
        m = rng.choice(candidates)
        answer = m.group(0)
        if answer in seen:
            continue
        distractors = [w for w in vocab if w != answer and abs(len(w) - len(answer)) <= 2 and w not in sentence]
        if len(distractors) < 3:
            continue
        seen.add(answer)
        options = rng.sample(distractors, 3)
        letter = len(out) % 4  # balanced answer letters
        options.insert(letter, answer)
        question = "Fill in the blank: " + sentence[:m.start()] + "____" + sentence[m.end():]
        out.append({"id": f"recipe-{len(out)}", "question": question,
                    **{k: v for k, v in zip("ABCD", options)}, "answer": "ABCD"[letter]})
        if len(out) == count:
            break
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="JSONL with a `text` field (the domain training corpus)")
    p.add_argument("--output", required=True)
    p.add_argument("--shots", required=True, help="two solved questions for the next-token prompt")
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        rows = build(Path(args.corpus), args.count + 2, args.seed)
    except CorpusError as e:
        print(f"error: {e}; nothing written", file=sys.stderr)
        return 2
    if len(rows) < args.count + 2:
        print(f"error: {args.corpus}: only {len(rows)} questions could be made, {args.count + 2} needed; "
              f"use a larger corpus or a smaller --count", file=sys.stderr)
        return 2
    # the two shortest go to the shots (prompt length), with different letters
    rows.sort(key=lambda r: len(r["question"]) + sum(len(r[k]) for k in "ABCD"))
    shots = [rows[0]] + [next(r for r in rows[1:] if r["answer"] != rows[0]["answer"])]
    questions = sorted((r for r in rows if r not in shots), key=lambda r: int(r["id"].split("-")[1]))
    for path, data in ((args.output, questions), (args.shots, shots)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    print(f"{args.output}: {len(questions)} cloze questions from {args.corpus}; {args.shots}: 2 shots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
