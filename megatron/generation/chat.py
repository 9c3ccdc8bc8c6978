"""Prompts for generation: the Llama-3.1 chat format (token for token llama-models' `ChatFormat`), the AstroSage
reasoning switch, and splitting a reply into its reasoning and its answer.

    from megatron.generation.chat import chat_prompt_ids, split_reasoning
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "What is a quasar?"}],
                          system="You are an astronomer.")          # ends with the assistant header
    ids = chat_prompt_ids(tokenizer, messages, reasoning=True)       # + system "detailed thinking on", "<think>\\n"
    reasoning, answer = split_reasoning(reply_text)

The dialog is rendered by the same `ChatEncoder` (megatron/data/chat.py) that builds the SFT data, so generation
prompts are what the model was trained on:

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>        (once per message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                         (the turn to generate)

Reasoning mode (AstroSage, after Llama-Nemotron): the system prompt is "detailed thinking on" and the assistant
turn is prefilled with "<think>\\n"; the model writes its reasoning, "</think>", then the answer.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

REASONING_SYSTEM = "detailed thinking on"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_PREFILL = THINK_OPEN + "\n"

Message = Union[dict, tuple]


class PromptError(ValueError):
    """A prompt that cannot be built or does not fit (the message says why and what to change)."""


def _pairs(messages: Sequence[Message]) -> list[tuple[str, str]]:
    from megatron.data.chat import ROLE_HEADERS

    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else m
        if role not in ROLE_HEADERS:
            raise PromptError(f"message {i} has role {role!r}; expected one of {', '.join(ROLE_HEADERS)}")
        if not isinstance(content, str):
            raise PromptError(f"message {i} ({role}) content is a {type(content).__name__}, not a string")
        out.append((role, content))
    return out


def chat_messages(messages: Sequence[Message], *, system: Optional[str] = None,
                  reasoning: bool = False) -> list[tuple[str, str]]:
    """(role, content) pairs with the system turn the options ask for: `system` (a --system prompt) or, with
    `reasoning`, "detailed thinking on". A dialog that already opens with a system message keeps it, unless one
    of the options asks for another (then PromptError: say which one you want)."""
    pairs = _pairs(messages)
    wanted = REASONING_SYSTEM if reasoning else system
    if reasoning and system is not None and system != REASONING_SYSTEM:
        raise PromptError(f"--reasoning sets the system prompt to {REASONING_SYSTEM!r}; drop --system {system!r} "
                          "or --reasoning")
    if wanted is None:
        return pairs
    if pairs and pairs[0][0] == "system":
        if pairs[0][1] != wanted:
            raise PromptError(f"the dialog already has the system prompt {pairs[0][1]!r}; "
                              f"{'--reasoning' if reasoning else '--system'} asks for {wanted!r}: keep one")
        return pairs
    return [("system", wanted)] + pairs


def _encoder(tokenizer):
    from megatron.data.chat import ChatEncoder

    cached = getattr(tokenizer, "_chat_encoder", None)
    if cached is None:
        try:
            cached = ChatEncoder(tokenizer)
        except (TypeError, KeyError):
            raise PromptError(f"the Llama-3.1 chat format needs the Llama-3 tokenizer; this model has "
                              f"{tokenizer!r}. Use plain completion (no --chat)") from None
        tokenizer._chat_encoder = cached
    return cached


def chat_prompt_ids(tokenizer, messages: Sequence[Message], *, system: Optional[str] = None,
                    reasoning: bool = False) -> list[int]:
    """Token ids of `messages` (dicts with role/content, or (role, content) pairs) followed by the assistant
    header, exactly `ChatFormat(tokenizer).encode_dialog_prompt(messages)` of llama-models; with `reasoning`, the
    system turn is "detailed thinking on" and "<think>\\n" follows the assistant header. `tokenizer` is a
    megatron.data.tokenizer.Llama3Tokenizer (LoadedModel.tokenizer)."""
    enc = _encoder(tokenizer)
    pairs = chat_messages(messages, system=system, reasoning=reasoning)
    tokens, _ = enc.encode(pairs, mask=False)  # BOS, the messages, then the EOD a training sample ends with
    ids = [int(t) for t in tokens[:-1]] + [int(t) for t in enc.headers["assistant"]]
    if reasoning:
        ids += tokenizer.encode(THINK_PREFILL)
    return ids


def completion_prompt_ids(tokenizer, text: str, *, bos: bool = True) -> list[int]:
    """Plain-text completion (base models): BOS (when the tokenizer has one) then the text's ids."""
    ids = tokenizer.encode(text)
    return ([tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []) + ids


def split_reasoning(text: str, prefilled: bool = False) -> tuple[Optional[str], str]:
    """(reasoning, answer) of a reply. With `prefilled` the reply continues a "<think>\\n" the prompt already
    holds. A reply that opens "<think>" itself, or closes a "</think>" it never opened, also has reasoning. A
    reasoning block without "</think>" never finished: it is all reasoning (answer ""). Otherwise there is no
    reasoning (None) and the answer is the whole text."""
    body = text
    stripped = text.lstrip()
    if not prefilled and stripped.startswith(THINK_OPEN):
        body, prefilled = stripped[len(THINK_OPEN):], True
    if THINK_CLOSE not in body:
        return (body.strip("\n"), "") if prefilled else (None, text)
    reasoning, answer = body.split(THINK_CLOSE, 1)
    return reasoning.strip("\n"), answer.lstrip()
