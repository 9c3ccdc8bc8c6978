"""Run planning from the config alone: parameters, per-GPU memory by pipeline stage, bubble, FLOPs and time.

A pure model (no GPU, no process group) of how *this* trainer spends memory: DeepSpeed 0.19.8's pipeline engine
and its bf16 optimizer, megatron-core's tensor-parallel layers and vocab-parallel loss, and the layers in
`megatron/model/layers.py`. Every term names the code that allocates it; docs/planning.md explains the model and
tests/test_plan.py checks it (parameter counts against Hugging Face, activations against autograd's saved
tensors, peaks against `benchmarks/results/memory_measurements.json`).

The modules, in the order a plan is built:
  hardware  the GPUs (memory, peak, per node) and what a device holds beyond the allocated peak
  shape     the architecture numbers: parameters, FLOPs per token
  layout    TP x PP x DP, micro-batch, checkpointing, and which layers each pipeline stage builds
  memory    per-stage memory: states, activations, working memory, pipe and all-reduce buffers
  plan      a Plan (memory + the 1F1B step time) for a config's layout or a changed one
  search    the closest layouts that fit
  report    the printed table (tools/plan.py)
  loading, records   config files read for planning; the GPU measurements the model is held to

Units: bytes inside, GiB (2**30) in every printed figure. `from megatron import planning` gives the names below.
"""

from megatron.planning.hardware import (CONTEXT_GIB, DEFAULT_GPU, DEFAULT_MFU, FRAGMENTATION, GIB, GPU, GPUS,
                                        device_bytes)
from megatron.planning.layout import Layout, layout_of, stage_items
from megatron.planning.loading import PLACEHOLDER_DATA, Loaded, config_world_size, load_for_planning
from megatron.planning.memory import (ALLREDUCE_BUCKET, Precision, StageMemory, allreduce_bytes,
                                      backward_working_bytes, fp8_working_bytes, layer_activation_bytes,
                                      loss_peak_bytes, plan_memory, precision_of, selective_kept_bytes)
from megatron.planning.plan import (FP8_GEMM_SPEEDUP, FP8_MATMUL_SHARE, Plan, alternative_layout,
                                    configured_global_batch, fp8_time_factor, layout_problems, make_plan,
                                    predict_peak_gib)
from megatron.planning.records import (MEMORY_RECORDS, append_memory_records, code_version, config_from_keys,
                                       recorded_keys)
from megatron.planning.report import _duration, format_plan
from megatron.planning.search import MAX_SEARCH_GPUS, candidate_layouts, distance, suggest
from megatron.planning.shape import LLAMA3_VOCAB, Shape, flops_per_token, shape_of

__all__ = ["CONTEXT_GIB", "DEFAULT_GPU", "DEFAULT_MFU", "FRAGMENTATION", "GIB", "GPU", "GPUS", "device_bytes",
           "Layout", "layout_of", "stage_items", "PLACEHOLDER_DATA", "Loaded", "config_world_size",
           "load_for_planning", "ALLREDUCE_BUCKET", "Precision", "StageMemory", "allreduce_bytes",
           "backward_working_bytes", "fp8_working_bytes", "layer_activation_bytes", "loss_peak_bytes", "plan_memory",
           "precision_of", "selective_kept_bytes", "FP8_GEMM_SPEEDUP", "FP8_MATMUL_SHARE", "Plan",
           "alternative_layout", "configured_global_batch", "fp8_time_factor", "layout_problems", "make_plan",
           "predict_peak_gib", "MEMORY_RECORDS", "append_memory_records", "code_version", "config_from_keys",
           "recorded_keys", "_duration", "format_plan", "MAX_SEARCH_GPUS", "candidate_layouts", "distance",
           "suggest", "LLAMA3_VOCAB", "Shape", "flops_per_token", "shape_of"]
