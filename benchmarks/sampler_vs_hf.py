"""Our sampler (re-run-everything and KV cache) against `transformers`' GPT2LMHeadModel.generate
on the same weights.

    python benchmarks/sampler_vs_hf.py --json                       # world shape, batch 1 and 64
    python benchmarks/sampler_vs_hf.py --shape gpt2 --device cuda   # GPT-2 124M shape

The model is randomly initialised (speed does not depend on what the weights say) and copied
into a GPT2LMHeadModel (benchmarks/hf_twin.py: Conv1D weights are our Linear weights
transposed; both use the tanh GELU). `max_logit_diff` checks the copy: the largest |ours − HF|
logit on the prompts, float32. `greedy_agreement` is the fraction of positions where greedy
decoding picks the same token on both sides (1.0 expected; a near-tie can flip one).

Every path samples exactly `--new-tokens` tokens per row from the same left-padded random
prompts at temperature 1, no top-k / top-p: ours with end id -1 (never sampled, so no row stops),
HF with min_new_tokens = max_new_tokens (its end token is banned until the last step). That
ban is the only difference in what is sampled. Tokens/s = batch × new_tokens / median seconds;
the three paths run interleaved, `--repeats` times each after one warm-up.
Both sides sample under the same `--precision` (fp32 by default, the precision the training
scripts sample in; `--precision auto` is bf16 autocast on CUDA and bf16-native CPUs), reported
as "dtype"; HF keeps its own DynamicCache.

If `transformers` is not installed only our two paths run, and `skipped` says so.
Left out on purpose: HF's static cache / compiled generation, beam search, real text prompts.
"""
from __future__ import annotations

import contextlib
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
from hf_twin import hf_available, hf_lm, max_logit_diff, offline  # noqa: E402
from minirlhf.config import format_config  # noqa: E402
from minirlhf.device import autocast  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.sampler import generate, left_pad  # noqa: E402

PROG = "benchmarks/sampler_vs_hf.py"
SHAPES = {  # model shape, longest prompt, new tokens
    "world": (GPTConfig(vocab_size=517, block_size=96, n_layer=4, n_head=4, n_embd=128), 16, 64),
    "gpt2": (GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
             32, 128),
}
PAD_ID = 0


@dataclass
class BenchConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"   # where to run (auto: cuda if available)
    shape: Literal["world", "gpt2"] = "world"         # world: the built-in model; gpt2: 124M
    batches: str = "1,64"                             # comma-separated batch sizes to time
    new_tokens: int | None = None                     # tokens per row (none: 64 world, 128 gpt2)
    repeats: int = 5                                  # timed runs per path; the median is kept
    naive: bool = True                                # also time ours without the KV cache
    seed: int = 0                                     # weights, prompts and sampling
    threads: int | None = None                        # CPU threads for torch (none: default)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # both sides sample in it; fp32 is what
                                                         # train_ppo.py samples in, auto: bf16
                                                         # autocast on CUDA and bf16-native CPUs
    json: bool = False                                # print one JSON object and nothing else

    def check(self):
        try:
            sizes = [int(b) for b in self.batches.split(",")]
        except ValueError:
            raise ValueError("--batches must be comma-separated integers, e.g. 1,64") from None
        if min(sizes + [self.repeats, self.new_tokens or 1, self.threads or 1]) < 1:
            raise ValueError("--batches, --repeats, --new-tokens and --threads must be >= 1")



def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_prompts(batch, prompt_len, vocab, g) -> list[list[int]]:
    """Ragged prompts (half to full length), the first as long as asked; no id is PAD_ID."""
    lengths = torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g)
    lengths[0] = prompt_len
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


def run_ours(model, prompts, n, seed, device, use_cache):
    gen = torch.Generator(device=device).manual_seed(seed)
    with autocast(device):
        return generate(model, prompts, n, eos_id=-1, pad_id=PAD_ID, temperature=1.0,
                        generator=gen, use_cache=use_cache).tokens


