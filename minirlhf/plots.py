"""The figures the stages draw (matplotlib PNGs), each a function of files or rows.

- `plot_losses`:      training (and validation) loss of SFT, the reward model and DPO
- `plot_hacking`:     PPO's proxy reward, gold score and KL per iteration, β > 0 beside β = 0
- `plot_frontier`:    gold score against KL to the SFT model for every policy, with the
                      closed-form optimum π_SFT·exp(r/β)/Z at each β as a line (lecture ch. 5)
- `plot_calibration`: the reward model's predicted preference probability vs the observed rate
- `plot_rlaif`:       RLAIF per judge size: the judge's agreement and accuracy, the accuracy of
                      the reward model trained on its labels, and PPO's gold with that model
- `plot_overoptimization`: gold (measured, Gao et al.'s fit) and proxy against √KL for best-of-n
                      and PPO, one line per reward-model size (minirlhf/overoptimization.py)

`train_rm.py` draws its calibration figure from here; `minirlhf/report.py` draws a whole
pipeline run's figures. Left out: interactive plots; every figure is a plain PNG.
"""
from __future__ import annotations

import os

import numpy as np

from .overoptimization import gao_curve
from .training import read_metrics
from .world import BT_TEMPERATURE


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finish(fig, path: str) -> str:
    """Lay the figure out, write it as a PNG and free it; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def _rows(path, split):
    if not os.path.exists(path):
        return []
    return [r for r in read_metrics(path) if r.get("split") == split]


def plot_losses(run: str, path: str) -> str:
    """Training and validation loss of SFT, the reward model and DPO, like with like: for DPO
    the DPO term alone ("dpo_loss") where the log has it, since RPO's NLL is a training term."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, stage, title in zip(axes, ("sft", "rm", "dpo"),
                                ("SFT: masked cross-entropy", "Reward model: −log σ(r_w − r_l)",
                                 "DPO: −log σ(β·margin)")):
        metrics = os.path.join(run, stage, "metrics.jsonl")
        for split, style in (("train", "-"), ("val", "o--")):
            rows = _rows(metrics, split)
            key = "dpo_loss" if rows and "dpo_loss" in rows[0] else "loss"
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=split,
                        markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set(xlabel="step", ylabel="loss (nats)")
        if ax.has_data():
            ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_hacking(run: str, path: str) -> str:
    """Proxy (reward model), gold and KL per PPO iteration: with β = 0 the proxy keeps rising
    while the gold score falls (lecture ch. 5, reward hacking)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for stage, label, color in (("ppo", "PPO, β > 0", "tab:blue"),
                                ("ppo_no_kl", "PPO, β = 0", "tab:red")):
        rows = _rows(os.path.join(run, stage, "metrics.jsonl"), "train")
        if not rows:
            continue
        its = [r["step"] for r in rows]
        for ax, key in zip(axes, ("proxy", "gold", "kl")):
            ax.plot(its, [r[key] for r in rows], color=color, label=label, lw=1.2)
    for ax, title, ylabel in zip(axes, ("proxy reward r_φ (what PPO maximises)",
                                        "gold score (what we wanted)", "KL(π_θ ‖ π_ref)"),
                                 ("reward-model score, rollout mean", "gold score, rollout mean",
                                  "KL per response (nats)")):
        ax.set_title(title, fontsize=10)
        ax.set(xlabel="PPO iteration", ylabel=ylabel)
        if ax.has_data():
            ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_frontier(points: list[dict], optimum: float, demonstrators: float, path: str,
                  curve: list[dict] | None = None, best_of_n: list[dict] | None = None) -> str:
    """points: {"label", "method", "kl", "gold"}; one marker style per method.
    curve: {"beta", "kl", "gold"} of the closed-form optimum π_SFT·exp(r/β)/Z, drawn as a line,
    and its "reward_model" points (the same optimum with the trained reward model) as a second.
    best_of_n: {"n", "kl", "gold"} of best-of-n with the reward model, a third line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if curve:
        curve = sorted(curve, key=lambda c: c["kl"])
        ax.plot([c["kl"] for c in curve], [c["gold"] for c in curve], "-", color="tab:purple",
                lw=1, alpha=0.7, label="π* at each β (perfect reward)")
        for c in spaced(curve):
            ax.annotate(f"β={c['beta']:g}", (c["kl"], c["gold"]), fontsize=6,
                        color="tab:purple", xytext=(2, -8), textcoords="offset points")
        rm_curve = sorted((dict(c["reward_model"], beta=c["beta"]) for c in curve
                           if "reward_model" in c), key=lambda c: c["kl"])
        if rm_curve:
            ax.plot([c["kl"] for c in rm_curve], [c["gold"] for c in rm_curve], "--",
                    color="tab:orange", lw=1, alpha=0.8, label="π* at each β (trained RM)")
            for c in spaced(rm_curve):
                ax.annotate(f"β={c['beta']:g}", (c["kl"], c["gold"]), fontsize=6,
                            color="tab:orange", xytext=(2, 3), textcoords="offset points")
    if best_of_n:
        ax.plot([b["kl"] for b in best_of_n], [b["gold"] for b in best_of_n], ".-",
                color="tab:olive", lw=1, alpha=0.8, label="best-of-n (reward model picks)")
        for b in spaced(best_of_n[1:], min_gap=0.15):
            ax.annotate(f"n={b['n']}", (b["kl"], b["gold"]), fontsize=6, color="tab:olive",
                        xytext=(2, -9), textcoords="offset points")
    styles = {"SFT": ("k", "s"), "PPO": ("tab:blue", "o"), "PPO β=0": ("tab:red", "x"),
              "DPO": ("tab:green", "^"), "PPO gold": ("tab:cyan", "*"), "RFT": ("tab:olive", "D"),
              "GRPO": ("tab:brown", "v"), "GRPO RM": ("tab:pink", "v"),
              "RLAIF": ("tab:gray", "P"), "DPO online": ("darkgreen", "^")}
    seen = set()
    for p in points:
        color, marker = styles.get(p["method"], ("gray", "."))
        ax.scatter(p["kl"], p["gold"], c=color, marker=marker, s=40,
                   label=p["method"] if p["method"] not in seen else None)
        seen.add(p["method"])
        if p.get("label"):
            ax.annotate(p["label"], (p["kl"], p["gold"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    ax.axhline(optimum, color="gray", ls="--", lw=1, label="optimum")
    ax.axhline(demonstrators, color="gray", ls=":", lw=1, label="demonstrators")
    ax.set_xlabel("KL to the SFT model (nats per response)")
    ax.set_ylabel("gold score (test prompts, T = 1)")
    ax.set_title("Gold score vs KL", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside the data
    return _finish(fig, path)


def spaced(points: list[dict], min_gap: float = 0.04) -> list[dict]:
    """The points, sorted by KL, whose labels do not crowd the one before: each kept point lies
    at least `min_gap` of the KL range and of the gold range away from the last kept one."""
    if not points:
        return []
    kl_span = max(p["kl"] for p in points) - min(p["kl"] for p in points) or 1.0
    gold_span = max(p["gold"] for p in points) - min(p["gold"] for p in points) or 1.0
    kept = []
    for p in sorted(points, key=lambda p: p["kl"]):
        if not kept or (abs(p["kl"] - kept[-1]["kl"]) / kl_span > min_gap
                        or abs(p["gold"] - kept[-1]["gold"]) / gold_span > min_gap):
            kept.append(p)
    return kept


def plot_calibration(rows: list[dict], path: str) -> str:
    """Predicted against observed preference rate per bin, each bin labelled with its count."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot([r["predicted"] for r in rows], [r["observed"] for r in rows], "o-",
            label="reward model")
    for r in rows:
        if "n" in r:
            ax.annotate(f"n={r['n']}", (r["predicted"], r["observed"]), fontsize=6,
                        xytext=(4, -9), textcoords="offset points")
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.set_xlabel("predicted P(a ≻ b) = σ(r_a − r_b)")
    ax.set_ylabel("observed rate a was chosen")
    ax.set_title("Reward model calibration (test pairs)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    return _finish(fig, path)


def plot_rlaif(summary: dict, path: str) -> str:
    """RLAIF against the number of human pairs the judge learnt from (lecture ch. 8, "limited
    by judge model quality"): left, the judge's test accuracy, its agreement with the human
    labels and the accuracy of the reward model trained on its labels, beside the human-label
    reward model and the Bayes limit; right, the gold of PPO with that reward model, beside PPO
    with the human-label reward model."""
    plt = _plt()
    curve = summary["rlaif_curve"]
    n = [c["judge_pairs"] for c in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
    for key, label, style in (("judge_test_accuracy", "judge: test accuracy", "o-"),
                              ("judge_agreement", "judge: agreement with human labels", "s-"),
                              ("rm_test_accuracy", "RM on the judge's labels: test accuracy",
                               "^-")):
        left.plot(n, [c[key] for c in curve], style, label=label, markersize=4)
    rm, bayes = summary["rm"]["test_accuracy"], curve[0]["bayes_accuracy"]
    left.axhline(rm, color="tab:blue", ls="--", lw=1, label="RM on human labels (48000 pairs)")
    left.axhline(bayes, color="gray", ls=":", lw=1, label="Bayes limit")
    left.axhline(curve[0]["human_agreement"], color="gray", ls="-.", lw=1,
                 label="two human labellers agree")
    right.plot(n, [c["gold"] for c in curve], "o-", color="tab:gray", label="PPO on RLAIF's RM")
    right.axhline(summary["ppo"]["gold"], color="tab:blue", ls="--", lw=1,
                  label="PPO on the human-label RM")
    right.axhline(summary["sft"]["gold"], color="k", ls=":", lw=1, label="SFT")
    for ax, title, ylabel in ((left, "Labels from an AI judge", "accuracy / agreement"),
                              (right, "PPO with the RLAIF reward model", "gold (test, T = 1)")):
        ax.set_xscale("log")
        ax.set_xticks(n, [str(x) for x in n])
        ax.minorticks_off()
        ax.set(xlabel="human-labelled pairs the judge learnt from", ylabel=ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below
    return _finish(fig, path)


def _overopt_panel(ax, points: list[dict], fit: dict, peak: dict | None, color) -> None:
    """One reward model on one panel: measured gold (markers, solid), Gao et al.'s fitted curve
    (dotted), the proxy in gold units aligned at d = 0 (dashed) and the measured peak (star).
    Points are joined in order of d: a PPO run's KL can step back between evaluations."""
    if not points:
        return
    points = sorted(points, key=lambda p: p["d"])
    d = [p["d"] for p in points]
    ax.plot(d, [p["gold"] for p in points], "o-", color=color, markersize=3, lw=1.2)
    if "error" not in fit:
        grid = np.linspace(0.0, max(d), 200)
        ax.plot(grid, gao_curve(fit, grid), ":", color=color, lw=1)
    start = min(points, key=lambda p: p["d"])            # n = 1 / step 0: d = 0
    ax.plot(d, [start["gold"] + BT_TEMPERATURE * (p["proxy"] - start["proxy"]) for p in points],
            "--", color=color, lw=1, alpha=0.8)
    if peak is not None:
        ax.plot(peak["d"], peak["gold"], "*", color=color, markersize=11, markeredgecolor="k",
                markeredgewidth=0.5)


def plot_overoptimization(study: dict, path: str) -> str:
    """Reward-model overoptimization (Gao, Schulman, Hilton 2023) from
    overoptimization.study_summary: gold against d = √KL(π‖π_SFT) for best-of-n (left) and a
    long low-β PPO run (right), one colour per reward-model size; the proxy, dashed, is
    converted to gold units (×T) and aligned at d = 0, so the gap is the overoptimization."""
    from matplotlib.lines import Line2D
    plt = _plt()
    fig, (bon_ax, rl_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("viridis")
    sizes, rms = study["sizes"], study["reward_models"]
    for i, size in enumerate(sizes):
        rm, color = rms[str(size)], colors(i / max(len(sizes) - 1, 1) * 0.85)
        for ax, method in ((bon_ax, "best_of_n"), (rl_ax, "rl")):
            m = rm[method]
            _overopt_panel(ax, m["points"], m["fit"], m["peak"], color)
        bon_ax.plot([], [], "o-", color=color, markersize=3,
                    label=f"{size} pairs (acc {rm['test_accuracy']:.2f})")
    betas = sorted({rms[str(s)]["beta"] for s in sizes})
    rl_title = "RL (PPO, β = " + ", ".join(f"{b:g}" for b in betas) + ")"
    for ax, title in ((bon_ax, "Best-of-n"), (rl_ax, rl_title)):
        ax.set_title(title, fontsize=10)
        ax.set(xlabel="d = √KL(π‖π_SFT) (nats$^{1/2}$)",
               ylabel=f"gold score (proxy ×T = {BT_TEMPERATURE:g}, dashed)")
    styles = [Line2D([], [], color="k", marker="o", markersize=3, lw=1.2, label="gold, measured"),
              Line2D([], [], color="k", ls=":", lw=1, label="Gao et al. fit"),
              Line2D([], [], color="k", ls="--", lw=1, label="proxy ×T, aligned at d = 0"),
              Line2D([], [], color="k", marker="*", ls="", markersize=9, label="gold peak")]
    if sizes:
        bon_ax.legend(fontsize=7, loc="best")
    rl_ax.legend(handles=styles, fontsize=7, loc="best")
    return _finish(fig, path)
