"""Pick the device and the autocast precision."""

from __future__ import annotations

import contextlib

import torch

from gpt2tune.errors import UserError
from gpt2tune.model.cpu import cpu_has_bf16


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA GPU is available (is a CUDA build of torch installed?)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device is mps but Apple MPS is not available")
    return dev


def auto_precision(device_type: str, cpu_bf16: bool = False, cuda_bf16: bool = False) -> torch.dtype:
    """What `precision: auto` trains in: bf16 where the device computes it natively (Ampere+ GPUs,
    CPUs with AMX / AVX512-BF16), fp16 on older GPUs (with loss scaling), fp32 everywhere else."""
    if device_type == "cuda":
        return torch.bfloat16 if cuda_bf16 else torch.float16
    if device_type == "cpu" and cpu_bf16:
        return torch.bfloat16
    return torch.float32


def pick_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise UserError("train.precision fp16 needs a GPU; use bf16 or fp32 on the CPU")
        return torch.float16
    return auto_precision(device.type, cpu_bf16=device.type == "cpu" and cpu_has_bf16(),
                          cuda_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision around forward passes; weights stay fp32 (master copy)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
