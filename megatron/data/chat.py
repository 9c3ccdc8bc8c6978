"""Llama-3.1 chat conversations -> token ids and SFT labels (tools/datasets/preprocess_data_with_chat_template.py).

A conversation is rendered exactly as llama-models' `ChatFormat.encode_dialog_prompt` renders a dialog, without
the empty assistant header that method appends for generation, and followed by the tokenizer's EOD so that
conversations packed into one training sample stay separable (document masks split at EOD):

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>     (once per message)
    <|end_of_text|>

Like llama-models, the role name, the "\\n\\n" and the content are encoded separately, and the content is neither
stripped nor searched for special tokens: a literal "<|eot_id|>" typed in a message is ordinary text.

Input records may be OpenAI `messages`, ShareGPT `conversations` or Llama-Nemotron post-training rows
(`parse_record`; `auto` detects the shape per record).

Labels hold the token id where the loss is taken and -100 (`IGNORE_INDEX`) elsewhere. Trained are the content
tokens of assistant messages and their closing <|eot_id|> (the model learns to end its turn); headers, system,
user and tool messages, the BOS and the final EOD are not. The trainer predicts label[i + 1] from tokens[: i + 1].

`process_chunk` runs in worker processes with the state `init_worker` set, as in `megatron.data.preprocess`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from megatron.data.preprocess import BadRecordError, _parse, records_of
from megatron.data.readers import RawChunk, Record
from megatron.data.tokenizer import Llama3Tokenizer

IGNORE_INDEX = -100
LABEL_DTYPE = np.int32

# Input role -> the name in its header. llama-models calls the tool role "tool" and renders it as "ipython".
ROLE_HEADERS = {"system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython", "tool": "ipython"}
TRAIN_ON = ("all-assistant", "last-assistant")


class ConversationError(ValueError):
    """An invalid conversation; `reason` is a short code counted in the summary, the message says what is wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_message(where: str, role: object, content: object) -> tuple[str, str]:
    if role not in ROLE_HEADERS:
        raise ConversationError("unknown_role", f"{where} has role {role!r}; expected one of "
                                                f"{', '.join(ROLE_HEADERS)}")
    if not isinstance(content, str):
        raise ConversationError("not_a_string", f"{where} ({role}) content is a {_type_name(content)}, "
                                                f"not a string")
    if not content.isascii():
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800"-style escape
            raise ConversationError("invalid_unicode", f"{where} content is not valid Unicode") from None
    return role, content


def _check_conversation(out: list[tuple[str, str]], what: str) -> list[tuple[str, str]]:
    if not out:
        raise ConversationError("empty_conversation", f"{what} is empty")
    if not any(role == "assistant" for role, _ in out):
        raise ConversationError("no_assistant_turn", f"{what} has no assistant message (nothing to train on)")
    return out


def _message_list(obj: dict, key: str) -> list:
    if key not in obj:
        raise ConversationError("missing_key", f"no key {key!r} (keys: {', '.join(map(repr, obj)) or 'none'})")
    messages = obj[key]
    if not isinstance(messages, list):
        raise ConversationError("not_a_list", f"{key!r} is a {_type_name(messages)}, not a list of messages")
    return messages


def parse_conversation(obj: dict, key: str = "messages") -> list[tuple[str, str]]:
    """The (role, content) pairs of `obj[key]` (OpenAI `messages`: {"role", "content"} objects), or
    ConversationError saying what is wrong."""
    out: list[tuple[str, str]] = []
    for i, message in enumerate(_message_list(obj, key)):
        where = f"{key}[{i}]"
        if not isinstance(message, dict):
            raise ConversationError("bad_message", f"{where} is a {_type_name(message)}, not an object")
        if message.get("tool_calls"):  # structured tool calls would be lost: llama-models renders them specially
            raise ConversationError("tool_calls", f"{where} has tool_calls, which this tool does not render; "
                                                  f"put the call in the content")
        out.append(_check_message(where, message.get("role"), message.get("content")))
    return _check_conversation(out, repr(key))


# ShareGPT speaker names (OpenHermes-2.5, SlimOrca, ...) -> roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "tool": "tool", "function_response": "tool", "observation": "tool"}


def parse_sharegpt(obj: dict, key: str = "conversations") -> list[tuple[str, str]]:
    """ShareGPT rows: `conversations` is a list of {"from": system|human|gpt|tool, "value": str}."""
    out: list[tuple[str, str]] = []
    for i, turn in enumerate(_message_list(obj, key)):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise ConversationError("bad_message", f"{where} is a {_type_name(turn)}, not an object")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise ConversationError("unknown_role", f"{where} has from {speaker!r}; expected one of "
                                                    f"{', '.join(SHAREGPT_ROLES)}")
        out.append(_check_message(where, SHAREGPT_ROLES[speaker], turn.get("value")))
    return _check_conversation(out, repr(key))


