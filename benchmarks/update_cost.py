"""What GRPO's update phase costs next to PPO's, on the same rollout.

    python benchmarks/update_cost.py --json
    python benchmarks/update_cost.py --policy out/pipeline/sft --json   # a trained policy

One rollout (`train_ppo.rollout`: --prompts-per-iter world prompts × k responses, scored by the
world's verifier) is made once; then phase 2 and 3 of an iteration (`compute_advantages` and
`ppo_update`) are timed on it, interleaved, for PPO (GAE, a value model trained beside the
policy, β·KL in the reward) and for GRPO (group-normalised advantages, no value model, β·k3 in
the loss). Each timed update starts from the same weights and optimizer state (fresh copies), so
both do the same work every repeat. Prints the median seconds of each and their ratio; and
PPO's update with the entropy backpropagated although c2 = 0 (the reference path, the same
weights: tests/test_fast_path.py) beside the default that keeps it out of the graph.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Literal

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_ppo  # noqa: E402
from common import environment, start  # noqa: E402
from minirlhf.checkpoint import load_stage  # noqa: E402
from minirlhf.device import uses_bf16  # noqa: E402
from minirlhf.distributed import Dist  # noqa: E402
from minirlhf.graders import make_reward  # noqa: E402
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel  # noqa: E402
from minirlhf.training import make_optimizer  # noqa: E402
from minirlhf.world import World, world_tokenizer  # noqa: E402

PROG = "benchmarks/update_cost.py"


@dataclasses.dataclass
class BenchConfig:
    policy: str | None = None         # a stage folder to start from; none = a random world GPT
    prompts_per_iter: int = 32        # prompts in the rollout
    samples_per_prompt: int = 4       # k responses per prompt (GRPO's group)
    repeats: int = 10                 # timed updates of each, interleaved
    threads: int | None = None        # torch CPU threads (none: leave as is)
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    json: bool = False                # print only the JSON object


def models(cfg: BenchConfig, device):
    """(policy, reference, value model, tokenizer): --policy's SFT model, or a random one."""
    if cfg.policy:
        policy, tok, _ = load_stage(cfg.policy, "gpt", device)
    else:
        torch.manual_seed(0)
        tok = world_tokenizer(512)
        policy = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=96)).to(device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy, ref, ScalarHeadModel.from_gpt(policy), tok


def main(argv=None):
    cfg, device = start(BenchConfig, argv, PROG)
    policy, ref, value, tok = models(cfg, device)
    dist = Dist(0, 1, device)
    base = train_ppo.PPOConfig(prompts_per_iter=cfg.prompts_per_iter, reward="verifier",
                               samples_per_prompt=cfg.samples_per_prompt, max_new_tokens=48)
    prompts = [p.text for p in World(0).train_prompts]
    ro = train_ppo.rollout(policy, policy, ref, make_reward("verifier"), value, tok, prompts,
                           base, 0, dist)
    ppo = dataclasses.replace(base, advantage="gae")
    grpo = dataclasses.replace(base, advantage="grpo")
    opts = {"policy": make_optimizer(policy, ppo.lr, 0.0),
            "value": make_optimizer(value, ppo.value_lr, 0.0)}
    for opt in opts.values():  # one step each, so that the optimizers hold their moments
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    start_state = copy.deepcopy((policy.state_dict(), value.state_dict(),
                                 opts["policy"].state_dict(), opts["value"].state_dict()))

    def update(run_cfg, with_value: bool, entropy_grad: bool | None = None):
        policy.load_state_dict(start_state[0])
        value.load_state_dict(start_state[1])
        opts["policy"].load_state_dict(start_state[2])
        opts["value"].load_state_dict(start_state[3])
        t = time.perf_counter()
        advantages, returns, value_mask = train_ppo.compute_advantages(ro, 0.2, run_cfg, dist)
        train_ppo.ppo_update(policy, value if with_value else None, opts["policy"],
                             opts["value"], ro, advantages, returns, value_mask, 0.2, run_cfg,
                             0, dist, entropy_grad=entropy_grad)
        return time.perf_counter() - t

    times = {"ppo": [], "grpo": [], "ppo_entropy_in_graph": []}
    update(ppo, True), update(grpo, False), update(ppo, True, True)  # warm-up
    for _ in range(cfg.repeats):  # interleaved, so machine noise hits all alike
        times["ppo"].append(update(ppo, True))
        times["grpo"].append(update(grpo, False))
        times["ppo_entropy_in_graph"].append(update(ppo, True, True))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"benchmark": "update_cost", "policy": cfg.policy or "random",
           "params": sum(p.numel() for p in policy.parameters()),
           "responses": len(ro.prompts), "mean_response_tokens": ro.mask.sum(-1).float().mean()
           .item(), "repeats": cfg.repeats, "ppo_update_seconds": med["ppo"],
           "grpo_update_seconds": med["grpo"], "grpo_over_ppo": med["grpo"] / med["ppo"],
           "ppo_entropy_in_graph_seconds": med["ppo_entropy_in_graph"],
           "ppo_over_entropy_in_graph": med["ppo"] / med["ppo_entropy_in_graph"],
           "dtype": "bf16-autocast" if uses_bf16(device) else "float32",
           **environment(device, dtype=False)}
    print(json.dumps(out) if cfg.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
