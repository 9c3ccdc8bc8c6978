"""Tokenizers behind one small interface: Llama-3 (tiktoken), Hugging Face `tokenizer.json`, SentencePiece.

Every tokenizer encodes *plain text only*: strings that look like special tokens (e.g. "<|eot_id|>" inside a
web page) are encoded as ordinary text, so untrusted corpora cannot inject control tokens. Callers add BOS/EOD
ids explicitly.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import numpy as np

# tiktoken's Rust core panics on inputs above ~400k characters and on very long runs of whitespace or
# non-whitespace (openai/tiktoken#195). We cut text the same way Meta's reference tokenizer does, so ids are
# identical to llama_models' Tokenizer even for huge documents.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_CONSECUTIVE_RUN_CHARS = 25_000

LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256

# Names of Llama-3.1's 256 special tokens, in id order starting at 128000 (as in Meta's tokenizer_config).
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED_SPECIALS + [
    f"<|reserved_special_token_{i}|>"
    for i in range(3, 3 + LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - len(_LLAMA3_NAMED_SPECIALS))
]

# A run that must be cut: starts where the previous character is of the other class (the lookbehinds make the
# search linear: a match is only attempted at the start of a run) and is longer than the limit.
_LONG_RUN = re.compile(
    rf"(?<!\S)\S{{{MAX_CONSECUTIVE_RUN_CHARS + 1}}}|(?<!\s)\s{{{MAX_CONSECUTIVE_RUN_CHARS + 1}}}"
)
_NON_SPACE_RUN = re.compile(r"\S*")
_SPACE_RUN = re.compile(r"\s*")


_BLOCK = MAX_CONSECUTIVE_RUN_CHARS // 2


def may_have_long_run(chunk: str) -> bool:
    """False when `chunk` certainly has no run of more than 25k whitespace or non-whitespace characters.

    Such a run contains a whole aligned block of 12.5k characters, so it suffices that every whole block holds
    both kinds of character. Each block costs one or two `str.find`s (memchr speed) plus an `isspace()` that
    stops at the first non-space, instead of a Python regex visiting every character (which cost ~10% of
    encoding on the demo corpus, a quarter of whose text is in documents above 25k characters). True means
    "look closer": the exact regex then decides.
    """
    if len(chunk) <= MAX_CONSECUTIVE_RUN_CHARS:
        return False
    for start in range(0, len(chunk) - _BLOCK + 1, _BLOCK):
        end = start + _BLOCK
        if chunk.find(" ", start, end) < 0 and chunk.find("\n", start, end) < 0:
            return True  # perhaps no whitespace at all in the block
        if chunk[start:end].isspace():
            return True
    return False


def split_for_tiktoken(text: str) -> Iterator[str]:
    """Yield pieces of `text` that tiktoken can encode safely, cut exactly where Meta's reference cuts.

    The text is cut every 400k characters; inside each chunk, a run of more than 25k whitespace (or
    non-whitespace) characters is cut every 25k characters from the start of the run.
    """
    for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = text[start : start + TIKTOKEN_MAX_ENCODE_CHARS] if len(text) > TIKTOKEN_MAX_ENCODE_CHARS else text
        if not may_have_long_run(chunk):
            yield chunk
            continue
        piece_start = 0
        for match in _LONG_RUN.finditer(chunk):
            run_start = match.start()
            run_re = _SPACE_RUN if chunk[run_start].isspace() else _NON_SPACE_RUN
            run_end = run_re.match(chunk, run_start).end()
            for cut in range(run_start + MAX_CONSECUTIVE_RUN_CHARS, run_end, MAX_CONSECUTIVE_RUN_CHARS):
                yield chunk[piece_start:cut]
                piece_start = cut
        yield chunk[piece_start:]


class Tokenizer(ABC):
    """What the data pipeline and trainer need from a tokenizer."""

    name: str
    vocab_size: int
    bos_id: int
    eod_id: int
    pad_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOD."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (invalid UTF-8 byte sequences become U+FFFD)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_to_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as a 1-D integer array (same ids as `encode`); preprocessing packs these."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


def default_llama3_tokenizer_path() -> str:
    """The Llama-3 BPE ranks file shipped inside the llama-models wheel (no download needed)."""
    import llama_models

    return os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")


_NOTHING: frozenset[str] = frozenset()


class Llama3Tokenizer(Tokenizer):
    """Llama-3 / 3.1 tokenizer: tiktoken BPE with 128000 regular tokens and 256 special tokens."""

    def __init__(self, vocab_file: str | None = None) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = vocab_file or default_llama3_tokenizer_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Llama-3 tokenizer file not found: {path}")
        ranks = load_tiktoken_bpe(path)
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._encoding = tiktoken.Encoding(
            name=os.path.basename(path),
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.name = "Llama3Tokenizer"
        self.vocab_size = len(ranks) + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eod_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]

    # Plain document text goes through encode_ordinary: `encode` would first check the text for the 256
    # special-token strings (a Python regex scan, then an error if one is found) and, with allowed_special, turn
    # them into control ids; here such strings are ordinary text by design (see the module docstring).
    def encode(self, text: str) -> list[int]:
        if len(text) <= TIKTOKEN_MAX_ENCODE_CHARS and not may_have_long_run(text):  # common case: nothing to cut
            return self._encoding.encode_ordinary(text)
        ids: list[int] = []
        for piece in split_for_tiktoken(text):
            ids.extend(self._encoding.encode_ordinary(piece))
        return ids

    def encode_to_array(self, text: str) -> np.ndarray:
        """`encode(text)` as a uint32 array, without building a Python list of ints (~10% faster than
        `encode`). tiktoken's encode_to_numpy with nothing allowed and nothing disallowed runs the same BPE as
        encode_ordinary (its special-token search finds no *allowed* token, so the whole text is ordinary);
        tests check the ids are identical."""
        if len(text) <= TIKTOKEN_MAX_ENCODE_CHARS and not may_have_long_run(text):
            return self._encode_piece_to_array(text)
        pieces = [self._encode_piece_to_array(piece) for piece in split_for_tiktoken(text)]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.uint32)

    def _encode_piece_to_array(self, piece: str) -> np.ndarray:
        if hasattr(self._encoding, "encode_to_numpy"):  # tiktoken >= 0.8
            return self._encoding.encode_to_numpy(piece, allowed_special=_NOTHING, disallowed_special=())
        return np.asarray(self._encoding.encode_ordinary(piece), dtype=np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # tiktoken encodes a batch on native threads without the GIL; cut long texts first, then regroup.
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            for piece in split_for_tiktoken(text):
                pieces.append(piece)
                owners.append(i)
        out: list[list[int]] = [[] for _ in texts]
        for owner, ids in zip(owners, self._encoding.encode_ordinary_batch(pieces)):
            out[owner].extend(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int:
        """Id of a special token by name, e.g. "<|eot_id|>"."""
        return self.special_tokens[token]


def _first_present(vocab: dict[str, int], candidates: Sequence[str]) -> int | None:
    return next((vocab[c] for c in candidates if c in vocab), None)


_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
_EOD_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "[SEP]")
_PAD_NAMES = ("<|finetune_right_pad_id|>", "<pad>", "<|padding|>", "[PAD]")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` loaded with the `tokenizers` library."""

    def __init__(self, vocab_file: str) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"HF tokenizer file not found: {vocab_file}")
        self._tok = _HFTokenizer.from_file(vocab_file)
        # add_special_tokens=False only stops the post-processor adding BOS/EOS: the `tokenizers` library still
        # matches added tokens inside the text, so "<|endoftext|>" in a document would become the EOD id.
        # encode_special_tokens (tokenizers >= 0.15) encodes that text like any other.
        self._tok.encode_special_tokens = True
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.name = "HFTokenizer"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eod = _first_present(vocab, _EOD_NAMES)
        if eod is None:
            raise ValueError(f"{vocab_file}: no end-of-document token (looked for {', '.join(_EOD_NAMES)})")
        self.eod_id = eod
        bos = _first_present(vocab, _BOS_NAMES)
        self.bos_id = eod if bos is None else bos  # GPT-2 style vocabularies use <|endoftext|> for both
        pad = _first_present(vocab, _PAD_NAMES)
        self.pad_id = eod if pad is None else pad

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SPMTokenizer(Tokenizer):
    """A SentencePiece model file."""

    def __init__(self, vocab_file: str) -> None:
        import sentencepiece

        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"SentencePiece model file not found: {vocab_file}")
        self._sp = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
        self.name = "SPMTokenizer"
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ValueError(f"{vocab_file}: the SentencePiece model has no EOS piece")
        self.eod_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eod_id
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


TOKENIZER_TYPES = ("Llama3Tokenizer", "HFTokenizer", "SPMTokenizer")


def build_tokenizer(tokenizer_type: str = "Llama3Tokenizer", vocab_file: str | None = None) -> Tokenizer:
    """Build a tokenizer by type name; `vocab_file` is optional only for Llama3Tokenizer."""
    if tokenizer_type == "Llama3Tokenizer":
        return Llama3Tokenizer(vocab_file)
    if tokenizer_type in ("HFTokenizer", "SPMTokenizer"):
        if vocab_file is None:
            raise ValueError(f"{tokenizer_type} needs a vocab_file")
        return HFTokenizer(vocab_file) if tokenizer_type == "HFTokenizer" else SPMTokenizer(vocab_file)
    raise ValueError(f"unknown tokenizer_type {tokenizer_type!r}; valid types: {', '.join(TOKENIZER_TYPES)}")
