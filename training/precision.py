"""The autocast precision a run uses: `auto` picks bf16 only where the hardware computes it."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.errors import ConfigError

if TYPE_CHECKING:
    import torch

# CPU features with native bf16 matrix arithmetic. Without them oneDNN emulates bf16, which
# measured 10.5x slower than fp32 for ResNet-18 on a 2-core AVX2 EPYC (7.5 vs 81.5 img/s).
NATIVE_BF16_CPU = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    cuda_bf16: bool = False
    cpu_bf16: bool = False

    @classmethod
    def detect(cls, device: torch.device) -> Hardware:
        # torch only here: resolve() serves the benchmark report, which does not import it.
        import torch

        if device.type == "cuda":
            return cls(cuda=True, cuda_bf16=torch.cuda.is_bf16_supported(including_emulation=False))
        caps = torch.cpu.get_capabilities()
        return cls(cuda=False, cpu_bf16=any(caps.get(flag, False) for flag in NATIVE_BF16_CPU))


def resolve(requested: str, hw: Hardware) -> tuple[str, str | None]:
    """(the precision to train in, a warning to log or None) for `train.precision`."""
    if requested == "fp16" and not hw.cuda:
        raise ConfigError("train.precision=fp16 needs CUDA; use auto, bf16 or fp32 on a CPU")
    native_bf16 = hw.cuda_bf16 if hw.cuda else hw.cpu_bf16
    if requested == "auto":
        # CUDA without bf16 (before Ampere) still gains from fp16 with a gradient scaler.
        if native_bf16:
            return "bf16", None
        return ("fp16", None) if hw.cuda else ("fp32", None)
    if requested == "bf16" and not native_bf16:
        where = "this GPU" if hw.cuda else f"this CPU (none of {', '.join(NATIVE_BF16_CPU)})"
        return "bf16", (
            f"train.precision=bf16 is emulated on {where}, many times slower than fp32; "
            "use train.precision=auto"
        )
    return requested, None


def cuda_available() -> bool:
    """Whether torch would find a CUDA device here. Without the driver's library, which torch
    loads too, the answer is no without importing torch (3-6 s on 2 busy cores)."""
    try:
        ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
    except OSError:
        return False
    import torch

    return torch.cuda.is_available()


def check_here(requested: str) -> None:
    """Refuse, before a local run starts, a precision this machine cannot train in (the config
    model cannot: the same config may be compiled for a cluster with GPUs)."""
    if requested == "fp16":
        resolve(requested, Hardware(cuda=cuda_available()))
