"""Reward-model overoptimization (minirlhf/overoptimization.py): Gao et al.'s fits recover their
coefficients and peaks exactly from noise-free curves, the points and the study summary, and
the figure (minirlhf/plots.py)."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minirlhf import overoptimization as O
from minirlhf.plots import plot_overoptimization

D = np.linspace(0.0, 4.0, 15)                            # includes d = 0


def gold_of(d, alpha, beta, form, gold0=0.64):
    """Noise-free gold of Gao et al.'s form at d."""
    d = np.asarray(d, dtype=float)
    if form == "bon":
        return gold0 + d * (alpha - beta * d)
    return gold0 + d * (alpha - beta * np.log(np.where(d > 0, d, 1.0)))


def check_exact(fit, alpha, beta, peak):
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9)
    assert fit["beta"] == pytest.approx(beta, abs=1e-9)
    assert fit["rmse"] < 1e-9
    assert fit["peak_d"] == pytest.approx(peak, rel=1e-9)
    grid = np.linspace(0.0, 3 * peak, 30001)             # numeric argmax of the fitted curve
    curve = O.gao_curve(fit, grid)
    assert abs(grid[np.argmax(curve)] - fit["peak_d"]) <= grid[1]
    assert fit["peak_gold"] == pytest.approx(curve.max(), abs=1e-9)
    assert fit["peak_gold"] >= curve.max() - 1e-12       # the closed form is the true maximum


@settings(deadline=None)
@given(alpha=st.floats(0.05, 3.0), beta=st.floats(0.05, 3.0))
def test_bon_fit_recovers_coefficients_and_peak(alpha, beta):
    fit = O.fit_gao(D, gold_of(D, alpha, beta, "bon"), "bon")
    assert fit["form"] == "bon" and fit["gold0"] == pytest.approx(0.64)
    check_exact(fit, alpha, beta, alpha / (2 * beta))


@settings(deadline=None)
@given(beta=st.floats(0.05, 3.0), log_peak=st.floats(-0.9, 2.0))
def test_rl_fit_recovers_coefficients_and_peak(beta, log_peak):
    alpha = beta * (log_peak + 1)                        # α > 0, peak at exp(α/β − 1)
    fit = O.fit_gao(D, gold_of(D, alpha, beta, "rl"), "rl")
    check_exact(fit, alpha, beta, math.exp(alpha / beta - 1))


def test_gold0_given_or_taken_from_the_start():
    gold = gold_of(D, 0.8, 0.2, "bon", gold0=0.5)
    taken = O.fit_gao(D, gold, "bon")
    given_ = O.fit_gao(D[1:], gold[1:], "bon", gold0=0.5)
    assert taken["gold0"] == given_["gold0"] == pytest.approx(0.5)
    assert given_["alpha"] == pytest.approx(taken["alpha"]) == pytest.approx(0.8)
    shifted = O.fit_gao(D, gold, "bon", gold0=0.4)       # a wrong gold0 shows in the fit
    assert shifted["gold0"] == 0.4 and shifted["rmse"] > 1e-3
    with pytest.raises(ValueError, match="d == 0"):
        O.fit_gao(D[1:], gold[1:], "bon")


def test_rl_ignores_the_d0_point():
    gold = gold_of(D, 0.6, 0.3, "rl", gold0=0.5)
    gold[0] = 99.0                                       # the d = 0 point is not fitted
    fit = O.fit_gao(D, gold, "rl", gold0=0.5)
    assert fit["alpha"] == pytest.approx(0.6, abs=1e-9) and fit["rmse"] < 1e-9
    assert O.gao_curve(fit, [0.0])[0] == pytest.approx(0.5)   # d log d → 0
    bon = O.fit_gao(D, gold, "bon", gold0=0.5)           # ... but best-of-n fits it
    assert bon["rmse"] > 1.0


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_no_peak_when_beta_not_positive(form):
    """β < 0: the curve bends up and never turns (β = 0 exactly fits as ±1e-17, roundoff)."""
    for beta in (-1e-3, -0.2):
        fit = O.fit_gao(D, gold_of(D, 0.5, beta, form), form)
        assert fit["beta"] == pytest.approx(beta, abs=1e-9)
        assert fit["peak_d"] is None and fit["peak_gold"] is None


def test_bon_peak_at_zero_when_alpha_negative():
    fit = O.fit_gao(D, gold_of(D, -0.3, 0.2, "bon"), "bon")
    assert fit["peak_d"] == 0.0 and fit["peak_gold"] == pytest.approx(0.64)


def test_errors():
    with pytest.raises(ValueError, match="unknown form"):
        O.fit_gao(D, D, "ppo")
    with pytest.raises(ValueError, match="at least 2"):
        O.fit_gao([0.0, 1.0], [0.6, 0.7], "bon")
    with pytest.raises(ValueError, match="at least 2"):
        O.fit_gao([0.0, 1.0, 1.0], [0.6, 0.7, 0.7], "rl")
    with pytest.raises(ValueError, match="finite"):
        O.fit_gao([0.0, 1.0, np.nan], [0.6, 0.7, 0.8], "bon")
    with pytest.raises(ValueError, match="finite"):
        O.fit_gao([0.0, 1.0, 2.0], [0.6, np.inf, 0.8], "rl")
    with pytest.raises(ValueError, match="finite"):
        O.fit_gao([1.0, 2.0], [0.6, 0.8], "rl", gold0=float("nan"))
    with pytest.raises(ValueError, match="negative"):
        O.fit_gao([0.0, -1.0, 2.0], [0.6, 0.7, 0.8], "bon")


