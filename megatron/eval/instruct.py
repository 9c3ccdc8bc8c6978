"""The full instruct method (appendix B): the prompt through the Llama-3.1 chat format, greedy generation, the
letter parsed from the reply (megatron/eval/answers.py).

The prompt's first paragraph is the system turn, the rest the user turn, as the paper did. With --reasoning
(AstroSage's switch) the system turn is "detailed thinking on" instead, so the whole appendix B text goes in the
user turn, the reply is prefilled with "<think>\\n", and only the text after "</think>" is parsed.

Generation is the generation tool's engine (megatron/generation/engine.py: transformers `generate`, or vLLM),
greedy, stopping at the model's chat stop tokens.
"""

from __future__ import annotations

from megatron.eval.answers import parse_answer
from megatron.eval.prompts import instruct_messages


def instruct_prompt_ids(tokenizer, q, reasoning: bool = False) -> list[int]:
    """Token ids of appendix B's prompt for question `q` as a Llama-3.1 chat, ending with the assistant header
    (and "<think>\\n" with reasoning)."""
    from megatron.generation.chat import chat_prompt_ids

    messages = instruct_messages(q.question, q.options, system=not reasoning)
    return chat_prompt_ids(tokenizer, messages, reasoning=reasoning)


class InstructScorer:
    def __init__(self, loaded, max_new_tokens: int = 1024, reasoning: bool = False, backend: str = "hf",
                 batch_size: int = 8, model_path=None, dtype=None):
        from megatron.generation.engine import Sampling, make_engine

        self.lm, self.reasoning = loaded, reasoning
        self.engine = make_engine(loaded, backend=backend, batch_size=batch_size, model_path=model_path,
                                  dtype=dtype)
        self.sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)

    def prompt(self, q) -> list[int]:
        return instruct_prompt_ids(self.lm.tokenizer, q, self.reasoning)

    def score(self, questions) -> list[dict]:
        completions = self.engine.generate([self.prompt(q) for q in questions], self.sampling)
        records = []
        for q, c in zip(questions, completions):
            letter = parse_answer(c.text, reasoning=self.reasoning)
            records.append({"id": q.id, "prediction": letter, "text": c.text, "stop": c.stop,
                            "parsed": letter is not None, "answer": q.answer,
                            "correct": None if q.answer is None else letter == q.answer})
        return records
