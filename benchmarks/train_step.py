"""Training-step throughput and MFU: forward + backward + gradient clipping + AdamW step.

    python benchmarks/train_step.py --json                          # world shape, auto device
    python benchmarks/train_step.py --shape gpt2 --json             # GPT-2 124M shape
    python benchmarks/train_step.py --shape gpt2 --device cuda --compile --json

One step is what every train_*.py script does per batch: logits of (B, T) random tokens,
next-token cross-entropy, backward, clip the gradient norm to 1, AdamW, zero the gradients.
Tokens/s = B·T / (median seconds per step).

FLOPs per token (nanoGPT's `estimate_mfu`, from the PaLM paper, appendix B):
    6·N + 12·L·H·Q·T      N parameters (without the position table), L layers, H heads,
                          Q head size (H·Q = C), T sequence length
6·N is the matmuls of forward (2N) and backward (4N), N with the padded embedding rows as in
nanoGPT; 12·L·H·Q·T the attention scores and their weighted sums, counted as if every query saw
all T keys (causal masking would halve it).
MFU = achieved FLOP/s / the device's peak: 989e12 (H100 and H200, dense bf16), 312e12 (A100);
elsewhere null unless `--peak` says what it is (a CPU has no meaningful single number).

On CUDA the fast path is bf16 autocast + fused AdamW (+ `--compile`), with the embedding table
padded to a multiple of 64 rows for the tensor cores (GPTConfig.pad_vocab_multiple). The same
steps also run on the plain paths — unfused AdamW, eager (with --compile), the explicit
(B, 1, T, T) attention mask instead of `is_causal` (which keeps SDPA off its flash kernel), and
float32 with none of it — interleaved step by step so machine noise hits all alike; `ratios`
give fast / plain throughput. On CPU the first path is what the scripts do there: fused AdamW,
with bf16 autocast on CPUs with AMX or AVX512-BF16 (attention in float32, minirlhf/device.py);
beside it unfused AdamW, float32 with the explicit mask, and plain float32 with neither.

Left out on purpose: data loading (random tokens), gradient accumulation, DDP, activation
checkpointing.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, fail, start  # noqa: E402
from minirlhf.config import format_config  # noqa: E402
from minirlhf.device import autocast, native_bf16, set_precision  # noqa: E402
import minirlhf.model as model_module  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402

allowed_fast = model_module.attention_allowed

PROG = "benchmarks/train_step.py"
SHAPES = {
    "gpt2": GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "world": GPTConfig(vocab_size=517, block_size=96, n_layer=4, n_head=4, n_embd=128),
}
# (batch, seq_len, timed steps, warm-up steps) when the flags are left at none
DEFAULTS = {("gpt2", "cuda"): (8, 1024, 10, 3), ("gpt2", "cpu"): (1, 256, 3, 1),
            ("world", "cuda"): (64, 96, 20, 3), ("world", "cpu"): (32, 96, 10, 2)}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


@dataclass
class BenchConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"   # where to run (auto: cuda if available)
    shape: Literal["world", "gpt2"] = "world"         # world: the built-in model; gpt2: 124M
    batch: int | None = None                          # B (none: DEFAULTS by shape and device)
    seq_len: int | None = None                        # T (none: DEFAULTS by shape and device)
    steps: int | None = None                          # timed steps per path (none: see DEFAULTS)
    warmup: int | None = None                         # untimed steps first (compile, allocator)
    compile: bool = False                             # torch.compile the fast path (CUDA only)
    compare: bool = True                              # on CUDA, also time the plain paths
    peak: float | None = None                         # peak FLOP/s for MFU (none: known GPUs only)
    seed: int = 0                                     # weights and tokens
    threads: int | None = None                        # CPU threads for torch (none: default)
    json: bool = False                                # print one JSON object and nothing else

    def check(self):
        counts = [self.batch, self.seq_len, self.steps, self.threads]
        if min((c for c in counts if c is not None), default=1) < 1:
            raise ValueError("--batch, --seq-len, --steps and --threads must be at least 1")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.peak is not None and self.peak <= 0:
            raise ValueError("--peak must be positive")


@dataclass
class Variant:
    name: str
    bf16: bool        # bf16 autocast around the forward pass
    fused: bool       # fused AdamW (one kernel for all parameters)
    compiled: bool    # torch.compile
    causal: bool = True  # unpadded batches run SDPA with is_causal (False: the explicit mask)



def flops_per_token(model: GPT, T: int) -> float:
    """6·N + 12·L·H·Q·T (PaLM appendix B; nanoGPT's estimate_mfu). N leaves out the position
    table (a lookup, no matmul) but keeps the token embedding, which is also the LM head."""
    c = model.config
    n = model.num_params() - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * c.n_layer * c.n_embd * T


def peak_flops(cfg: BenchConfig, device: torch.device) -> float | None:
    if cfg.peak is not None:
        return cfg.peak
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_BF16.items() if k in name), None)
    return None


def adamw(model, fused: bool) -> torch.optim.AdamW:
    """The optimizer of minirlhf.training.make_optimizer, with `fused` chosen by the caller."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-4, betas=(0.9, 0.95), fused=fused)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def choose_paths(cfg, device) -> tuple[list, list[str]]:
    """The training-step variants to time on this device (the first is the scripts' path), and
    a line for each comparison this device cannot make."""
    skipped = []
    if device.type == "cuda":
        paths = [Variant("fast", bf16=True, fused=True, compiled=cfg.compile)]
        if cfg.compare:
            paths.append(Variant("unfused_adamw", bf16=True, fused=False, compiled=cfg.compile))
            if cfg.compile:
                paths.append(Variant("eager", bf16=True, fused=True, compiled=False))
            paths.append(Variant("explicit_mask", bf16=True, fused=True, compiled=cfg.compile,
                                 causal=False))
            paths.append(Variant("plain", bf16=False, fused=False, compiled=False))
        if not cfg.compile:
            skipped.append("compile vs eager: pass --compile")
    else:
        bf16 = native_bf16(device)  # AMX or AVX512-BF16: the scripts run bf16 here (device.py)
        paths = [Variant("bf16" if bf16 else "fused_adamw", bf16=bf16, fused=True,
                         compiled=False)]
        if not bf16:
            skipped.append("bf16: this CPU has neither AMX nor AVX512-BF16 "
                           "(the scripts stay in float32 here)")
        if cfg.compare:
            if bf16:
                paths.append(Variant("unfused_adamw", bf16=True, fused=False, compiled=False))
            paths.append(Variant("explicit_mask", bf16=False, fused=False, compiled=False,
                                 causal=False))
        paths.append(Variant("plain", bf16=False, fused=False, compiled=False))
        skipped.append("compile: CUDA only")
        if cfg.compile:
            skipped.append("--compile: CUDA only")
    return paths, skipped


def print_report(results: dict, ratios: dict, skipped: list[str], steps: int) -> None:
    """The human-readable form of the JSON report."""
    for name, r in results.items():
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{name:>14}: {r['tokens_per_s']:>10.1f} tokens/s, {r['flops_per_s']:.3g} "
              f"FLOP/s, MFU {mfu} (median of {steps}: {r['step_seconds']:.4f} s/step)")
    for k, v in ratios.items():
        print(f"{k}: {v}x")
    for s in skipped:
        print(f"skipped: {s}")


