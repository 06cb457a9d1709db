"""Properties of the Bradley–Terry preference model and reward-model loss (lecture ch. 6)."""
import math

import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from train_rm import preference_probability, reward_loss

rewards = st.floats(-30, 30, allow_nan=False)


def as_tensor(xs, dtype=torch.float64):
    return torch.tensor(xs, dtype=dtype)


@given(st.lists(st.tuples(rewards, rewards), min_size=1, max_size=8))
def test_preference_probabilities_sum_to_one(pairs):
    """P(a ≻ b) + P(b ≻ a) = 1: one of the two responses is preferred."""
    r_a, r_b = as_tensor([p[0] for p in pairs]), as_tensor([p[1] for p in pairs])
    total = preference_probability(r_a, r_b) + preference_probability(r_b, r_a)
    torch.testing.assert_close(total, torch.ones_like(total))


@given(st.lists(rewards, min_size=1, max_size=8))
def test_equal_rewards_are_a_coin_flip(rs):
    """Equal rewards: P = 0.5 (the lecture's quiz) and the loss is ln 2; no pair is "correct"."""
    r = as_tensor(rs)
    assert torch.all(preference_probability(r, r) == 0.5)
    loss, stats = reward_loss(r, r.clone())
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-12)
    assert float(stats["accuracy"]) == 0.0 and float(stats["margin"]) == 0.0


@given(st.lists(st.tuples(rewards, rewards), min_size=1, max_size=8), st.floats(-100, 100))
def test_loss_is_shift_invariant(pairs, c):
    """Adding the same constant to both rewards changes neither P nor the loss (only Δ counts)."""
    r_w, r_l = as_tensor([p[0] for p in pairs]), as_tensor([p[1] for p in pairs])
    loss, _ = reward_loss(r_w, r_l)
    shifted, _ = reward_loss(r_w + c, r_l + c)
    assert math.isclose(loss.item(), shifted.item(), rel_tol=1e-9, abs_tol=1e-9)
    torch.testing.assert_close(preference_probability(r_w + c, r_l + c),
                               preference_probability(r_w, r_l))


@given(st.lists(st.tuples(rewards, rewards), min_size=1, max_size=8))
def test_loss_is_softplus_of_minus_delta(pairs):
    """−log σ(Δ) = softplus(−Δ) = log(1 + e^{−Δ}), averaged over the batch; the stats are the
    batch means of Δ, r_w, r_l and of [Δ > 0]."""
    r_w, r_l = as_tensor([p[0] for p in pairs]), as_tensor([p[1] for p in pairs])
    delta = r_w - r_l
    loss, stats = reward_loss(r_w, r_l)
    expected = sum(math.log1p(math.exp(-d)) for d in delta.tolist()) / len(pairs)
    assert math.isclose(loss.item(), expected, rel_tol=1e-9)
    torch.testing.assert_close(loss, F.softplus(-delta).mean())
    assert math.isclose(float(stats["margin"]), delta.mean().item(), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(float(stats["accuracy"]), (delta > 0).double().mean().item(), rel_tol=1e-6)
    assert float(stats["chosen_reward"]) == r_w.mean().item()
    assert float(stats["rejected_reward"]) == r_l.mean().item()


@given(st.lists(st.tuples(rewards, rewards), min_size=1, max_size=8))
def test_gradients(pairs):
    """∂L/∂r_w = −σ(−Δ)/B and ∂L/∂r_l = +σ(−Δ)/B: the winner is pushed up, the loser down, and
    a pair already ranked by a wide margin hardly moves."""
    r_w = as_tensor([p[0] for p in pairs]).requires_grad_()
    r_l = as_tensor([p[1] for p in pairs]).requires_grad_()
    loss, _ = reward_loss(r_w, r_l)
    loss.backward()
    s = torch.sigmoid(-(r_w - r_l)).detach() / len(pairs)
    torch.testing.assert_close(r_w.grad, -s)
    torch.testing.assert_close(r_l.grad, s)


def test_finite_for_huge_reward_differences_float32():
    """|Δ| up to 1e4 in float32: the loss is finite (≈ 1e4 for a badly wrong pair, 0 for a right
    one) and so are the gradients; the naive −log(sigmoid(Δ)) would give inf here."""
    r_w = torch.tensor([1e4, -1e4, 5e3, 0.0], requires_grad=True)
    r_l = torch.tensor([0.0, 0.0, -5e3, 1e4], requires_grad=True)
    loss, _ = reward_loss(r_w, r_l)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(r_w.grad).all() and torch.isfinite(r_l.grad).all()
    assert math.isclose(loss.item(), (0 + 1e4 + 0 + 1e4) / 4, rel_tol=1e-6)
    assert torch.isinf(-torch.log(torch.sigmoid(torch.tensor(-1e4))))  # what we avoid


def test_linear_reward_model_recovers_the_true_reward():
    """Fit r(x) = w·x with the Bradley–Terry loss on pairs whose labels are sampled from BT with a
    known linear reward w*·x. The fit ranks held-out pairs by w* almost always (> 0.9), the learned
    w points along w* (cosine > 0.9, i.e. correlation of weights), and its held-out accuracy on
    noisy BT labels is near the Bayes limit E[max(σ(Δ*), 1 − σ(Δ*))], far above chance."""
    g = torch.Generator().manual_seed(0)
    d, n_train, n_test = 6, 4000, 4000
    w_true = torch.randn(d, generator=g)

    def make_pairs(n):
        x_a, x_b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        p_a = preference_probability(x_a @ w_true, x_b @ w_true)  # BT probability a ≻ b
        a_wins = torch.rand(n, generator=g) < p_a
        chosen = torch.where(a_wins[:, None], x_a, x_b)
        rejected = torch.where(a_wins[:, None], x_b, x_a)
        return chosen, rejected

    chosen, rejected = make_pairs(n_train)
    w = torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(300):
        loss, _ = reward_loss(chosen @ w, rejected @ w)
        opt.zero_grad()
        loss.backward()
        opt.step()

    test_chosen, test_rejected = make_pairs(n_test)
    with torch.no_grad():
        _, stats = reward_loss(test_chosen @ w, test_rejected @ w)
        delta_true = (test_chosen - test_rejected) @ w_true
        delta_fit = (test_chosen - test_rejected) @ w
        bayes = torch.maximum(torch.sigmoid(delta_true), torch.sigmoid(-delta_true)).mean()
        ranks_like_truth = ((delta_fit > 0) == (delta_true > 0)).float().mean()
        cosine = F.cosine_similarity(w, w_true, dim=0)
    assert float(stats["accuracy"]) > 0.75
    assert float(stats["accuracy"]) > bayes.item() - 0.03
    assert ranks_like_truth.item() > 0.9
    assert cosine.item() > 0.9
