"""The DeepSpeed JSON, derived from the validated config in one place."""

from __future__ import annotations

from typing import Any

from megatron.config.schema import NeoXConfig


def deepspeed_config(cfg: NeoXConfig, dp: int, precision: str) -> dict[str, Any]:
    bf16 = precision == "bf16"
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps * dp,
        "train_micro_batch_size_per_gpu": cfg.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.gradient_clipping,
        "zero_optimization": cfg.zero_optimization.model_dump(),
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,  # this trainer logs; silence DeepSpeed's own step prints
        # Per-phase timers (forward, backward, optimizer, pipeline send/recv) the trainer reads when asked to;
        # they synchronise the device, so they are off unless log_phase_times is on.
        "wall_clock_breakdown": cfg.log_phase_times,
        "activation_checkpointing": {
            "partition_activations": cfg.partition_activations,
            "contiguous_memory_optimization": False,
            "cpu_checkpointing": False,
            "number_checkpoints": cfg.num_layers,
            "synchronize_checkpoint_boundary": False,
            "profile": False,
        },
    }
    if bf16:
        # Accumulate gradients over micro-batches in fp32 (a bf16 accumulator loses small updates), and all-reduce
        # them in the same dtype: DeepSpeed would otherwise cast the fp32 sums to bf16 for the data-parallel
        # reduction (twice the bytes on the wire, as Megatron does by default).
        ds["data_types"] = {"grad_accum_dtype": cfg.data_types.grad_accum_dtype}
        ds["communication_data_type"] = cfg.data_types.grad_accum_dtype
    return ds
