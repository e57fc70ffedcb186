"""Which float type a model computes in: bf16 where the hardware does it natively and the model is
large enough to gain from it, fp32 otherwise."""

from __future__ import annotations

from functools import cache
from pathlib import Path

# Below this hidden size (tiny-chat has 128) the casts around bf16 kernels cost more than they save.
BF16_MIN_HIDDEN_SIZE = 512


@cache
def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run ~2x faster than fp32 (elsewhere they are emulated)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def prefer_bf16(hidden_size: int, *, on_gpu: bool | None = None) -> bool:
    """bf16 on a GPU, and on a CPU that computes it natively for large enough models. ``on_gpu``:
    whether the model runs on a GPU (default: whether torch sees one)."""
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    return on_gpu or (hidden_size >= BF16_MIN_HIDDEN_SIZE and cpu_has_native_bf16())
