"""Where and in what precision a run computes: `--device auto|cpu|cuda`, `--precision
auto|fp32|bf16`, and the only place that branches on them.

Precision. Forward passes run under bf16 autocast where the hardware multiplies bf16 matrices
natively — CUDA GPUs, CPUs with AMX tiles (Intel Xeon since Sapphire Rapids) and CPUs with
AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake) — and in plain float32
elsewhere (`--precision auto`, the default); weights, gradients and optimizer state stay float32
either way, and losses are taken in float32. `--precision fp32` is the obvious path everything
is tested against. Measured with benchmarks/train_step.py, a built-in-world training step in
bf16 against float32: 1.38x on a 2-core AMX Xeon, 1.97x on a 2-core AVX512-BF16 EPYC; on CPUs
with neither (AVX2 only) bf16 is slower than float32, so auto keeps float32 there. The scripts
call `set_precision(cfg.precision)` once at start and then `autocast(device)` wherever a model
runs forward; nothing else asks.

`--compile` wraps the model in `torch.compile` on CUDA (on CPU it measured no faster here, after
~40 s of compiling).
"""
from __future__ import annotations

import contextlib
import functools

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")
_precision = "auto"


def set_precision(name: str) -> None:
    """The precision `autocast` uses from now on: auto, fp32 or bf16 (the scripts' --precision)."""
    global _precision
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    _precision = name


@functools.lru_cache(maxsize=None)
def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 matrices in hardware: CUDA, or a CPU with AMX tiles or
    AVX512-BF16 instructions (asked once per device: autocast and pad_batch ask at every step)."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: no way to ask, so no bf16 by default
        return False


def uses_bf16(device: torch.device) -> bool:
    return _precision == "bf16" or (_precision == "auto" and native_bf16(device))


def autocast(device: torch.device):
    """bf16 autocast when `uses_bf16(device)`, else nothing (float32)."""
    if uses_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def maybe_compile(model, device: torch.device, enabled: bool):
    """torch.compile on CUDA when asked; returns the model unchanged otherwise."""
    if enabled and device.type == "cuda":
        return torch.compile(model)
    return model


def generator(device: torch.device, seed: int) -> torch.Generator:
    """An explicit generator on the device that samples, so sampling is reproducible."""
    return torch.Generator(device=device).manual_seed(seed)