def test_rl_points_clip_negative_kl_and_sort():
    rows = [{"step": 20, "gold": 0.7, "accuracy": 0.5, "kl": 4.0, "reward": 1.5},
            {"step": 0, "gold": 0.6, "accuracy": 0.4, "kl": 0.0, "reward": 0.0},
            {"step": 10, "gold": 0.65, "accuracy": 0.45, "kl": -0.01, "reward": 0.7}]
    pts = O.rl_points(rows)
    assert [p["step"] for p in pts] == [0, 10, 20]
    assert [p["d"] for p in pts] == [0.0, 0.0, 2.0]
    assert pts[1]["kl"] == -0.01 and pts[2]["proxy"] == 1.5
    assert set(pts[0]) == {"step", "d", "kl", "gold", "accuracy", "proxy"}
    bon = O.bon_points([{"n": 4, "kl": 0.636, "gold": 0.8, "accuracy": 0.6, "proxy": 1.0},
                        {"n": 1, "kl": 0.0, "gold": 0.6, "accuracy": 0.4, "proxy": 0.0}])
    assert [p["n"] for p in bon] == [1, 4] and bon[1]["d"] == pytest.approx(math.sqrt(0.636))


def synthetic_run(peak_d: float, beta: float = 0.3, accuracy: float = 0.7, ds=D) -> dict:
    """A reward model whose RL gold peaks at peak_d (Gao et al.'s rl form) and whose proxy
    rises all along; best-of-n likewise with its own form."""
    alpha = beta * (math.log(peak_d) + 1)
    rl = [{"step": 10 * i, "gold": float(gold_of(d, alpha, beta, "rl")), "accuracy": 0.5,
           "kl": float(d * d), "reward": float(2 * d)} for i, d in enumerate(ds)]
    ns = [1, 2, 4, 8, 16, 32, 64]
    kls = [math.log(n) - (n - 1) / n for n in ns]
    bon = [{"n": n, "kl": kl, "gold": float(gold_of(math.sqrt(kl), 2 * beta * peak_d, beta,
                                                    "bon")),
            "accuracy": 0.5, "proxy": 3 * math.sqrt(kl)} for n, kl in zip(ns, kls)]
    return {"test_accuracy": accuracy, "best_of_n": bon, "rl": rl, "beta": 0.01}


def test_study_summary_peaks_move_right():
    study = O.study_summary({16000: synthetic_run(2.0), 6000: synthetic_run(1.0),
                             48000: synthetic_run(3.0)})
    assert study["sizes"] == [6000, 16000, 48000]
    assert study["peaks_move_right"] is True and study["smallest_falls"] is True
    small = study["reward_models"]["6000"]
    assert small["pairs"] == 6000 and small["beta"] == 0.01
    assert small["rl"]["fit"]["peak_d"] == pytest.approx(1.0)
    assert small["rl"]["peak"]["d"] == pytest.approx(1.0, abs=D[1])
    assert small["rl"]["last"]["d"] == pytest.approx(4.0)
    assert small["best_of_n"]["fit"]["peak_d"] == pytest.approx(1.0)
    assert small["best_of_n"]["peak"]["n"] in (1, 2, 4, 8, 16, 32, 64)
    json.dumps(study)                                    # plain numbers, ready for summary.json


def test_study_summary_reversed():
    study = O.study_summary({6000: synthetic_run(6.0), 16000: synthetic_run(2.0),
                             48000: synthetic_run(1.0)})
    assert study["peaks_move_right"] is False
    assert study["smallest_falls"] is False              # its gold still rises at d = 4
    one = O.study_summary({6000: synthetic_run(1.0)})
    assert one["peaks_move_right"] is None and one["smallest_falls"] is True


def test_smallest_falls_needs_a_rising_proxy():
    run = synthetic_run(1.0)
    for r in run["rl"]:
        r["reward"] = -r["kl"]                           # the proxy falls too: not overoptimized
    assert O.study_summary({6000: run})["smallest_falls"] is False


def failed_study() -> dict:
    run = synthetic_run(1.0)
    run["best_of_n"] = run["best_of_n"][:1]              # n = 1 alone: no fit
    run["rl"] = run["rl"][:2]                            # one point past d = 0: no fit
    return O.study_summary({6000: run})


def test_failed_fits_are_stored_as_errors():
    rm = failed_study()["reward_models"]["6000"]
    assert set(rm["best_of_n"]["fit"]) == {"error"}
    assert "at least 2" in rm["best_of_n"]["fit"]["error"]
    assert set(rm["rl"]["fit"]) == {"error"}
    assert rm["rl"]["peak"]["step"] == 10                # measured peaks do not need a fit


def test_plot_writes_png(tmp_path):
    study = O.study_summary({6000: synthetic_run(1.0, accuracy=0.66),
                             16000: synthetic_run(2.0), 48000: synthetic_run(3.0)})
    study["reward_models"]["16000"]["rl"]["fit"]["peak_d"] = None
    for name, s in (("three.png", study), ("one_failed.png", failed_study())):
        out = plot_overoptimization(s, str(tmp_path / name))
        with open(out, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and (tmp_path / name).stat().st_size > 5000
