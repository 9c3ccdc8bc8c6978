"""The full instruct method (appendix B): the prompt through the Llama-3.1 chat format, greedy generation, the
letter parsed from the reply (megatron/eval/answers.py).

The prompt's first paragraph is the system turn, the rest the user turn, as the paper did. With --reasoning
(AstroSage's switch) the system turn is "detailed thinking on" instead, so the whole appendix B text goes in the
user turn, the reply is prefilled with "<think>\\n", and only the text after "</think>" is parsed.
"""

from __future__ import annotations

import torch

from megatron.eval.answers import parse_answer
from megatron.eval.prompts import instruct_messages


class InstructScorer:
    def __init__(self, loaded, max_new_tokens: int = 1024, reasoning: bool = False):
        self.lm, self.max_new_tokens, self.reasoning = loaded, max_new_tokens, reasoning
        eos = list(loaded.eos_token_ids)
        self.pad_id = eos[0] if eos else 0

    def prompt(self, q) -> list[int]:
        from megatron.inference.chat import chat_prompt_ids

        messages = instruct_messages(q.question, q.options, system=not self.reasoning)
        return chat_prompt_ids(self.lm.tokenizer, messages, reasoning=self.reasoning)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]]) -> list[str]:
        """Greedy replies to a left-padded batch (transformers `generate`; positions follow the attention mask),
        each cut at its first stop token."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        device = self.lm.device
        out = self.lm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=self.max_new_tokens, eos_token_id=list(self.lm.eos_token_ids),
                                     pad_token_id=self.pad_id)
        stops = set(self.lm.eos_token_ids)
        texts = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(self.lm.tokenizer.decode(row[:cut]))
        return texts

    def score(self, questions) -> list[dict]:
        texts = self.generate([self.prompt(q) for q in questions])
        records = []
        for q, text in zip(questions, texts):
            letter = parse_answer(text, reasoning=self.reasoning)
            records.append({"id": q.id, "prediction": letter, "text": text, "parsed": letter is not None,
                            "answer": q.answer,
                            "correct": None if q.answer is None else letter == q.answer})
        return records
