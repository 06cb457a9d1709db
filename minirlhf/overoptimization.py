"""Reward-model overoptimization: the gold score as a function of how far the policy moved.

Gao, Schulman, Hilton 2023 ("Scaling Laws for Reward Model Overoptimization") optimise a policy
against a proxy reward model and watch the gold reward as the distance d = √KL(π‖π_init) grows.
The proxy keeps rising; the gold rises, peaks and falls, and the peak moves to larger d as the
reward model gets better (more parameters or more data). Their functional forms (§1), with
R = gold − gold at d = 0 (R(0) = 0):

    best-of-n:  R_bon(d) = d (α − β d)          peak at d* = α / (2β)
    RL:         R_RL(d)  = d (α − β log d)      peak at d* = exp(α/β − 1)

Both are linear in (α, β), so `fit_gao` is an ordinary least-squares fit. `study_summary` fits
and measures the peaks of best-of-n and of a long low-β PPO run for reward models trained on
different numbers of preference pairs; `plots.plot_overoptimization` draws it.

    from minirlhf.overoptimization import fit_gao
    fit_gao(np.sqrt(kl), gold, "rl", gold0=0.64)    # {"alpha", "beta", "peak_d", ...}
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FORMS = ("bon", "rl")


def _basis(d: np.ndarray, form: str) -> np.ndarray:
    """(N, 2) columns multiplying (α, β): R(d) = α·d − β·d² (bon) or α·d − β·d·log d (rl),
    with d·log d = 0 at d = 0, its limit."""
    if form == "bon":
        return np.stack([d, -d * d], axis=1)
    logd = np.log(np.where(d > 0, d, 1.0))
    return np.stack([d, -d * logd], axis=1)


def _finite(name: str, x: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite, got {x.tolist()}")
    return x


def fit_gao(d: Sequence[float], gold: Sequence[float], form: str,
            gold0: float | None = None) -> dict:
    """Least-squares fit of Gao et al.'s R_bon(d) or R_RL(d) (§1, form "bon" / "rl") to the gold
    scores at d = √KL, R = gold − gold0; gold0 is, when not given, the gold at d == 0.
    "rl" fits only the points with d > 0 (log 0). Returns {"form", "alpha", "beta", "gold0",
    "peak_d", "peak_gold", "rmse"}: peak_d the fitted curve's argmax over d ≥ 0, None (with
    peak_gold) when β ≤ 0 and the curve never turns; rmse over the points fitted."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}: expected one of {FORMS}")
    d, gold = np.asarray(d, dtype=float), np.asarray(gold, dtype=float)
    if d.shape != gold.shape or d.ndim != 1:
        raise ValueError(f"d and gold must be 1-d and alike, got {d.shape} and {gold.shape}")
    _finite("d", d), _finite("gold", gold)
    if np.any(d < 0):
        raise ValueError(f"d = √KL cannot be negative, got {d.tolist()}")
    if gold0 is None:
        if not np.any(d == 0):
            raise ValueError("gold0 not given and no point at d == 0 to take it from")
        gold0 = float(gold[d == 0].mean())
    gold0 = float(_finite("gold0", np.asarray(gold0)))
    used = d > 0 if form == "rl" else np.ones_like(d, dtype=bool)
    X, R = _basis(d[used], form), gold[used] - gold0
    if len(np.unique(d[used & (d > 0)])) < 2:
        raise ValueError(f"fitting {form!r} needs at least 2 points with distinct d > 0, "
                         f"got d = {d.tolist()}")
    (alpha, beta), *_ = np.linalg.lstsq(X, R, rcond=None)
    fit = {"form": form, "alpha": float(alpha), "beta": float(beta), "gold0": gold0,
           "peak_d": None, "peak_gold": None,
           "rmse": float(np.sqrt(np.mean((X @ np.array([alpha, beta]) - R) ** 2)))}
    if beta > 0:
        # dR/dd = α − 2βd = 0 (bon), α − β(log d + 1) = 0 (rl); for bon with α ≤ 0 the curve
        # only falls on d ≥ 0, so its argmax there is d = 0.
        peak = max(alpha / (2 * beta), 0.0) if form == "bon" else _exp(alpha / beta - 1)
        if peak is not None:
            fit["peak_d"] = float(peak)
            fit["peak_gold"] = float(gao_curve(fit, np.array([peak]))[0])
    return fit


