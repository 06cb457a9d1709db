"""Figures of a pipeline run (matplotlib PNGs in DIR/figures/), drawn from the stages' files.

    python -m minirlhf.report out/pipeline        # redraw the figures of a finished run

- `losses.png`:      training (and validation) loss of SFT, the reward model and DPO
- `hacking.png`:     PPO's proxy reward, gold score and KL per iteration, β > 0 beside β = 0
- `frontier.png`:    gold score against KL to the SFT model for every policy (a --sweep adds
                     several β per method: the reward-vs-KL frontier of lecture ch. 5), and
                     the closed-form optimum π_SFT·exp(r/β)/Z at each β as a line, with the
                     labeller's reward (a perfect reward model) and with the trained one;
                     with --all, best-of-n with the reward model as a third line
- `calibration.png`: the reward model's predicted preference probability vs the observed rate
- `rlaif.png`:       with --all and several --judge-pairs: judge quality against the number of
                     human pairs it learnt from, and what it carries into the reward model and PPO
Left out: interactive plots; every figure is a plain PNG a README can link.
"""
from __future__ import annotations

import json
import os

from .config import OneLineParser
from .plots import (plot_calibration, plot_frontier, plot_hacking, plot_losses,
                    plot_overoptimization, plot_rlaif)


def draw_all(run: str, summary: dict, frontier_points: list[dict],
             curve: list[dict] | None = None) -> list[str]:
    out = os.path.join(run, "figures")
    os.makedirs(out, exist_ok=True)
    paths = [plot_losses(run, os.path.join(out, "losses.png")),
             plot_hacking(run, os.path.join(out, "hacking.png")),
             plot_frontier(frontier_points, summary["world"]["optimum_gold"],
                           summary["world"]["demonstrators_gold"],
                           os.path.join(out, "frontier.png"), curve,
                           summary.get("best_of_n", {}).get("points"))]
    rm_eval = os.path.join(run, "rm", "eval.json")
    if os.path.exists(rm_eval):
        rows = json.load(open(rm_eval)).get("calibration")
        if rows:
            paths.append(plot_calibration(rows, os.path.join(out, "calibration.png")))
    if len(summary.get("rlaif_curve", [])) > 1:
        paths.append(plot_rlaif(summary, os.path.join(out, "rlaif.png")))
    if "overoptimization" in summary:
        paths.append(plot_overoptimization(summary["overoptimization"],
                                           os.path.join(out, "overoptimization.png")))
    return paths


def main(argv=None) -> list[str]:
    ap = OneLineParser(prog="python -m minirlhf.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default="out/pipeline",
                    help="a finished pipeline run: the folder holding summary.json")
    args = ap.parse_args(argv)
    path = os.path.join(args.run, "summary.json")
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        paths = draw_all(args.run, summary, summary.get("frontier", []),
                         summary.get("kl_optimum", {}).get("points"))
    except FileNotFoundError:
        ap.error(f"{path}: not found (run python -m minirlhf.pipeline --out {args.run} first)")
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        ap.error(f"{path}: not a pipeline summary this report can draw "
                 f"({type(e).__name__}: {str(e)[:80]})")
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
