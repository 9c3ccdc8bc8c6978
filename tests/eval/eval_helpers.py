"""Tiny Llama-3-vocabulary models and question sets for the evaluation tests (imported by name: pytest puts
tests/eval on sys.path).

- ASTRO_QUESTIONS: eight hand-written questions, two per answer letter.
- memorising_model(): a tiny HF Llama trained (here, in a few seconds) to answer them: the next-token prompt's
  next token is the answer's " X", and the instruct prompt's reply is the JSON answer then <|eot_id|>.
- synthetic_questions(n): questions with balanced answer letters, for a random model's chance level.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from hf_reference import tiny_hf_llama

LLAMA3_VOCAB = 128256
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_tool(args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc

ASTRO_QUESTIONS = [
    {"id": "sun-age", "question": "What is the approximate age of the Sun?", "A": "4.6 billion years",
     "B": "46 million years", "C": "13.8 billion years", "D": "460 billion years", "answer": "A"},
    {"id": "hubble", "question": "Which quantity does the Hubble constant relate to distance?",
     "A": "Luminosity", "B": "Recession velocity", "C": "Metallicity", "D": "Surface gravity", "answer": "B"},
    {"id": "cmb-temp", "question": "What is the present temperature of the cosmic microwave background?",
     "A": "27 K", "B": "0.27 K", "C": "2.7 K", "D": "270 K", "answer": "C"},
    {"id": "chandrasekhar", "question": "What sets the Chandrasekhar mass limit of white dwarfs?",
     "A": "Radiation pressure", "B": "Magnetic fields", "C": "Rotation", "D": "Electron degeneracy pressure",
     "answer": "D"},
    {"id": "pulsar", "question": "What kind of object is a radio pulsar?", "A": "A rotating neutron star",
     "B": "A brown dwarf", "C": "A protostar", "D": "A red giant", "answer": "A"},
    {"id": "21cm", "question": "Which species emits the 21 cm line?", "A": "Molecular hydrogen",
     "B": "Neutral atomic hydrogen", "C": "Ionised helium", "D": "Carbon monoxide", "answer": "B"},
    {"id": "main-sequence", "question": "What powers a main-sequence star?", "A": "Gravitational contraction",
     "B": "Helium flashes", "C": "Hydrogen fusion in the core", "D": "Radioactive decay", "answer": "C"},
    {"id": "redshift", "question": "What does cosmological redshift measure?", "A": "Stellar rotation",
     "B": "Dust extinction", "C": "Magnetic field strength", "D": "Expansion of the universe since emission",
     "answer": "D"},
]


# Short solved examples for --shots: the memorising model trains in seconds on prompts this short.
SHOTS = [{"id": "shot-moon", "question": "What orbits the Earth?", "A": "Mars", "B": "The Moon", "C": "Venus",
          "D": "Io", "answer": "B"},
         {"id": "shot-light", "question": "What travels at c?", "A": "Light", "B": "Sound", "C": "Wind",
          "D": "Rock", "answer": "A"}]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def synthetic_questions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = ["nebula", "quasar", "photon", "halo", "disk", "jet", "dust", "spin", "flux", "orbit", "shock", "wind"]
    letters = ["A", "B", "C", "D"] * (n // 4) + ["A", "B", "C", "D"][: n % 4]
    rng.shuffle(letters)
    return [{"id": f"syn{i}", "question": f"Which {rng.choice(words)} property holds in case {i}?",
             "options": [" ".join(rng.choices(words, k=3)) for _ in range(4)], "answer": letters[i]}
            for i in range(n)]


def _train(model, sequences: list[tuple[list[int], int]], steps: int, lr: float = 3e-3) -> float:
    """Next-token loss on each sequence's tokens from index `start` on (the answer), the rest is context. The
    128256-row input embedding stays as initialised: an optimizer step over it would cost most of each step on
    CPU, and the layers above it learn what is needed."""
    trained = [p for name, p in model.named_parameters() if "embed_tokens" not in name]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    width = max(len(s) for s, _ in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (seq, start) in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, start - 1:len(seq) - 1] = torch.tensor(seq[start:])  # position t predicts token t+1
    pick = labels.ne(-100)
    model.train()
    for _ in range(steps):
        hidden = model.model(input_ids=ids).last_hidden_state
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[pick]).float(), labels[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def memorising_model(steps: int = 50, seed: int = 0, lr: float = 3e-3, instruct: bool = False, **shape):
    """A tiny HF Llama (Llama-3 vocabulary) that knows ASTRO_QUESTIONS' answers under the next-token prompt with
    SHOTS (and, with `instruct`, replies to the instruct prompt with the JSON answer). `shape`: LlamaConfig
    changes."""
    from megatron.data.tokenizer import build_tokenizer
    from megatron.eval.instruct import instruct_prompt_ids
    from megatron.eval.next_token import prompt_ids
    from megatron.eval.prompts import next_token_prompt
    from megatron.eval.questions import parse_row
    from megatron.eval.shots import shots_for

    tok = build_tokenizer("Llama3Tokenizer")
    model = tiny_hf_llama(vocab=LLAMA3_VOCAB, layers=2, seed=seed, bos_token_id=128000, eos_token_id=128001,
                          **shape)
    pool = [parse_row(r, "shots", 0) for r in SHOTS]
    sequences = []
    for row in ASTRO_QUESTIONS:
        q = parse_row(row, "memorised", 0)
        prompt = prompt_ids(tok, next_token_prompt(q.question, q.options, shots_for(pool, q)), False)
        sequences.append((prompt + tok.encode(" " + q.answer), len(prompt)))
        if instruct:
            chat = instruct_prompt_ids(tok, q, reasoning=False)
            reply = tok.encode(json.dumps({"ANSWER": q.answer, "EXPLANATION": "memorised"})) + [128009]
            sequences.append((chat + reply, len(chat)))
    loss = _train(model, sequences, steps, lr)
    return model, loss
