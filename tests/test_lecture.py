"""The lecture's simulations (minirlhf/lecture.py) run, draw their figure, and compute the
numbers the lecture's chapters 2-7 say they should."""
import math
import os

import numpy as np
import pytest

from minirlhf import lecture


def test_returns_match_a_hand_computation(tmp_path):
    """Rewards [1, 0, 0, 0, 10] at γ = 0.9: G_t = Σ_k γ^k r_(t+k), so G_0 = 1 + 0.9^4·10 = 7.561
    and G_4 = 10; G_0 is r_0 at γ = 0 and Σ r_t at γ = 1; the figure is written."""
    res = lecture.returns_calculator([1, 0, 0, 0, 10], 0.9, str(tmp_path))
    assert res["G0"] == pytest.approx(1 + 0.9 ** 4 * 10)
    assert res["returns"] == pytest.approx([7.561, 7.29, 8.1, 9.0, 10.0])
    assert res["G0_curve"][0] == pytest.approx(1.0) and res["G0_curve"][-1] == pytest.approx(11.0)
    assert os.path.isfile(res["figure"])


def test_returns_command_line_takes_rewards_and_gamma(tmp_path):
    """`returns --rewards 0 0 4 --gamma 0.5` gives G = [1, 2, 4] and writes returns.png to --out."""
    res = lecture.main(["returns", "--rewards", "0", "0", "4", "--gamma", "0.5",
                        "--out", str(tmp_path)])
    assert res["returns"] == pytest.approx([1.0, 2.0, 4.0])
    assert os.path.isfile(tmp_path / "returns.png")


def test_reinforce_learns_to_go_right(tmp_path):
    """From a uniform policy, 200 REINFORCE episodes make P(right) the largest probability and
    above 0.5, and episodes get shorter (the goal is at the right edge)."""
    res = lecture.reinforce(episodes=200, out=str(tmp_path), every=100)
    assert res["history"][0] == pytest.approx([1 / 3] * 3)
    final = res["final"]
    assert final["right"] > 0.5 and final["right"] > max(final["left"], final["stay"])
    assert np.mean(res["steps"][-20:]) < np.mean(res["steps"][:20])
    assert os.path.isfile(res["figure"])


def test_reinforce_is_deterministic_for_a_seed(tmp_path):
    """The same seed gives the same policy after the same episodes; another seed does not."""
    a = lecture.reinforce(episodes=30, seed=3, out=str(tmp_path), every=30)
    b = lecture.reinforce(episodes=30, seed=3, out=str(tmp_path), every=30)
    c = lecture.reinforce(episodes=30, seed=4, out=str(tmp_path), every=30)
    assert a["history"] == b["history"]
    assert a["history"] != c["history"]


@pytest.mark.parametrize("eps, advantage", [(0.2, 1.0), (0.2, -1.0), (0.3, 2.0), (0.1, -0.5)])
def test_clip_objective_is_flat_beyond_the_clip_region_and_has_slope_A_inside(
        tmp_path, eps, advantage):
    """L^CLIP(r) = min(r·A, clip(r, 1−ε, 1+ε)·A) (from train_ppo.policy_loss) has dL/dr = 0 for
    r > 1+ε when A > 0 and for r < 1−ε when A < 0, and dL/dr = A everywhere else (lecture ch. 4
    table); both regions are sampled."""
    res = lecture.ppo_clip(eps, advantage, str(tmp_path))
    r, grad = np.array(res["r"]), np.array(res["grad"])
    flat = r > 1 + eps if advantage > 0 else r < 1 - eps
    assert flat.sum() > 10 and (~flat).sum() > 10
    assert np.array(res["flat"]).tolist() == flat.tolist()
    assert np.all(grad[flat] == 0)
    assert grad[~flat] == pytest.approx(np.full((~flat).sum(), advantage))
    expected = np.minimum(r * advantage, np.clip(r, 1 - eps, 1 + eps) * advantage)
    assert res["objective"] == pytest.approx(expected.tolist())
    assert os.path.isfile(res["figure"])


def test_clip_command_line_sign_flips_the_advantage(tmp_path):
    """`clip --sign -` evaluates A = −1: the objective at r = 0.5 is the clipped −(1−ε)."""
    res = lecture.main(["clip", "--sign", "-", "--eps", "0.2", "--out", str(tmp_path)])
    assert res["advantage"] == -1.0
    row = next(t for t in res["table"] if t["r"] == 0.5)
    assert row["objective"] == pytest.approx(-0.8) and row["grad"] == 0