_TEMPLATE_TURN = re.compile(r"<\|start_header_id\|>([a-z]+)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)
_GENERATION_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def parse_llama3_template(text: str, where: str = "input") -> list[tuple[str, str]]:
    """A prompt already rendered in the Llama-3 chat format (Llama-Nemotron v1 `input`): its messages. A final
    generation header (an assistant header with no content) is allowed; anything else outside turns is an error."""
    rest = text[len("<|begin_of_text|>"):] if text.startswith("<|begin_of_text|>") else text
    out, position = [], 0
    for match in _TEMPLATE_TURN.finditer(rest):
        if match.start() != position:
            break
        out.append(_check_message(f"{where} turn {len(out)}", match.group(1), match.group(2)))
        position = match.end()
    tail = rest[position:]
    if tail not in ("", _GENERATION_HEADER):
        raise ConversationError("bad_template", f"{where} is a string but not Llama-3 chat turns "
                                                f"(<|start_header_id|>ROLE<|end_header_id|>\\n\\nTEXT<|eot_id|>) "
                                                f"from character {len(text) - len(tail)}: {tail[:40]!r}")
    return out


def parse_nemotron(obj: dict) -> list[tuple[str, str]]:
    """Llama-Nemotron post-training rows: `input` (a list of {"role", "content"}, or in v1 a string with the
    Llama-3 template applied), `output` (the assistant reply, `<think>...</think>` kept and trained),
    `system_prompt` ("detailed thinking on"/"off", the system turn) and `reasoning` ("on"/"off"). Without a
    system turn in `input` or a `system_prompt`, `reasoning` gives "detailed thinking {reasoning}"."""
    for k in ("input", "output"):
        if k not in obj:
            raise ConversationError("missing_key", f"no key {k!r} (keys: {', '.join(map(repr, obj)) or 'none'})")
    raw = obj["input"]
    if not raw:
        raise ConversationError("empty_conversation", "'input' is empty (no prompt)")
    if isinstance(raw, str):
        prompt = parse_llama3_template(raw, "'input'")
    elif isinstance(raw, list):
        prompt = _prompt_only(raw)
    else:
        raise ConversationError("not_a_list", f"'input' is a {_type_name(raw)}, not a message list or a string")
    output = obj["output"]
    if not isinstance(output, str):
        raise ConversationError("not_a_string", f"'output' is a {_type_name(output)}, not a string")
    if output.endswith("<|eot_id|>"):  # v1 rows close the reply with the template's end-of-turn text
        output = output[: -len("<|eot_id|>")]
    system = obj.get("system_prompt")
    if system is not None and not isinstance(system, str):
        raise ConversationError("not_a_string", f"'system_prompt' is a {_type_name(system)}, not a string")
    if not system and obj.get("reasoning") in ("on", "off"):
        system = f"detailed thinking {obj['reasoning']}"
    if system and not (prompt and prompt[0][0] == "system"):
        prompt = [("system", system), *prompt]
    return _check_conversation([*prompt, _check_message("output", "assistant", output)], "the row")


def _prompt_only(raw: list) -> list[tuple[str, str]]:
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ConversationError("bad_message", f"input[{i}] is a {_type_name(message)}, not an object")
        out.append(_check_message(f"input[{i}]", message.get("role"), message.get("content")))
    return out


FORMATS = ("auto", "openai", "sharegpt", "nemotron")
# The columns a Parquet input is read with (besides --jsonl-key).
RECORD_KEYS = ("conversations", "input", "output", "system_prompt", "reasoning")


def detect_format(obj: dict, key: str = "messages") -> str:
    if key in obj:
        return "openai"
    if "conversations" in obj:
        return "sharegpt"
    if "input" in obj and "output" in obj:
        return "nemotron"
    raise ConversationError("unknown_format", f"unknown record shape (keys: {', '.join(map(repr, obj)) or 'none'}); "
                                              f"expected {key!r} (OpenAI messages), 'conversations' (ShareGPT) or "
                                              f"'input' + 'output' (Llama-Nemotron)")


def parse_record(obj: dict, fmt: str = "auto", key: str = "messages") -> list[tuple[str, str]]:
    """The conversation of one record in format `fmt` (`auto`: detected per record)."""
    if fmt == "auto":
        fmt = detect_format(obj, key)
    if fmt == "openai":
        return parse_conversation(obj, key)
    if fmt == "sharegpt":
        return parse_sharegpt(obj, "conversations" if key == "messages" else key)
    if fmt == "nemotron":
        return parse_nemotron(obj)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


class ChatEncoder:
    """Renders conversations in the Llama-3.1 chat format with the given Llama-3 tokenizer."""

    def __init__(self, tokenizer: Llama3Tokenizer) -> None:
        if not hasattr(tokenizer, "token_to_id"):
            raise TypeError(f"the Llama-3.1 chat format needs a Llama3Tokenizer, got {tokenizer!r}")
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.token_to_id("<|begin_of_text|>")
        self.eod_id = tokenizer.token_to_id("<|end_of_text|>")
        self.eot_id = tokenizer.token_to_id("<|eot_id|>")
        start, end = tokenizer.token_to_id("<|start_header_id|>"), tokenizer.token_to_id("<|end_header_id|>")
        newlines = tokenizer.encode("\n\n")
        self.headers = {role: np.array([start, *tokenizer.encode(name), end, *newlines], dtype=np.int64)
                        for role, name in ROLE_HEADERS.items()}

    def encode(self, messages: Sequence[tuple[str, str]], train_on: str = "all-assistant", mask: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64, labels int32) of one conversation; see the module docstring. `mask=False` gives
        labels equal to the tokens everywhere."""
        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
        assistant = [i for i, (role, _) in enumerate(messages) if role == "assistant"]
        trained = set(assistant[-1:] if train_on == "last-assistant" else assistant)
        tokens = [np.array([self.bos_id], dtype=np.int64)]
        labels = [np.array([IGNORE_INDEX], dtype=np.int64)]
        for i, (role, content) in enumerate(messages):
            header = self.headers[role]
            body = np.append(self.tokenizer.encode_to_array(content).astype(np.int64), self.eot_id)
            tokens += [header, body]
            labels += [np.full(len(header), IGNORE_INDEX, np.int64),
                       body if i in trained else np.full(len(body), IGNORE_INDEX, np.int64)]
        tokens.append(np.array([self.eod_id], dtype=np.int64))
        labels.append(np.array([IGNORE_INDEX], dtype=np.int64))
        token_array = np.concatenate(tokens)
        label_array = token_array if not mask else np.concatenate(labels)
        return token_array, label_array.astype(LABEL_DTYPE)


@dataclass(frozen=True)
class ChatOptions:
    key: str = "messages"
    vocab_file: str | None = None
    train_on: str = "all-assistant"
    mask: bool = True
    skip_bad: bool = False
    format: str = "auto"


@dataclass
class ChatChunkResult:
    records: int
    tokens: np.ndarray  # the kept conversations' tokens, concatenated
    labels: np.ndarray  # their labels (int32), position for position
    lengths: np.ndarray  # tokens per conversation
    trained: int = 0  # labels other than IGNORE_INDEX
    text_bytes: int = 0
    bad: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)  # "file:line: what is wrong", the chunk's first ones


_MAX_EXAMPLES_PER_CHUNK = 100
_encoder: ChatEncoder | None = None
_options: ChatOptions | None = None


@lru_cache(maxsize=2)
def _load_encoder(vocab_file: str | None) -> ChatEncoder:
    return ChatEncoder(Llama3Tokenizer(vocab_file))  # ~0.5 s; read-only afterwards, so kept for repeated runs


def init_worker(options: ChatOptions) -> ChatEncoder:
    """Build the tokenizer and encoder for this process (forked workers inherit them)."""
    global _encoder, _options
    if options.train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {options.train_on!r}")
    _encoder = _load_encoder(options.vocab_file)
    _options = options
    return _encoder


def process_chunk(chunk: RawChunk | Sequence[Record], dtype: np.dtype) -> ChatChunkResult:
    """Parse, validate and encode the conversations of `chunk`. A bad record raises BadRecordError naming its
    file and line, or with `skip_bad` is counted and left out."""
    assert _encoder is not None and _options is not None, "init_worker() was not called"
    options, encoder = _options, _encoder
    tokens: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    result = ChatChunkResult(0, np.zeros(0, dtype), np.zeros(0, LABEL_DTYPE), np.zeros(0, np.int64))
    for record in records_of(chunk):
        result.records += 1
        obj, reason = _parse(record)
        try:
            if obj is None:
                raise ConversationError(reason, {"undecodable": "not valid UTF-8",
                                                 "malformed_json": "malformed JSON",
                                                 "not_an_object": "not a JSON object"}.get(reason, reason))
            messages = parse_record(obj, options.format, options.key)
        except ConversationError as err:
            message = f"{record.source}:{record.line}: {err}"
            if not options.skip_bad:
                raise BadRecordError(message) from None
            result.bad[err.reason] += 1
            if len(result.bad_examples) < _MAX_EXAMPLES_PER_CHUNK:
                result.bad_examples.append(message)
            continue
        ids, label_ids = encoder.encode(messages, options.train_on, options.mask)
        tokens.append(ids)
        labels.append(label_ids)
        result.trained += int(np.count_nonzero(label_ids != IGNORE_INDEX))
        result.text_bytes += sum(len(content.encode("utf-8")) for _, content in messages)
    if tokens:
        # Ids are below the vocabulary size, which chose `dtype`, so the cast cannot wrap.
        result.tokens = np.concatenate(tokens).astype(dtype, casting="unsafe")
        result.labels = np.concatenate(labels)
        result.lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    return result
