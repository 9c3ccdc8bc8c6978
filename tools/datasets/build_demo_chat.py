#!/usr/bin/env python3
"""Write small synthetic chat datasets for the SFT demo (`make demo-sft`) and tests: no download.

Three JSONL files, one per input shape the chat tool reads, so the demo exercises all of them:
  astro_qa.jsonl   OpenAI `messages`       questions about astronomical objects, with a system prompt
  hermes.jsonl     ShareGPT `conversations` (OpenHermes-2.5 shape), multi-turn
  nemotron.jsonl   Llama-Nemotron rows      (`input` list, `output` with <think>, `system_prompt`)

Each answer is fixed by the object named in the question, while the questions carry random filler (ids,
politeness), so a tiny model can learn the answers (their loss falls near zero) but not the prompts: the
demo shows that only assistant tokens are trained. A few rows repeat across files (the mix tool drops them).
"""

from __future__ import annotations

import argparse
import json
import os
import random

FACTS = {
    "pulsar": "A pulsar is a rapidly rotating neutron star whose beams sweep past Earth.",
    "quasar": "A quasar is an accreting supermassive black hole outshining its host galaxy.",
    "white dwarf": "A white dwarf is the dense, cooling core left by a Sun-like star.",
    "red giant": "A red giant is an evolved star that has swollen after exhausting core hydrogen.",
    "nebula": "A nebula is a cloud of gas and dust where stars may form.",
    "exoplanet": "An exoplanet is a planet orbiting a star other than the Sun.",
    "galaxy cluster": "A galaxy cluster is hundreds of galaxies bound by gravity and dark matter.",
    "supernova": "A supernova is the explosion of a star, briefly as bright as a galaxy.",
}
SYSTEMS = ["You are AstroSage, an astronomy assistant.", "You are a helpful assistant.", "Answer concisely."]
OPENERS = ["Please tell me", "Quick question", "I wonder", "Explain", "Hi there", "Can you say"]


def question(rng: random.Random, obj: str) -> str:
    noise = " ".join(f"{rng.choice('abcdefghkmnpqrstvwxyz')}{rng.randint(10, 9999)}" for _ in range(rng.randint(1, 6)))
    return f"{rng.choice(OPENERS)} ({noise}): what is a {obj}?"


def openai_row(rng: random.Random, facts: list[str]) -> dict:
    obj = rng.choice(facts)
    return {"messages": [{"role": "system", "content": rng.choice(SYSTEMS)},
                         {"role": "user", "content": question(rng, obj)},
                         {"role": "assistant", "content": FACTS[obj]}]}


def sharegpt_row(rng: random.Random, facts: list[str]) -> dict:
    turns = [{"from": "system", "value": rng.choice(SYSTEMS)}]
    for _ in range(rng.randint(1, 3)):
        obj = rng.choice(facts)
        turns += [{"from": "human", "value": question(rng, obj)}, {"from": "gpt", "value": FACTS[obj]}]
    return {"conversations": turns, "source": "synthetic"}


def nemotron_row(rng: random.Random, facts: list[str]) -> dict:
    obj = rng.choice(facts)
    reasoning = rng.choice(["on", "off"])
    output = FACTS[obj]
    if reasoning == "on":
        output = f"<think>\nThe user asks about a {obj}.\n</think>\n\n{output}"
    return {"input": [{"role": "user", "content": question(rng, obj)}], "output": output,
            "system_prompt": f"detailed thinking {reasoning}", "reasoning": reasoning, "category": "science"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--rows", type=int, default=400, help="rows per file (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--facts", type=int, default=len(FACTS), help=f"objects asked about (1..{len(FACTS)})")
    args = p.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    for i, (name, make) in enumerate((("astro_qa", openai_row), ("hermes", sharegpt_row),
                                      ("nemotron", nemotron_row))):
        rng = random.Random(args.seed * 100 + i)
        rows = [make(rng, sorted(FACTS)[: args.facts]) for _ in range(args.rows)]
        rows += rows[: max(1, args.rows // 50)]  # exact duplicates, for the mix tool to find
        path = os.path.join(args.output_dir, f"{name}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{path}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
