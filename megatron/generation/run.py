"""What `tools/generate.py` and `python deepy.py generate.py CONFIG.yml` do once the model is loaded: build prompts
(chat or plain completion), generate, and present or write the results. Three modes, GPT-NeoX's `text_gen_type`:

  * input-file: one prompt per line of a file (a JSON object {"prompt": text} or {"messages": [...]}, or a plain
    text line) -> one JSON object per line of the output file, in input order:
      {"prompt", "messages"?, "output" (the whole reply, reasoning included), "answer" (what follows </think>, or
       the whole reply), "reasoning" (the text between <think> and </think>, or null), "tokens" (generated, the
       stop token included), "seconds" (of its batch), "stop" ("eos" | "length"), "ids" (the reply's token ids)}
    Every prompt is encoded and checked (context, vocabulary) before the first token is generated, and the file is
    written to a temporary name and renamed at the end: a bad input leaves nothing half-written. A tqdm bar shows
    progress; a tokens/s line ends the run.
  * interactive: read a prompt per line from stdin, print the reply. Chat models keep the conversation (the
    assistant's answers, without their reasoning, go back into the history); "/reset" starts a new one, "/exit" or
    end of input quits.
  * unconditional: `num_samples` samples from <|begin_of_text|> alone, written like input-file's.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from megatron.generation.chat import (
    THINK_PREFILL, PromptError, chat_prompt_ids, completion_prompt_ids, split_reasoning)
from megatron.generation.engine import Completion, Sampling, check_prompts
from megatron.generation.loading import LoadedModel


class InputFileError(ValueError):
    """A prompt file that cannot be read: the message names file and line."""


@dataclass
class Options:
    sampling: Sampling = field(default_factory=Sampling)
    chat: Optional[bool] = None  # None: the model's own (LoadedModel.chat)
    system: Optional[str] = None
    reasoning: bool = False
    hide_reasoning: bool = False
    prompt_end: str = "\n"  # GPT-NeoX: what ends a prompt in a plain-text input file
    batch_size: int = 8
    progress: bool = True


@dataclass
class Prompt:
    where: str  # "file:line", for errors
    text: Optional[str] = None
    messages: Optional[list] = None
    ids: list[int] = field(default_factory=list)


def use_chat(lm: LoadedModel, opts: Options) -> bool:
    chat = lm.chat if opts.chat is None else opts.chat
    if (opts.reasoning or opts.system is not None) and not chat:
        raise PromptError("--system and --reasoning build chat prompts; this model is a base model (plain "
                          "completion): add --chat to prompt it in the chat format anyway, or drop them")
    return chat


def read_prompts(path: str, prompt_end: str = "\n") -> list[Prompt]:
    """Prompts of an input file: JSON lines ({"prompt": ...} / {"messages": [...]}) or plain text, one prompt per
    `prompt_end`-terminated piece. Blank lines are skipped. InputFileError names file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"{path}: input file not found; check sample_input_file / --input-file") from None
    except UnicodeDecodeError as e:
        raise InputFileError(f"{path}: not UTF-8 text ({e})") from None
    pieces = text.split(prompt_end) if prompt_end != "\n" else text.splitlines()
    out, line = [], 1
    for piece in pieces:
        where = f"{path}:{line}"
        line += piece.count("\n") + (prompt_end.count("\n") if prompt_end != "\n" else 1)
        if not piece.strip():
            continue
        if piece.lstrip().startswith("{"):
            try:
                obj = json.loads(piece)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{where}: malformed JSON ({e.msg}); write one JSON object per line, or plain "
                                     "text") from None
            if isinstance(obj.get("messages"), list):
                out.append(Prompt(where, text=None, messages=obj["messages"]))
            elif isinstance(obj.get("prompt"), str):
                out.append(Prompt(where, text=obj["prompt"]))
            else:
                raise InputFileError(f"{where}: a JSON line needs \"prompt\" (a string) or \"messages\" (a list of "
                                     f"{{role, content}}); it has keys {sorted(obj)}")
        else:
            out.append(Prompt(where, text=piece))
    if not out:
        raise InputFileError(f"{path}: no prompts in the file")
    return out


def encode(lm: LoadedModel, prompt: Prompt, opts: Options, chat: bool) -> list[int]:
    try:
        if prompt.messages is not None:
            if not chat:
                raise PromptError("\"messages\" need a chat model (or --chat); this is a base model: give "
                                  "\"prompt\" text instead")
            return chat_prompt_ids(lm.tokenizer, prompt.messages, system=opts.system, reasoning=opts.reasoning)
        if chat:
            return chat_prompt_ids(lm.tokenizer, [("user", prompt.text)], system=opts.system,
                                   reasoning=opts.reasoning)
        return completion_prompt_ids(lm.tokenizer, prompt.text)
    except PromptError as e:
        raise PromptError(f"{prompt.where}: {e}") from None


def record(prompt: Prompt, c: Completion, reasoning_prefilled: bool) -> dict:
    full = (THINK_PREFILL if reasoning_prefilled else "") + c.text
    reasoning, answer = split_reasoning(c.text, prefilled=reasoning_prefilled)
    out = {"prompt": prompt.text}
    if prompt.messages is not None:
        out["messages"] = prompt.messages
    out.update({"output": full, "answer": answer, "reasoning": reasoning, "tokens": c.tokens,
                "seconds": round(c.seconds, 4), "stop": c.stop, "ids": c.ids})
    return out


