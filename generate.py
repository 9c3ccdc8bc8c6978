"""Generation entry point, as GPT-NeoX's:  python deepy.py generate.py CONFIG.yml [MORE.yml ...]

deepy.py merges and validates the configs with the generation rules (megatron/config/validate.py,
`check_generation`), writes RUN_DIR/config.yml and starts this script once (one process; on a GPU node the model
spreads over all GPUs when accelerate is installed). The model is `load`: a checkpoint folder of this trainer (any
TP/PP; `load_iteration` picks a step) or a Hugging Face folder. Keys: text_gen_type (input-file | interactive |
unconditional), sample_input_file, sample_output_file, num_samples, maximum_tokens, prompt_end, temperature, top_p,
top_k, recompute, and this project's generation_chat, generation_system_prompt, generation_reasoning,
hide_reasoning, generation_batch_size, generation_backend, generation_seed (configs/README.md).
The same work as `tools/generate.py`, which takes command-line flags instead of a config.
"""

import os
import sys
import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megatron.config.loader import single_process_entry  # noqa: E402


def device_for_node() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if torch.cuda.device_count() > 1:
        try:
            import accelerate  # noqa: F401

            return "auto"
        except ImportError:
            pass
    return "cuda"


def main() -> int:
    cfg, run_dir = single_process_entry(__doc__, "generate", "nothing was generated")
    if cfg is None:
        return 2

    from megatron.generation.chat import PromptError
    from megatron.generation.engine import Sampling
    from megatron.generation.loading import ModelLoadError
    from megatron.generation.run import (
        InputFileError, Options, generate_file, interactive, open_model, read_prompts, unconditional_prompts)

    opts = Options(sampling=Sampling(max_new_tokens=cfg.maximum_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.generation_seed,
                                     use_cache=not cfg.recompute),
                   chat=cfg.generation_chat, system=cfg.generation_system_prompt, reasoning=cfg.generation_reasoning,
                   hide_reasoning=cfg.hide_reasoning, prompt_end=cfg.prompt_end,
                   batch_size=cfg.generation_batch_size)
    out = cfg.sample_output_file or os.path.join(run_dir, "generations.jsonl")
    try:
        prompts = read_prompts(cfg.sample_input_file, cfg.prompt_end) if cfg.text_gen_type == "input-file" else None
        lm, chat, engine = open_model(cfg.load, opts, device=device_for_node(), dtype=cfg.precision,
                                      step=cfg.load_iteration, chat=cfg.generation_chat,
                                      backend=cfg.generation_backend, batch_size=cfg.generation_batch_size)
        if cfg.text_gen_type == "interactive":
            interactive(lm, engine, opts)
        else:
            if prompts is None:
                prompts = unconditional_prompts(lm, cfg.num_samples)
            generate_file(lm, engine, prompts, out, opts)
    except (ModelLoadError, PromptError, InputFileError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as e:  # the vLLM backend without vLLM or a GPU
        if "vLLM" not in str(e):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
