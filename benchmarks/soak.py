"""Long-run soak: PPO for 10x its default iterations, with the process's memory sampled every
iteration. A leak (a tensor list that grows, a graph kept alive, a metrics buffer) shows up as RSS
that climbs iteration after iteration; a healthy run levels off after warm-up.

    python -m minirlhf.pipeline --out out/pipeline          # once: the SFT and RM stages
    python benchmarks/soak.py --sft out/pipeline/sft --rm out/pipeline/rm --json
    python benchmarks/soak.py ... --iterations 200          # a shorter soak

Prints one JSON object: peak RSS, RSS after warm-up and at the end, and the growth per iteration
(least-squares slope of RSS over the second half of the run, KiB per iteration), with the wall time.
RSS is read from /proc/self/status (Linux); it is sampled at the start of each iteration's rollout,
by wrapping the sampler call that train_ppo.py makes once per iteration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_ppo  # noqa: E402


def rss_kib() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in KiB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", default="out/pipeline/sft", help="SFT stage folder")
    ap.add_argument("--rm", default="out/pipeline/rm", help="reward-model stage folder")
    ap.add_argument("--iterations", type=int, default=None,
                    help="PPO iterations (default: 10x train_ppo's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="PPO output folder (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args()
    for name in ("sft", "rm"):
        if not os.path.exists(os.path.join(getattr(args, name), "checkpoint.pt")):
            sys.exit(f"soak: error: no checkpoint in --{name} {getattr(args, name)}: run "
                     f"`python -m minirlhf.pipeline --out out/pipeline` first")
    torch.set_num_threads(args.threads)
    iterations = args.iterations or 10 * train_ppo.PPOConfig().iterations

    samples = []  # (iteration, rss KiB, seconds since start)
    t0 = time.time()
    real_generate = train_ppo.generate

    def sampled_generate(*a, **kw):  # called once per iteration, at the start of the rollout
        samples.append((len(samples), rss_kib()[0], time.time() - t0))
        return real_generate(*a, **kw)

    train_ppo.generate = sampled_generate
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "ppo")
        argv = ["--sft", args.sft, "--rm", args.rm, "--out", out,
                "--iterations", str(iterations)]
        if args.json:
            import contextlib
            import io
            with contextlib.redirect_stdout(io.StringIO()):
                train_ppo.main(argv)
        else:
            train_ppo.main(argv)
    wall = time.time() - t0
    train_ppo.generate = real_generate

    end_rss = rss_kib()[0]
    samples = samples[:iterations]  # the sampler also runs once after training (printed samples)
    it = np.array([s[0] for s in samples], dtype=float)
    rss = np.array([s[1] for s in samples], dtype=float)
    half = len(samples) // 2
    slope = float(np.polyfit(it[half:], rss[half:], 1)[0]) if len(samples) >= 4 else None
    warm = min(10, len(samples) - 1)
    result = {
        "benchmark": "soak",
        "iterations": iterations,
        "threads": args.threads,
        "torch": torch.__version__,
        "wall_s": round(wall, 1),
        "s_per_iteration": round(wall / iterations, 3),
        "peak_rss_mib": round(rss_kib()[1] / 1024, 1),
        "rss_mib_at_iteration": {str(int(it[i])): round(rss[i] / 1024, 1)
                                 for i in sorted({0, warm, half, len(samples) - 1})},
        "rss_growth_kib_per_iteration_second_half": None if slope is None else round(slope, 2),
        "rss_growth_mib_second_half": round((rss[-1] - rss[half]) / 1024, 2),
        "rss_mib_after_final_evaluation": round(end_rss / 1024, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