def test_kl_optimum_is_the_closed_form_and_kl_shrinks_with_beta(tmp_path):
    """π* = π_ref·exp(r/β)/Z; KL(π*‖π_ref) ≥ 0 and falls as β grows while E_π*[r] falls too;
    J(π*) = E[r] − β·KL equals β·log Z; the sampled k1/k3 estimates are near the exact KL; DPO's
    implicit reward margin between the best and worst arm is their reward gap."""
    beta = 0.1
    res = lecture.kl_tradeoff(beta, out=str(tmp_path))
    r, ref = np.array(res["rewards"]), np.array(res["ref"])
    pi = ref * np.exp(r / beta)
    pi /= pi.sum()
    assert res["pi_star"] == pytest.approx(pi.tolist(), abs=1e-12)
    assert res["kl"] == pytest.approx(float(np.sum(pi * np.log(pi / ref))))
    kl_curve, reward_curve = np.array(res["kl_curve"]), np.array(res["reward_curve"])
    assert np.all(kl_curve >= 0)
    assert np.all(np.diff(kl_curve) <= 1e-12) and kl_curve[0] > kl_curve[-1] + 1
    assert np.all(np.diff(reward_curve) <= 1e-12) and reward_curve[0] > reward_curve[-1]
    assert res["objective"] == pytest.approx(beta * res["log_z"])
    assert res["kl_k1_sampled"] == pytest.approx(res["kl"], abs=0.1)
    assert res["kl_k3_sampled"] == pytest.approx(res["kl"], abs=0.1)
    assert res["dpo_margin"] == pytest.approx(max(r) - min(r))
    assert os.path.isfile(res["figure"])


def test_bradley_terry_at_the_lecture_defaults(tmp_path):
    """r_w = 1.5, r_l = −0.5: P(y_w ≻ y_l) = σ(2) and L_RM = −log σ(2) = softplus(−2); swapping
    the two gives 1 − σ(2)."""
    res = lecture.bradley_terry(out=str(tmp_path))
    assert res["p"] == pytest.approx(1 / (1 + math.exp(-2)))
    assert res["loss"] == pytest.approx(math.log1p(math.exp(-2)))
    assert lecture.bradley_terry(-0.5, 1.5, str(tmp_path))["p"] == pytest.approx(
        1 - 1 / (1 + math.exp(-2)))
    assert os.path.isfile(res["figure"])


def test_rlhf_step_reports_consistent_shapes_and_trains_only_policy_and_value(tmp_path):
    """One traced RLHF iteration: tokens and response mask are (B, T); every per-token tensor is
    (B, T−1); score and KL per response are (B,); each response's per-token rewards add up to
    r_φ − β·KL; gradients reach π_θ and V_ψ but not π_ref or r_φ; the first PPO step is
    on-policy (ratio 1, clipfrac 0) and moves the policy."""
    res = lecture.rlhf_step(max_new_tokens=6, out=str(tmp_path))
    s, B, T = res["shapes"], res["B"], res["T"]
    assert B == len(lecture.RLHF_PROMPTS)
    assert res["prompt_len"] < T <= res["prompt_len"] + 6
    assert s["tokens"] == s["response_mask"] == (B, T)
    for name in ("mask", "old_logp", "ref_logp", "values", "kl", "rewards", "advantages",
                 "returns", "logp", "entropy"):
        assert s[name] == (B, T - 1), name
    assert s["score"] == s["kl_per_response"] == (B,)
    assert 0 < res["n_response_tokens"] <= B * 6
    assert res["got_grad"] == {"policy π_θ": True, "reference π_ref": False,
                               "reward r_φ": False, "value V_ψ": True}
    assert res["stats"]["ratio"] == pytest.approx(1.0) and res["stats"]["clipfrac"] == 0
    assert res["after"]["approx_kl"] > 0
    for row, score, kl in zip(res["rewards"], res["score"], res["kl_per_response"]):
        assert sum(row) == pytest.approx(score - 0.05 * kl)  # Σ_t r_t = r_φ − β·KL, β = 0.05
    assert os.path.isfile(res["figure"])


def test_list_names_every_simulation_and_bad_values_give_one_line(capsys):
    """`list` prints every simulation's name; `kl --beta 0` exits 2 with a one-line error."""
    lecture.main(["list"])
    out = capsys.readouterr().out
    for name in ("returns", "reinforce", "clip", "kl", "bradley-terry", "rlhf-step"):
        assert name in out
    with pytest.raises(SystemExit) as e:
        lecture.main(["kl", "--beta", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--beta" in err
