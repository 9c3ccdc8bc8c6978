"""The next-token method (appendices C and section V.C): one forward pass per question, the answer is the letter
whose token has the highest logit at the position after "Answer:".

Everything here works on token ids and a `candidate_logits(batch of id lists, ids) -> ([B, len(ids)] logits at
those ids, [B] log-sum-exp over the whole vocabulary)` function at each prompt's last position, so the same code
scores an HF model (`hf_candidate_logits`: the standalone tool) and the training model at any TP/PP
(megatron/eval/in_training.py, where the full logits are never gathered): the two cannot drift apart.

Letter spelling. A tokenizer may spell the answer "A" or " A" (Llama-3: "Answer: B" is "Answer", ":", " B"). As
the paper does, the spelling is found per model rather than assumed: the prompts built from the shots alone (the
header + shot 1 asked, and the header + shot 1 solved + shot 2 asked, whose answers are known to be letters) are
run, and the spelling whose four tokens hold more softmax probability summed over them is used for every question.
It is recorded in the run's summary with both masses.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from megatron.eval.prompts import LETTERS, next_token_prompt

SPELLINGS = {"letter": tuple(LETTERS), "space-letter": tuple(" " + x for x in LETTERS)}
CandidateLogits = Callable[[list[list[int]], list[int]], tuple[torch.Tensor, torch.Tensor]]


def letter_token_ids(tokenizer) -> dict[str, list[int]]:
    """{spelling: [id of A, B, C, D]} for the spellings the tokenizer encodes as single tokens."""
    out = {}
    for name, texts in SPELLINGS.items():
        ids = [tokenizer.encode(t) for t in texts]
        if all(len(i) == 1 for i in ids):
            out[name] = [i[0] for i in ids]
    if not out:
        raise ValueError("the tokenizer has no single-token spelling of the letters A-D ('A' or ' A'); the "
                         "next-token method cannot read an answer from this model")
    return out


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """Base model: BOS + the prompt. Instruct model (instruct-next-token): the prompt is the whole user turn of a
    Llama-3.1 chat, followed by the assistant header, so the letter is the first token of the assistant's reply."""
    if chat:
        from megatron.generation.chat import chat_prompt_ids

        return chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    bos = getattr(tokenizer, "bos_id", None)
    return ([bos] if bos is not None else []) + list(tokenizer.encode(text))


def probe_prompts(shots: Sequence[tuple]) -> list[str]:
    """The prompts whose answers are the shots' own: shot 1 asked cold, then shot 2 asked after shot 1 solved."""
    return [next_token_prompt(q, o, shots[:i]) for i, (q, o, _) in enumerate(shots[:2])]


def choose_spelling(candidate_logits: CandidateLogits, tokenizer, shots, chat: bool) -> tuple[str, dict]:
    candidates = letter_token_ids(tokenizer)
    names = list(candidates)
    flat = [i for name in names for i in candidates[name]]
    logits, lse = candidate_logits([prompt_ids(tokenizer, p, chat) for p in probe_prompts(shots)], flat)
    probs = (logits.float() - lse.float()[:, None]).exp()
    masses = {name: float(probs[:, 4 * k:4 * k + 4].sum()) for k, name in enumerate(names)}
    return max(masses, key=lambda k: masses[k]), masses


def letter_scores(four: torch.Tensor) -> tuple[list[str], list[list[float]]]:
    """Per row of the four letters' logits: the predicted letter (the highest; a tie goes to the earlier letter)
    and the four letters' probabilities renormalised over the four."""
    four = four.float()
    probs = torch.softmax(four, dim=-1)
    return [LETTERS[int(i)] for i in four.argmax(dim=-1)], probs.tolist()


