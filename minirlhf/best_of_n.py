"""Best-of-n sampling: draw n responses from the policy, keep the one the reward model likes best.
The simplest policy improvement there is, and the baseline any RL method is judged against at the
same KL (Gao, Schulman, Hilton 2023; Stiennon et al. 2020).

    python -m minirlhf.best_of_n --policy out/pipeline/sft --rm out/pipeline/rm --out out/bon
    python -m minirlhf.best_of_n --policy out/pipeline/sft --rm out/pipeline/rm --n 1,4,16 \\
        --selector gold --out out/bon_gold     # the gold judge picks: the upper bound

Its KL to the policy has a closed form when the n samples are distinct (`best_of_n_kl`):
KL(π_n‖π) = log n − (n − 1)/n, an upper bound otherwise. Each curve point is estimated from one
set of N = max(n) samples per prompt, without drawing again for each n: the expected value of
the best of n samples is, exactly, the mean over all n-subsets of the N (`best_of_n_weights`).

Writes OUT/best_of_n.json: {"points": [{"n", "kl", "gold", "accuracy", "proxy"}], ...}, gold
and accuracy on the built-in world's prompts, proxy the selector's own score of the kept sample.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Sequence

import numpy as np

from .checkpoint import load_stage
from .config import OneLineParser
from .device import resolve_device
from .errors import CheckpointError, DataError, TokenizerError
from .evaluate import evaluate, stage_scorer
from .training import fail, write_json
from .world import BT_TEMPERATURE, World

PROG = "python -m minirlhf.best_of_n"


def best_of_n_kl(n: int) -> float:
    """KL(π_n‖π) = log n − (n − 1)/n for best-of-n of distinct samples (Stiennon et al. 2020,
    appendix; an upper bound when samples can tie, Beirami et al. 2024). 0 at n = 1."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_weights(n: int, N: int) -> np.ndarray:
    """(N,) weights w_i, i = 1..N in ascending order of the selector's score: the probability
    that the i-th lowest of N samples is the best of n drawn from them without replacement,
    C(i − 1, n − 1) / C(N, n). Σ_i w_i·v_(i) is then the exact mean, over every n-subset of the
    N samples, of the value of the subset's best: an unbiased estimate of best-of-n from N ≥ n
    samples (the estimator of Nakano et al. 2021, WebGPT, appendix)."""
    if not 1 <= n <= N:
        raise ValueError(f"need 1 <= n <= N, got n={n}, N={N}")
    total = math.comb(N, n)
    return np.array([math.comb(i - 1, n - 1) / total for i in range(1, N + 1)])


def best_of_n_values(scores: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """scores, values: (P, N) the selector's score and a quantity (gold, accuracy, ...) of N
    samples for each of P prompts -> (P,) the expected value of the best-of-n sample per prompt.
    Ties in the score are broken by sample order (a stable sort), as picking the first of the
    best would."""
    order = np.argsort(scores, axis=1, kind="stable")                          # (P, N) ascending
    ranked = np.take_along_axis(values, order, axis=1)                         # (P, N)
    return ranked @ best_of_n_weights(n, scores.shape[1])                      # (P,)


def best_of_n_curve(policy, tokenizer, prompts: Sequence, ns: Sequence[int], *, reward=None,
                    max_new_tokens: int = 48, seed: int = 0) -> list[dict]:
    """Best-of-n for each n in `ns` on `prompts`: max(ns) samples per prompt at temperature 1,
    kept by `reward` (`evaluate`'s reward: a reward model's scorer), or by the gold judge when
    reward is None (the upper bound). Returns [{"n", "kl", "gold", "accuracy", "proxy"}]."""
    N = max(ns)
    r = evaluate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed,
                 batch_size=max(1, 512 // N) * N, repeats=N, per_sample=True, reward=reward,
                 desc="best-of-n samples")
    if len(r["golds"]) != len(prompts) * N:
        raise ValueError("best-of-n needs the built-in world's prompts: its gold judge scores "
                         "the kept samples")
    golds, accs = r["golds"].reshape(-1, N), r["correct"].reshape(-1, N)       # (P, N)
    scores = r["rewards"].reshape(-1, N) if reward is not None else golds / BT_TEMPERATURE
    return [{"n": n, "kl": best_of_n_kl(n),
             "gold": float(best_of_n_values(scores, golds, n).mean()),
             "accuracy": float(best_of_n_values(scores, accs, n).mean()),
             "proxy": float(best_of_n_values(scores, scores, n).mean())} for n in ns]


def parse_ns(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]: distinct positive counts, in increasing order."""
    try:
        ns = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--n {text!r}: expected counts like 1,2,4,8") from None
    if not ns or ns[0] < 1:
        raise ValueError(f"--n {text!r}: expected positive counts like 1,2,4,8")
    return ns


def main(argv=None) -> dict:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="stage folder whose samples are ranked")
    parser.add_argument("--rm", help="reward-model stage folder that ranks them (the selector)")
    parser.add_argument("--selector", default="rm", choices=["rm", "gold"],
                        help="rm: the reward model picks; gold: the gold judge (the upper bound)")
    parser.add_argument("--n", default="1,2,4,8,16,32,64", help="the n of each curve point")
    parser.add_argument("--out", required=True, help="folder for best_of_n.json")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    try:
        ns = parse_ns(args.n)
    except ValueError as e:
        parser.error(str(e))
    if args.selector == "rm" and not args.rm:
        parser.error("--selector rm needs --rm DIR (or use --selector gold)")
    try:
        return run(args, ns)
    except (CheckpointError, DataError, TokenizerError, ValueError, OSError) as e:
        fail(PROG, str(e))


def run(args, ns: list[int]) -> dict:
    """Load the policy (and the reward model), draw the curve, write OUT/best_of_n.json."""
    t0 = time.time()
    device = resolve_device(args.device)
    policy, tok, _ = load_stage(args.policy, "gpt", device)
    reward = stage_scorer(args.rm, tok, device) if args.selector == "rm" else None
    points = best_of_n_curve(policy.eval(), tok, World(args.seed).test_prompts, ns,
                             reward=reward, max_new_tokens=args.max_new_tokens, seed=args.seed)
    result = {"policy": args.policy, "selector": args.selector if args.selector == "gold"
              else f"rm:{args.rm}", "samples_per_prompt": max(ns), "points": points,
              "seconds": time.time() - t0}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "best_of_n.json"), result)
    for p in points:
        print(f"n {p['n']:3d} | KL {p['kl']:.2f} | gold {p['gold']:.3f} | accuracy "
              f"{p['accuracy']:.3f} | proxy {p['proxy']:+.3f}")
    print(f"wrote {os.path.join(args.out, 'best_of_n.json')}")
    return result


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