def _speed_line(tokens: int, seconds: float, n: int) -> str:
    rate = tokens / seconds if seconds > 0 else float("nan")
    return f"generated {tokens} tokens for {n} prompt(s) in {seconds:.2f} s: {rate:.1f} tokens/s"


def generate_file(lm: LoadedModel, engine, prompts: list[Prompt], out_path: str, opts: Options,
                  err: TextIO = sys.stderr) -> list[dict]:
    """input-file / unconditional: every prompt encoded and checked first, then generated batch by batch under a
    tqdm bar; `out_path` written atomically."""
    from tqdm import tqdm

    chat = use_chat(lm, opts)
    for p in prompts:
        if not p.ids:
            p.ids = encode(lm, p, opts, chat)
    check_prompts(lm, [p.ids for p in prompts], [p.where for p in prompts], max_length=engine.max_length)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    records, total_tokens, start = [], 0, time.perf_counter()
    bar = tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not opts.progress, dynamic_ncols=True,
               file=err)
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for i in range(0, len(prompts), opts.batch_size):
                batch = prompts[i:i + opts.batch_size]
                for p, c in zip(batch, engine.generate([p.ids for p in batch], opts.sampling)):
                    rec = record(p, c, chat and opts.reasoning)
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    records.append(rec)
                    total_tokens += c.tokens
                bar.update(len(batch))
                bar.set_postfix_str(f"{total_tokens / (time.perf_counter() - start):.1f} tok/s", refresh=False)
        tmp.replace(out)
    finally:
        bar.close()
        if tmp.exists():
            tmp.unlink()
    print(_speed_line(total_tokens, time.perf_counter() - start, len(prompts)), file=err, flush=True)
    print(f"wrote {out}", file=err, flush=True)
    return records


def unconditional_prompts(lm: LoadedModel, n: int) -> list[Prompt]:
    bos = lm.tokenizer.bos_id
    return [Prompt(f"sample {i + 1}", text="", ids=[bos]) for i in range(n)]


def interactive(lm: LoadedModel, engine, opts: Options, inp: TextIO = sys.stdin, out: TextIO = sys.stdout,
                err: TextIO = sys.stderr) -> int:
    """Prompt after prompt from `inp`; chat models keep the conversation. Returns the number of replies."""
    chat = use_chat(lm, opts)
    history: list[tuple[str, str]] = []
    tty = inp.isatty()
    replies, tokens, seconds = 0, 0, 0.0
    if tty:
        print(f"{'chat' if chat else 'completion'} with {lm.source}; /reset forgets the conversation, /exit quits",
              file=err)
    while True:
        if tty:
            print(">>> " if chat else "prompt> ", end="", file=out, flush=True)
        line = inp.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history.clear()
            print("(conversation reset)", file=err, flush=True)
            continue
        if not text.strip():
            continue
        try:
            if chat:
                dialog = history + [("user", text)]
                ids = chat_prompt_ids(lm.tokenizer, dialog, system=opts.system, reasoning=opts.reasoning)
            else:
                ids = completion_prompt_ids(lm.tokenizer, text)
            [c] = engine.generate([ids], opts.sampling)
        except PromptError as e:  # e.g. the conversation outgrew the context: say so and go on
            print(f"error: {e}" + (" (/reset starts a new conversation)" if chat and history else ""), file=err,
                  flush=True)
            continue
        reasoning, answer = split_reasoning(c.text, prefilled=chat and opts.reasoning)
        if chat:
            history += [("user", text), ("assistant", answer if reasoning is not None else c.text)]
        shown = answer if (opts.hide_reasoning and reasoning is not None) else (
            (THINK_PREFILL if chat and opts.reasoning else "") + c.text)
        if not shown.strip() and reasoning:  # hidden reasoning that never reached </think>: say so, not a blank
            why = ("the token limit came first: raise it" if c.stop == "length" else
                   "the model ended its reply inside <think>")
            shown = (f"(no answer: {c.tokens} tokens of reasoning without </think>; {why}, or drop --hide-reasoning "
                     "to read the reasoning)")
        print(shown if chat else text + shown, file=out, flush=True)
        replies, tokens, seconds = replies + 1, tokens + c.tokens, seconds + c.seconds
    if replies:
        print(_speed_line(tokens, seconds, replies), file=err, flush=True)
    return replies


def device_default() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def open_model(path: str, opts: Options, *, device: str, dtype: Optional[str], step: Optional[int],
               chat: Optional[bool], backend: str, batch_size: int) -> tuple[LoadedModel, bool, object]:
    """Load the model, say what was loaded (on stderr), and start the engine: (model, chat prompts?, engine).
    Shared by tools/generate.py and `deepy.py generate.py`, so both load and announce a model the same way."""
    from megatron.generation.engine import make_engine
    from megatron.generation.loading import load_model

    lm = load_model(path, device=device, dtype=dtype, step=step, chat=chat, weights=backend == "hf",
                    log=lambda msg: print(msg, file=sys.stderr, flush=True))
    use = use_chat(lm, opts)
    print(f"model: {lm.source} ({lm.kind}{f', step {lm.step}' if lm.step is not None else ''}, "
          f"{'chat' if use else 'base: plain completion'}, stops at {lm.eos_token_ids})", file=sys.stderr)
    return lm, use, make_engine(lm, backend, batch_size, path, dtype=dtype)

