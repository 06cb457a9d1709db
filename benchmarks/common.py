"""What every benchmark does the same way: parse its flags, pick the device and thread count, and
describe the machine in its JSON (so numbers from different machines are never compared blind).

    from common import environment, fail, start
    cfg, device = start(BenchConfig, argv, PROG)
    report = {..., **environment(device)}
"""
from __future__ import annotations

import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minirlhf.config import parse_config  # noqa: E402
from minirlhf.device import resolve_device, set_precision, uses_bf16  # noqa: E402


def fail(prog: str, message: str):
    """One error line and exit code 2, like a bad flag."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def start(config_cls, argv, prog: str):
    """Flags -> (config, device); `--threads` (when the config has it) sets torch's CPU threads."""
    cfg = parse_config(config_cls, argv, prog=prog)
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        fail(prog, str(e))
    if getattr(cfg, "threads", None) is not None:
        torch.set_num_threads(cfg.threads)
    if hasattr(cfg, "precision"):  # what our paths run in: autocast(device) follows it
        set_precision(cfg.precision)
    return cfg, device


def environment(device: torch.device, dtype: bool = True) -> dict:
    """The machine a result was measured on; `dtype` False leaves out the precision key for
    benchmarks that report it per path. "dtype" is what our paths ran in: bf16 autocast
    wherever `autocast(device)` is bf16 (CUDA and bf16-native CPUs unless --precision fp32)."""
    env = {"device": device.type,
           "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else platform.processor() or platform.machine())}
    if dtype:
        env["dtype"] = "bf16-autocast" if uses_bf16(device) else "float32"
    return {**env, "torch": torch.__version__, "threads": torch.get_num_threads()}