def _exp(x: float) -> float | None:
    """exp(x), or None past float range (a peak too far away to name)."""
    try:
        return math.exp(x)
    except OverflowError:
        return None


def gao_curve(fit: dict, d: Sequence[float]) -> np.ndarray:
    """The fitted gold gold0 + R(d) at each d (the rl curve at d = 0 is gold0, its limit)."""
    d = np.asarray(d, dtype=float)
    return fit["gold0"] + _basis(d, fit["form"]) @ np.array([fit["alpha"], fit["beta"]])


def _with_d(p: dict) -> float:
    """d = √KL, a KL estimated from samples clipped at 0 (it can come out slightly negative)."""
    return math.sqrt(max(float(p["kl"]), 0.0))


def bon_points(points: Sequence[dict]) -> list[dict]:
    """Best-of-n points {"n", "kl", "gold", "accuracy", "proxy"}, sorted by n, with "d"."""
    return [dict(p, d=_with_d(p)) for p in sorted(points, key=lambda p: p["n"])]


def rl_points(rows: Sequence[dict]) -> list[dict]:
    """PPO evaluation rows {"step", "gold", "accuracy", "kl", "reward"}, sorted by step, as
    {"step", "d", "kl", "gold", "accuracy", "proxy"} (proxy: the reward model's score)."""
    return [{"step": r["step"], "d": _with_d(r), "kl": float(r["kl"]), "gold": float(r["gold"]),
             "accuracy": float(r["accuracy"]), "proxy": float(r["reward"])}
            for r in sorted(rows, key=lambda r: r["step"])]


def _try_fit(points: list[dict], form: str, gold0: float | None = None) -> dict:
    """fit_gao on the points, or {"error": why} when it cannot be made."""
    try:
        return fit_gao([p["d"] for p in points], [p["gold"] for p in points], form, gold0)
    except ValueError as e:
        return {"error": str(e)}


def _peak(points: list[dict], key: str) -> dict | None:
    """The measured point of highest gold (the first of ties): {"d", "gold", key}."""
    best = max(points, key=lambda p: p["gold"], default=None)
    return None if best is None else {"d": best["d"], "gold": best["gold"], key: best[key]}


def _one_rm(size: int, run: dict) -> dict:
    """One reward model's entry of the study: its best-of-n and RL points, fits and peaks."""
    bon, rl = bon_points(run["best_of_n"]), rl_points(run["rl"])
    start = next((p for p in rl if p["step"] == 0), None)
    return {"pairs": size, "test_accuracy": float(run["test_accuracy"]),
            "beta": float(run["beta"]),
            "best_of_n": {"points": bon, "fit": _try_fit(bon, "bon"), "peak": _peak(bon, "n")},
            "rl": {"points": rl, "fit": _try_fit(rl, "rl", start["gold"] if start else None),
                   "peak": _peak(rl, "step"),
                   "last": {k: rl[-1][k] for k in ("d", "gold", "proxy")} if rl else None}}


def _falls(rl: dict) -> bool | None:
    """Overoptimised by the end of the run: gold below its peak while the proxy is above the
    proxy at that peak. None without points."""
    if rl["peak"] is None:
        return None
    at_peak = next(p for p in rl["points"] if p["step"] == rl["peak"]["step"])
    return rl["last"]["gold"] < at_peak["gold"] and rl["last"]["proxy"] > at_peak["proxy"]


def study_summary(per_rm: dict) -> dict:
    """per_rm: {pairs: {"test_accuracy", "best_of_n": [points], "rl": [rows, the step-0 row
    included], "beta"}} -> {"sizes", "reward_models": {str(pairs): ...}, "peaks_move_right",
    "smallest_falls"}: whether the measured RL peak's d never decreases with the reward model's
    training pairs (Gao et al.: a better RM can be pushed further), and whether the
    smallest RM's PPO run ended past its gold peak with its proxy still rising."""
    runs = {int(s): run for s, run in per_rm.items()}
    sizes = sorted(runs)
    rms = {str(s): _one_rm(s, runs[s]) for s in sizes}
    peaks = [rms[str(s)]["rl"]["peak"] for s in sizes]
    move_right = None
    if len(sizes) >= 2 and all(p is not None for p in peaks):
        move_right = all(a["d"] <= b["d"] for a, b in zip(peaks, peaks[1:]))
    return {"sizes": sizes, "reward_models": rms, "peaks_move_right": move_right,
            "smallest_falls": _falls(rms[str(sizes[0])]["rl"]) if sizes else None}
