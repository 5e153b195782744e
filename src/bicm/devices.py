"""Devices and precision: which device the models run on and in which dtypes.

Holds :func:`resolve_device` (``"auto"`` -> cuda or cpu), :func:`resolve_amp` (the autocast
dtype of the encoders), :func:`resolve_precision` (the weight dtype of the no-gradient image
tower, with ``"auto"`` deciding by the hardware), :func:`cpu_has_fast_bf16` and
:func:`dtype_name`. Every refusal is a one-line :class:`~bicm.errors.BicmError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .errors import BicmError

__all__ = [
    "PRECISIONS",
    "cpu_has_fast_bf16",
    "dtype_name",
    "resolve_amp",
    "resolve_device",
    "resolve_precision",
]


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``"auto"``/``None`` -> cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BicmError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BicmError("device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def _half_dtype(name: Optional[str], device: torch.device, kind: str, choices: str) -> Optional[torch.dtype]:
    """``None``/"none"/"fp32" -> None (fp32); "bf16", "fp16" (CUDA only) -> the dtype.
    ``kind`` names the setting in errors ("autocast", "weights")."""
    if name in (None, "none", "fp32"):
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        if device.type != "cuda":
            raise BicmError(f"fp16 ({kind}) needs a CUDA device; on CPU use fp32 or bf16")
        return torch.float16
    raise BicmError(f"unknown {kind} precision {name!r}; use {choices}")


def resolve_amp(amp: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``amp`` in (None, "none", "bf16", "fp16")."""
    return _half_dtype(amp, device, "autocast", "none, bf16 or fp16")


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """``torch.bfloat16`` -> ``"bf16"``; ``None`` / float32 -> ``"fp32"``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX-512 BF16).

    Without them PyTorch emulates bf16 GEMMs, far slower than fp32 (see benchmarks/README.md,
    ``bench_pipeline.py``), so ``"auto"`` keeps fp32 there.
    """
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except Exception:  # a private torch API: treat failure as "no"
                pass
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """Weight dtype of the image encoder for crops and whole images (``None`` = fp32).

    ``"auto"``: bf16 on a CUDA GPU that supports it and on CPUs with native bf16 matrix units
    (:func:`cpu_has_fast_bf16`), else fp32. ``"fp16"`` needs CUDA.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None
    return _half_dtype(precision, device, "weights", ", ".join(PRECISIONS))
