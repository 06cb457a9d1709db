"""What the checkpoint's SHA-256 trailer costs, at GPT-2 124M size with AdamW state.

    python benchmarks/checkpoint_cost.py --json

Writes a checkpoint as a stage does (weights + AdamW's two moments, ~1.5 GB) and reads it back,
`--repeats` times, and times each part: `torch.save` alone, hashing the written bytes (what the
trailer adds to a save), `load_checkpoint` whole (hash check + torch.load + checks), and the hash
check alone (what the trailer adds to a load). Prints one JSON object with the medians.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time

import torch

from common import environment, start
from minirlhf.checkpoint import file_digest, load_checkpoint, save_checkpoint, verify_file
from minirlhf.model import GPT, GPTConfig
from minirlhf.tokenizer import Tokenizer

PROG = "benchmarks/checkpoint_cost.py"


@dataclasses.dataclass
class BenchConfig:
    repeats: int = 3                  # saves and loads timed (medians reported)
    n_layer: int = 12                 # GPT-2 124M: 12 layers, 12 heads, 768 channels
    device: str = "cpu"               # where the model is built (checkpoints are saved from CPU)
    json: bool = False                # print one JSON object only


def main(argv=None) -> dict:
    cfg, device = start(BenchConfig, argv, PROG)
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=cfg.n_layer, n_head=12,
                          n_embd=768))
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():  # AdamW's state as after a step: two moments per weight
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    times = {k: [] for k in ("save_total", "save_hash", "load_total", "load_hash")}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "checkpoint.pt")
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            save_checkpoint(path, model=model, model_kind="gpt", config=None, tokenizer=tok,
                            step=1, optimizer=opt)
            t1 = time.perf_counter()
            file_digest(path)  # the hashing a save does, once more, timed alone
            t2 = time.perf_counter()
            load_checkpoint(path)
            t3 = time.perf_counter()
            verify_file(path)
            t4 = time.perf_counter()
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k].append(v)
        size = os.path.getsize(path)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    report = {"benchmark": "checkpoint_cost", "params": model.num_params(),
              "file_bytes": size, "repeats": cfg.repeats, "seconds": med,
              "hash_share_of_save": round(med["save_hash"] / med["save_total"], 3),
              "hash_share_of_load": round(med["load_hash"] / med["load_total"], 3),
              "hash_gb_per_s": round(size / 1e9 / med["load_hash"], 2),
              **environment(device, dtype=False)}
    print(json.dumps(report) if cfg.json else json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
