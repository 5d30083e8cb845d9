"""train.precision=auto: bf16 only where the hardware computes it natively."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.errors import ConfigError
from training.precision import NATIVE_BF16_CPU, Hardware, check_here, cuda_available, resolve

AVX2_CPU = Hardware(cuda=False)
BF16_CPU = Hardware(cuda=False, cpu_bf16=True)
AMPERE = Hardware(cuda=True, cuda_bf16=True)
VOLTA = Hardware(cuda=True)


@pytest.mark.parametrize(
    ("hw", "expected"), [(AVX2_CPU, "fp32"), (BF16_CPU, "bf16"), (AMPERE, "bf16"), (VOLTA, "fp16")]
)
def test_auto_picks_the_fastest_native_precision(hw: Hardware, expected: str) -> None:
    assert resolve("auto", hw) == (expected, None)


def test_an_explicit_choice_is_kept_and_emulated_bf16_is_warned_about() -> None:
    assert resolve("fp32", BF16_CPU) == ("fp32", None)
    assert resolve("bf16", BF16_CPU) == ("bf16", None)
    precision, warning = resolve("bf16", AVX2_CPU)
    assert precision == "bf16"
    assert warning is not None and "emulated" in warning and "train.precision=auto" in warning


def test_fp16_on_a_cpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve("fp16", BF16_CPU)


def test_detection_agrees_with_the_kernel_cpu_flags() -> None:
    flags = set(Path("/proc/cpuinfo").read_text().split())  # Linux, as the project's machines
    detected = Hardware.detect(torch.device("cpu"))
    assert detected == Hardware(cuda=False, cpu_bf16=bool(flags & set(NATIVE_BF16_CPU)))


def test_a_local_run_refuses_fp16_up_front_only_without_cuda() -> None:
    # The check before a run answers as the trainer's torch will, without importing torch.
    assert cuda_available() == torch.cuda.is_available()
    for precision in ("auto", "fp32", "bf16"):
        check_here(precision)
    if torch.cuda.is_available():
        check_here("fp16")
    else:
        with pytest.raises(ConfigError, match="fp16 needs CUDA"):
            check_here("fp16")
