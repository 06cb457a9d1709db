"""What one DPO step costs next to one SFT step on the same tokens.

    python benchmarks/step_cost.py --json

Both steps see the same 2B sequences (B pairs: chosen and rejected, prompt + response): SFT runs
forward + masked cross-entropy + backward + AdamW on them; DPO runs one policy forward over the
same 2B sequences, sums response log-probs, the DPO loss against *precomputed* reference
log-probs, backward and AdamW. Because the reference is precomputed, the ratio should be close to
1; without precomputation it would need a second (no-grad) forward. Prints one JSON object with
median seconds per step and the ratio, on the built-in world's model shape.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_dpo  # noqa: E402
import train_sft  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.training import pad_batch  # noqa: E402
from minirlhf.world import World, demonstration, world_tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    ap.add_argument("--pairs", type=int, default=32, help="B: pairs per step (2B sequences)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = world_tokenizer(512)
    world, rng = World(0), np.random.default_rng(0)
    drawn = rng.integers(len(world.train_prompts), size=args.pairs)
    prompts = [world.train_prompts[i] for i in drawn]
    rows = [{"prompt": p.text, "chosen": demonstration(p, rng), "rejected": demonstration(p, rng)}
            for p in prompts]
    pairs = train_dpo.encode_pairs(rows, tok)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = torch.device("cpu")
    seqs = [c for c, _, _ in pairs] + [r for _, r, _ in pairs]
    n_prompt = [n for _, _, n in pairs] * 2
    tokens, attn_mask, loss_mask = pad_batch(seqs, n_prompt, tok.pad_id)
    with torch.no_grad():
        ref = train_dpo.precompute_reference(model, pairs, tok, device)            # (B, 2)

    def sft_step():
        loss, _ = train_sft.sft_loss(model(tokens, attn_mask), tokens, loss_mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def dpo_step():
        c, r = train_dpo.response_logprobs(model, pairs, tok, device)
        loss, _ = train_dpo.dpo_loss(c, r, ref[:, 0], ref[:, 1], beta=0.5)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {"sft": [], "dpo": []}
    for _ in range(3):  # warm-up
        sft_step()
        dpo_step()
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        for name, fn in (("sft", sft_step), ("dpo", dpo_step)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"benchmark": "step_cost", "pairs": args.pairs, "sequences": 2 * args.pairs,
           "tokens": int(attn_mask.sum()), "sft_step_seconds": med["sft"],
           "dpo_step_seconds": med["dpo"], "dpo_over_sft": med["dpo"] / med["sft"],
           "repeats": args.repeats, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "device": "cpu"}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
