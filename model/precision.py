"""Where bf16 pays: one answer for training, classification and benchmarks.

bf16 autocast is fast only where the hardware multiplies bf16 natively: Intel AMX or AVX512-BF16 on
CPUs (on the 2-core Xeon with AMX a bf16 matrix product is ~6× a float32 one, LIBS.md) and CUDA
GPUs that support it. Elsewhere torch emulates bf16 and it is far slower than float32: on a 2-core
AMD EPYC with AVX2 only, a default-preset training step under bf16 autocast + compile took 128 s
against ~3 s in float32 (2026-12-04).
"""
from __future__ import annotations

import torch


def bf16_pays(device: torch.device | str = "cpu") -> bool:
    """True where bf16 autocast is faster than float32 on `device` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return bool(amx or avx512_bf16)
    return False
