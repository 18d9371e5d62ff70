"""The dtype of a dense sweep's two large GEMMs (the tokens times every head's 1×1 weights, and its
weight gradient): bfloat16 where the hardware multiplies it natively, float32 elsewhere.

The DINOv2 bins head is GEMM-bound (B·h·w tokens × C × G·256 outputs, twice a step), and on a CPU
with AVX512-BF16 or AMX a bf16 GEMM (float32 accumulation inside the kernel) runs at 2.2× the float32
rate (benchmarks/RESULTS.md, #24). The rest of the step stays float32: the master weights and the
optimizer state, the bins' normalisation, the loss, the upsampling and every metric. It is the
mixed precision of AMP training on a GPU; the protocol record says which dtype ran.
"""

from __future__ import annotations

import torch

from featstore.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16")


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has bf16 dot-product units (AVX512-BF16 or AMX); elsewhere torch emulates a
    bf16 GEMM, several times slower than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def matmul_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA and on CPUs with bf16 units, float32 elsewhere; ``fp32`` / ``bf16``: as named."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown --precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" or (device.type == "cpu" and cpu_multiplies_bf16()):
        return torch.bfloat16
    return torch.float32