def run_hf(hf, prompts, n, seed, device, eos_id, sample=True):
    """Sampling under the benchmark's autocast; greedy (the weight check) in float32."""
    tokens, mask = left_pad(prompts, PAD_ID, device)                               # (B, P)
    torch.manual_seed(seed)  # HF samples from the global generator
    with autocast(device) if sample else contextlib.nullcontext():
        return hf.generate(input_ids=tokens, attention_mask=mask.long(), do_sample=sample,
                           max_new_tokens=n, min_new_tokens=n, temperature=1.0 if sample else None,
                           top_k=0 if sample else None, top_p=1.0 if sample else None,
                           pad_token_id=PAD_ID, eos_token_id=eos_id, use_cache=True)


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    cfg, device = start(BenchConfig, argv, PROG)
    model_cfg, prompt_len, new_tokens = SHAPES[cfg.shape]
    new_tokens = cfg.new_tokens or new_tokens
    if prompt_len + new_tokens > model_cfg.block_size:
        fail(PROG, f"prompt {prompt_len} + {new_tokens} new tokens exceed block_size "
             f"{model_cfg.block_size}")
    batches = [int(b) for b in cfg.batches.split(",")]
    if not cfg.json:
        print(format_config(cfg))

    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device).eval()
    eos_id = model_cfg.vocab_size - 1  # HF bans it until the last step; ours uses -1
    missing = hf_available("transformers")
    skipped, hf, check = [], None, {}
    if missing:
        skipped.append("transformers not installed: GPT2LMHeadModel.generate not timed")
    else:
        offline()
        import transformers
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf = hf_lm(model, PAD_ID, eos_id)
        g = torch.Generator().manual_seed(cfg.seed + 1)
        probe = random_prompts(max(batches), prompt_len, model_cfg.vocab_size, g)
        tokens, mask = left_pad(probe, PAD_ID, device)
        ours_greedy = generate(model, probe, new_tokens, eos_id=-1, pad_id=PAD_ID,
                               temperature=0).tokens[:, -new_tokens:]
        hf_greedy = run_hf(hf, probe, new_tokens, cfg.seed, device, eos_id, sample=False)
        hf_greedy = hf_greedy[:, -new_tokens:]
        check = {"transformers": transformers.__version__,
                 "max_logit_diff": float(f"{max_logit_diff(model, hf, tokens, mask):.3g}"),
                 "greedy_agreement": round((ours_greedy == hf_greedy).float().mean().item(), 4)}

    results = {}
    for batch in batches:
        g = torch.Generator().manual_seed(cfg.seed)
        prompts = random_prompts(batch, prompt_len, model_cfg.vocab_size, g)
        paths = {name: (lambda c=use_cache: run_ours(model, prompts, new_tokens, cfg.seed,
                                                     device, c))
                 for name, use_cache in (("ours_naive", False), ("ours_cache", True))
                 if use_cache or cfg.naive}
        if hf is not None:
            paths["hf"] = lambda: run_hf(hf, prompts, new_tokens, cfg.seed, device, eos_id)
        for fn in paths.values():  # warm-up; also checks every path makes new_tokens tokens
            out = fn()
            if out.shape[1] != max(len(p) for p in prompts) + new_tokens:
                raise RuntimeError(f"a path generated {out.shape[1]} columns, not "
                                   f"{max(len(p) for p in prompts) + new_tokens}")
        times = {name: [] for name in paths}
        for _ in range(cfg.repeats):  # interleaved, so machine noise hits every path alike
            for name, fn in paths.items():
                sync(device)
                times[name].append(timed(lambda: (fn(), sync(device))))
        row = {}
        for name, ts in times.items():
            s = statistics.median(ts)
            row[f"{name}_seconds"] = round(s, 4)
            row[f"{name}_tokens_per_s"] = round(batch * new_tokens / s, 1)
        if hf is not None:
            for name in [n for n in ("ours_cache", "ours_naive") if n in paths]:
                row[f"{name}_over_hf"] = round(row[f"{name}_tokens_per_s"]
                                               / row["hf_tokens_per_s"], 3)
        results[f"batch_{batch}"] = row
        if not cfg.json:
            print(f"batch {batch}: " + ", ".join(f"{k} {v}" for k, v in row.items()))

    report = {
        "benchmark": "sampler_vs_hf",
        "shape": cfg.shape,
        "params": model.num_params(),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": cfg.repeats,
        **check,
        "results": results,
        "notes": "same weights; both tanh GELU; temperature 1, no top-k/top-p; HF bans its end "
                 "token until max_new_tokens (min_new_tokens), ours uses end id -1",
        "skipped": skipped,
        **environment(device),
    }
    if cfg.json:
        print(json.dumps(report))
    else:
        print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    return report


if __name__ == "__main__":
    main()
