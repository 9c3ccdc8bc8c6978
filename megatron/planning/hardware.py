"""The devices a plan is for: memory, bf16 peak, GPUs per node, and what a device holds beyond the allocated peak."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    memory_gib: float  # what the device reports as total memory
    peak_tflops: float  # dense bf16 peak
    per_node: int  # GPUs (GCDs) per node: tensor parallelism stays inside a node


GPUS: dict[str, GPU] = {
    # One MI250X module is two GCDs; each GCD is a separate device with 64 GiB HBM2e and 191.5 dense bf16 TFLOP/s.
    # Frontier nodes hold 4 modules = 8 GCDs (the AstroSage run: 256 nodes x 8 = 2,048 GCDs).
    "mi250x": GPU("mi250x", "AMD MI250X GCD", 64.0, 191.5, 8),
    "a100-80g": GPU("a100-80g", "NVIDIA A100 80GB", 80.0, 312.0, 8),
    # nvidia-smi reports 81,559 MiB for the H100 SXM and 143,771 MiB for the H200.
    "h100": GPU("h100", "NVIDIA H100 80GB SXM", 81559 / 1024, 989.0, 8),
    "h200": GPU("h200", "NVIDIA H200 141GB", 143771 / 1024, 989.0, 8),
}
DEFAULT_GPU = "h100"

# Assumed share of the bf16 peak a GPU sustains while it computes: outside the pipeline bubble, with activation
# recomputation counted as work. Anchors: Megatron-core 54-62% MFU for Llama-3.1 on H100, torchtitan 33-39%; the
# AstroSage run's ~50 TFLOP/s per MI250X GCD end to end (26% MFU) is ~52% while computing once its bubble (30% at
# 16 micro-batches, PP 8), its last stage's extra output layer (x1.045 on the step) and recomputation (x1.33) are
# taken out. 40% is a middle assumption; --tflops or --mfu replaces it.
DEFAULT_MFU = 0.40

# What a device holds beyond PyTorch's caching allocator, and the allocator's own slack. The planner predicts the
# allocated peak (torch.cuda.max_memory_allocated) from the code; to decide whether a layout *fits* it adds
#  - FRAGMENTATION: the caching allocator rounds blocks and keeps freed blocks cached, so it reserves more than
#    the allocated peak. Measured on one H100 for six runs of this trainer: reserved/allocated 1.02-1.09 (the most
#    with the compiled kernels). 10% is assumed.
#  - CONTEXT_GIB: memory outside the allocator: the CUDA context with its kernels, cuBLAS/cuDNN workspaces and
#    NCCL buffers. Measured on the same runs (device used minus reserved): 2.1-2.4 GiB with a one-rank NCCL group.
#    Multi-rank communicators (TP, PP, DP groups) add NCCL buffers of a few MiB per channel and peer, so 3 GiB is
#    assumed. ROCm on MI250X is not measured here; the same figure is used.
# Together they overestimate the measured device memory by 2-9%: a fit verdict errs on the safe side.
CONTEXT_GIB = 3.0
FRAGMENTATION = 0.10


def device_bytes(allocated_peak: float) -> float:
    return allocated_peak * (1 + FRAGMENTATION) + CONTEXT_GIB * GIB
