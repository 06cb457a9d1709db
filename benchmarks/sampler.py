"""Sampling speed: the KV-cache path against the re-run-everything path of minirlhf/sampler.py.

    python benchmarks/sampler.py                         # ~1M-parameter GPT, batch 16, CPU or GPU
    python benchmarks/sampler.py --json                  # one JSON object on stdout
    python benchmarks/sampler.py --shape gpt2 --device cuda --repeats 5   # GPT-2 124M shape
    python benchmarks/sampler.py --policy out/pipeline/sft --batch 512    # a trained policy

With `--policy` (a trained stage of the built-in world) the workload is real instead: the
world's training prompts, responses that end at the end token, and the cached path timed with
and without dropping finished rows from the batch (`generate(..., drop_finished=False)` keeps
running the model on them, as the first version of the sampler did).

Both paths generate `new_tokens` tokens for every row (the end id is -1, which is never sampled,
so no row stops early) from the same random left-padded prompts and the same generator seed.
Tokens/s counts generated tokens only: batch × new_tokens / seconds. Each path runs once to warm
up, then `repeats` times; the median is reported. On CUDA the model runs under bf16 autocast and
the clock waits for the GPU (torch.cuda.synchronize) before it is read.

Left out on purpose: torch.compile, static-shape CUDA graphs, and prompts of real text — the
model is randomly initialised, since speed does not depend on what the weights say.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, fail, start  # noqa: E402
from minirlhf.config import format_config  # noqa: E402
from minirlhf.device import autocast  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.sampler import generate  # noqa: E402

PROG = "benchmarks/sampler.py"
SHAPES = {  # model shape, prompt length
    "small": (GPTConfig(vocab_size=512, block_size=160, n_layer=4, n_head=4, n_embd=128), 16),
    "gpt2": (GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768), 32),
}


@dataclass
class BenchConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"   # where to run (auto: cuda if available)
    shape: Literal["small", "gpt2"] = "small"          # small: ~1M params; gpt2: the 124M shape
    batch: int = 16                                    # prompts generated together
    new_tokens: int = 128                              # tokens generated per prompt
    prompt_len: int | None = None                      # longest prompt (none: 16 small, 32 gpt2)
    repeats: int = 5                                   # timed runs per path; the median is kept
    seed: int = 0                                      # prompts and sampling
    threads: int | None = None                         # CPU threads for torch (none: default)
    policy: str | None = None                          # a trained stage: real prompts, real ends
    max_new_tokens: int = 64                           # with --policy: the response budget
    json: bool = False                                 # print one JSON object and nothing else

    def check(self):
        counts = [self.batch, self.new_tokens, self.repeats, self.prompt_len, self.threads]
        if min(c for c in counts if c is not None) < 1:
            raise ValueError("--batch, --new-tokens, --repeats, --prompt-len and --threads "
                             "must be at least 1")



def timed_generate(model, prompts, cfg, device, use_cache):
    """One generation; returns (seconds, tokens)."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with autocast(device):
        out = generate(model, prompts, cfg.new_tokens, eos_id=-1, pad_id=0, temperature=1.0,
                       generator=gen, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out.tokens


def policy_workload(cfg, device) -> dict:
    """--policy: one trained model on the world's training prompts, the cached path with and
    without dropping finished rows (same generator seed: the same tokens either way)."""
    from minirlhf.checkpoint import CheckpointError, load_stage
    from minirlhf.world import World
    try:
        model, tok, _ = load_stage(cfg.policy, "gpt", device)
    except (CheckpointError, FileNotFoundError) as e:
        fail(PROG, str(e))
    model.eval()
    train = World(cfg.seed).train_prompts
    prompts = [tok.render_prompt(train[i % len(train)].text) for i in range(cfg.batch)]

    def once(drop):
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast(device):
            out = generate(model, prompts, cfg.max_new_tokens, eos_id=tok.end_id, pad_id=tok.pad_id,
                           temperature=1.0, generator=gen, drop_finished=drop)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    result, outs = {}, {}
    for name, drop in (("keep_finished", False), ("drop_finished", True)):
        once(drop)  # warm-up
        runs = [once(drop) for _ in range(cfg.repeats)]
        result[f"{name}_seconds"] = round(statistics.median(s for s, _ in runs), 4)
        outs[name] = runs[0][1]
    lengths = outs["drop_finished"].response_mask.sum(1).float()
    return {"benchmark": "sampler_policy", "policy": cfg.policy,
            "params": sum(p.numel() for p in model.parameters()), "batch": cfg.batch,
            "max_new_tokens": cfg.max_new_tokens, "repeats": cfg.repeats,
            "mean_response_tokens": round(float(lengths.mean()), 2),
            "longest_response_tokens": int(lengths.max()), **result,
            "speedup_drop_over_keep": round(result["keep_finished_seconds"]
                                            / result["drop_finished_seconds"], 2),
            "same_tokens": bool(torch.equal(outs["keep_finished"].tokens,
                                            outs["drop_finished"].tokens)),
            **environment(device)}


def main(argv=None):
    cfg, device = start(BenchConfig, argv, PROG)
    if cfg.policy:
        report = policy_workload(cfg, device)
        print(json.dumps(report) if cfg.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
        return report
    model_cfg, default_prompt = SHAPES[cfg.shape]
    prompt_len = cfg.prompt_len or default_prompt
    if prompt_len + cfg.new_tokens > model_cfg.block_size:
        fail(PROG, f"prompt {prompt_len} + {cfg.new_tokens} new tokens exceed block_size "
             f"{model_cfg.block_size}")
    if not cfg.json:
        print(format_config(cfg))

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (cfg.batch,), generator=g)
    lengths[0] = prompt_len  # the batch is as wide as asked
    prompts = [torch.randint(1, model_cfg.vocab_size, (int(n),), generator=g).tolist()
               for n in lengths]

    result = {}
    tokens = {}
    for name, use_cache in (("naive", False), ("cache", True)):
        timed_generate(model, prompts, cfg, device, use_cache)  # warm-up: allocator, kernels
        runs = [timed_generate(model, prompts, cfg, device, use_cache) for _ in range(cfg.repeats)]
        seconds = statistics.median(s for s, _ in runs)
        tokens[name] = runs[0][1]
        result[f"{name}_seconds"] = round(seconds, 4)
        result[f"{name}_tokens_per_s"] = round(cfg.batch * cfg.new_tokens / seconds, 1)
        if not cfg.json:
            print(f"{name:>5}: {result[f'{name}_tokens_per_s']:>10.1f} tokens/s "
                  f"(median of {cfg.repeats}: {seconds:.3f} s)")

    report = {
        "benchmark": "sampler",
        "shape": cfg.shape,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": cfg.batch,
        "prompt_len": prompt_len,
        "new_tokens": cfg.new_tokens,
        "repeats": cfg.repeats,
        **result,
        "speedup_cache_over_naive": round(result["cache_tokens_per_s"]
                                          / result["naive_tokens_per_s"], 2),
        "same_tokens": bool(torch.equal(tokens["naive"], tokens["cache"])),
        **environment(device),
    }
    if cfg.json:
        print(json.dumps(report))
    else:
        print(f"cache / naive: {report['speedup_cache_over_naive']}x, "
              f"same tokens: {report['same_tokens']}")
    return report


if __name__ == "__main__":
    main()