def main(argv=None):
    cfg, device = start(BenchConfig, argv, PROG)
    set_precision("bf16")  # autocast(device) is bf16 wherever a path asks for it
    batch, T, steps, warmup = DEFAULTS[(cfg.shape, device.type)]
    batch, T = cfg.batch or batch, cfg.seq_len or T
    steps = cfg.steps or steps
    warmup = warmup if cfg.warmup is None else cfg.warmup
    model_cfg = SHAPES[cfg.shape]
    if device.type == "cuda":  # tensor cores like multiples of 64 (GPT-2: 50257 -> 50304 rows)
        model_cfg = replace(model_cfg, pad_vocab_multiple=64)
    if T > model_cfg.block_size:
        fail(PROG, f"--seq-len {T} exceeds the shape's block_size {model_cfg.block_size}")
    if not cfg.json:
        print(format_config(cfg))

    paths, skipped = choose_paths(cfg, device)

    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, T + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]                                           # (B, T) each
    runs = {}
    for p in paths:  # same initial weights for every path
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg).to(device).train()
        fwd = torch.compile(model) if p.compiled else model
        runs[p.name] = (p, model, fwd, adamw(model, p.fused), [])

    def step(p, model, fwd, opt):
        # the reference attention path: the (B, 1, T, T) mask even when nothing is padded
        model_module.attention_allowed = (allowed_fast if p.causal else
                                          functools.partial(allowed_fast, fast=False))
        with autocast(device) if p.bf16 else contextlib.nullcontext():
            logits = fwd(x)                                                        # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # autocast: runs in fp32
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for p, model, fwd, opt, _ in runs.values():
        for _ in range(warmup):
            step(p, model, fwd, opt)
    for _ in range(steps):  # interleaved: one step of each path in turn
        for p, model, fwd, opt, times in runs.values():
            sync(device)
            t0 = time.perf_counter()
            step(p, model, fwd, opt)
            sync(device)
            times.append(time.perf_counter() - t0)

    some_model = next(iter(runs.values()))[1]
    fpt = flops_per_token(some_model, T)
    peak = peak_flops(cfg, device)
    results = {}
    for name, (p, model, fwd, opt, times) in runs.items():
        seconds = statistics.median(times)
        achieved = fpt * batch * T / seconds
        results[name] = {"bf16": p.bf16, "fused_adamw": p.fused, "compile": p.compiled,
                         "is_causal": p.causal,
                         "step_seconds": round(seconds, 5),
                         "tokens_per_s": round(batch * T / seconds, 1),
                         "flops_per_s": float(f"{achieved:.4g}"),
                         "mfu": None if peak is None else round(achieved / peak, 4)}
    main_path = paths[0].name
    fast = results[main_path]
    ratios = {f"{main_path}_over_{n}": round(fast["tokens_per_s"] / r["tokens_per_s"], 3)
              for n, r in results.items() if n != main_path}
    report = {
        "benchmark": "train_step",
        "shape": cfg.shape,
        "params": some_model.num_params(),
        "vocab_size": model_cfg.vocab_size,
        "embedding_rows": model_cfg.padded_vocab_size,
        "batch": batch, "seq_len": T, "steps": steps, "warmup": warmup,
        "flops_per_token": fpt,
        "peak_flops": peak,
        "path": main_path,
        "tokens_per_s": results[main_path]["tokens_per_s"],
        "mfu": results[main_path]["mfu"],
        "paths": results,
        "ratios": ratios,
        "skipped": skipped,
        **environment(device, dtype=False),
    }
    if cfg.json:
        print(json.dumps(report))
    else:
        print_report(results, ratios, skipped, steps)
    return report


if __name__ == "__main__":
    main()