def common_prefix_length(batch: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own."""
    n = min(len(x) for x in batch) - 1
    first = batch[0]
    for row in batch[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


# Below this many shared tokens the prefix pass is not worth its own forward.
MIN_SHARED_PREFIX = 16


def hf_candidate_logits(model, pad_id: int = 0, share_prefix: bool = True) -> CandidateLogits:
    """candidate_logits for a transformers causal LM: right-padded batch (a causal model's real positions never
    see the padding, and positions stay 0..len-1), the final norm's output gathered at each row's last real token,
    and only those rows through the LM head (a [B, T, 128256] logits tensor would dwarf the model on long
    prompts).

    Every prompt of a run starts with the same header and two shots (about 300 of ~370 tokens on Astrobench), so
    with `share_prefix` the tokens a batch's rows share are run once, their KV cache (transformers' DynamicCache,
    kept while the next batch shares the same prefix) is repeated over the batch, and only each question's own
    tokens go through the model. The logits are those of the full forward up to float rounding (tested); a causal
    model's positions after the prefix see exactly the prefix's keys and values either way."""
    import copy
    import inspect

    from transformers import DynamicCache

    device = next(model.parameters()).device
    body, head = model.get_decoder(), model.get_output_embeddings()  # LlamaForCausalLM: .model, .lm_head
    kept: dict = {}  # {"ids": shared prefix ids, "cache": its DynamicCache (batch 1)}
    # transformers 5.x names the argument `cache` (`past_key_values` is deprecated there); 4.x knows only the latter.
    cache_arg = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"

    def right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lens = torch.tensor([len(x) for x in rows])
        tokens = torch.full((len(rows), int(lens.max())), pad_id, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for i, x in enumerate(rows):
            tokens[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        return tokens.to(device), mask.to(device), lens

    @torch.inference_mode()
    def candidate_logits(batch: list[list[int]], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        shared = common_prefix_length(batch) if share_prefix else 0
        if shared < MIN_SHARED_PREFIX:
            tokens, mask, lens = right_padded(batch)
            hidden = body(input_ids=tokens, attention_mask=mask).last_hidden_state
        else:
            prefix = batch[0][:shared]
            if kept.get("ids") != prefix:
                cache = DynamicCache()
                body(input_ids=torch.tensor([prefix], device=device), use_cache=True, **{cache_arg: cache})
                kept.update(ids=prefix, cache=cache)
            cache = copy.deepcopy(kept["cache"])  # the forward below appends the questions' keys and values to it
            cache.batch_repeat_interleave(len(batch))
            tokens, mask, lens = right_padded([x[shared:] for x in batch])
            mask = torch.cat([torch.ones(len(batch), shared, dtype=mask.dtype, device=device), mask], dim=1)
            positions = torch.arange(shared, shared + tokens.shape[1], device=device).expand(len(batch), -1)
            hidden = body(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{cache_arg: cache}).last_hidden_state
        last = hidden[torch.arange(len(batch), device=device), (lens - 1).to(device)]
        logits = head(last).float()
        return logits[:, ids].cpu(), logits.logsumexp(dim=-1).cpu()

    return candidate_logits


class NextTokenScorer:
    """Scores questions with the next-token method: `score(questions)` -> one record per question."""

    def __init__(self, tokenizer, candidate_logits: CandidateLogits, shot_pool, chat: bool = False,
                 spelling: Optional[str] = None):
        self.tokenizer, self.candidate_logits, self.chat = tokenizer, candidate_logits, chat
        self.shot_pool = list(shot_pool)
        self.candidates = letter_token_ids(tokenizer)
        self.masses = None
        if spelling is None:
            spelling, self.masses = choose_spelling(candidate_logits, tokenizer, self.shots_for(None), chat)
        self.spelling = spelling
        self.ids = self.candidates[spelling]

    def shots_for(self, question) -> list[tuple]:
        from megatron.eval.shots import shots_for

        return shots_for(self.shot_pool, question)

    def prompt(self, q) -> list[int]:
        text = next_token_prompt(q.question, q.options, self.shots_for(q))
        return prompt_ids(self.tokenizer, text, self.chat)

    def score(self, questions) -> list[dict]:
        preds, probs = letter_scores(self.candidate_logits([self.prompt(q) for q in questions], self.ids)[0])
        return [{"id": q.id, "prediction": p, "probs": dict(zip(LETTERS, [round(x, 6) for x in pr])),
                 "answer": q.answer, "correct": None if q.answer is None else p == q.answer}
                for q, p, pr in zip(questions, preds, probs)]
