"""Where a run computes: `--device auto|cpu|cuda`, and the only place that branches on it.

On CUDA, forward passes run under bf16 autocast (weights and optimizer state stay fp32) and
`--compile` wraps the model in `torch.compile`; on CPU everything is plain float32 (bf16 autocast
measured slower on CPU). The rest of the code calls `autocast(device)` and never asks which
device it is on.
"""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model, device: torch.device, enabled: bool):
    """torch.compile on CUDA when asked; returns the model unchanged otherwise."""
    if enabled and device.type == "cuda":
        return torch.compile(model)
    return model


def generator(device: torch.device, seed: int) -> torch.Generator:
    """An explicit generator on the device that samples, so sampling is reproducible."""
    return torch.Generator(device=device).manual_seed(seed)
