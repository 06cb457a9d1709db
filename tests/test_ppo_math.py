"""Properties of the RL math: the PPO losses (lecture ch. 4), returns and GAE (ch. 2, 7), the
log-derivative trick and baselines (ch. 3), KL estimators and the KL-penalised optimum (ch. 5,
CS224N notes), and the KL controllers."""
import itertools
import math

import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st

from minirlhf.masking import masked_mean, masked_var, masked_whiten, token_entropy
from minirlhf.rl import (AdaptiveKLController, FixedKLController, bandit_advantages,
                         discounted_returns, discounted_returns_reference, gae, gae_reference,
                         group_baseline_advantages, group_normalized_advantages, kl_k1, kl_k2,
                         kl_k3, kl_loss, kl_penalised_return, kl_penalised_rewards, token_kl)
from train_ppo import (entropy_bonus, explained_variance, grpo_loss, policy_loss, ppo_loss,
                       value_loss)

seeds = st.integers(0, 2**31 - 1)


def span_mask(g, B, T):
    """(B, T) masks shaped like the project's: prompt 0s, a response of 1s (maybe empty), pad 0s."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, T + 1, (1,), generator=g))
        end = int(torch.randint(start, T + 1, (1,), generator=g))
        mask[b, start:end] = True
    return mask


def per_token_batch(seed, B=4, T=7, span=True):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = span_mask(g, B, T) if span else torch.rand(B, T, generator=g) < 0.6
    return rewards, values, mask


# =============================================================================== PPO clipping

def clip_grad(A, r, eps=0.2):
    """Gradient of policy_loss w.r.t. logp for a single token with advantage A and ratio r."""
    old_logp = torch.tensor([[-1.0]], dtype=torch.float64)
    logp = (old_logp + math.log(r)).requires_grad_()
    loss, _ = policy_loss(logp, old_logp, torch.tensor([[A]], dtype=torch.float64),
                          torch.ones(1, 1), eps)
    loss.backward()
    return logp.grad.item()


def test_clipping_four_case_table():
    """The lecture's table (ch. 4): A > 0 with r ≥ 1+ε and A < 0 with r ≤ 1−ε get exactly zero
    gradient; the other two cases get the unclipped gradient ∂(−r·A)/∂log π = −r·A."""
    assert clip_grad(A=+1.0, r=1.3) == 0.0  # good action, already more likely: stop
    assert clip_grad(A=+1.0, r=3.0) == 0.0
    assert clip_grad(A=-1.0, r=0.7) == 0.0  # bad action, already less likely: stop
    assert clip_grad(A=-1.0, r=0.1) == 0.0
    assert math.isclose(clip_grad(A=+1.0, r=0.7), -0.7)  # good action, r < 1+ε: push up
    assert math.isclose(clip_grad(A=-1.0, r=1.3), +1.3)  # bad action, r > 1−ε: push down
    assert math.isclose(clip_grad(A=+2.0, r=1.1), -2.2)  # inside the range: -A·r


@given(seed=seeds, eps=st.sampled_from([0.1, 0.2, 0.3]))
def test_clipped_gradient_per_token_with_token_mean(seed, eps):
    """On a batch: ∂loss/∂logp_t = −A_t·r_t/N where the unclipped term is active
    ((A > 0 and r < 1+ε) or (A < 0 and r > 1−ε)), 0 where it is clipped or masked; N = number of
    real tokens (the loss is a token mean)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 6
    old_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    log_r = 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    A = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    r = log_r.exp()
    assume(mask.any() and ((r - 1).abs() - eps).abs().min() > 1e-6)  # not exactly on a corner
    logp = (old_logp + log_r).requires_grad_()
    loss, _ = policy_loss(logp, old_logp, A, mask, eps)
    loss.backward()
    active = ((A > 0) & (r < 1 + eps)) | ((A < 0) & (r > 1 - eps))
    expected = torch.where(mask & active, -A * r / mask.sum(), 0.0)
    torch.testing.assert_close(logp.grad, expected)


@given(log_r=st.floats(-3, 3), A=st.floats(-10, 10), eps=st.floats(0.01, 0.5))
def test_clipped_objective_is_a_lower_bound(log_r, A, eps):
    """L^CLIP = min(r·A, clip(r)·A) ≤ r·A and ≤ clip(r)·A, and equals one of the two: PPO is a
    pessimistic bound on the unclipped surrogate L^CPI (ch. 4)."""
    r = math.exp(log_r)
    loss, _ = policy_loss(torch.tensor([[log_r]], dtype=torch.float64),
                          torch.zeros(1, 1, dtype=torch.float64),
                          torch.tensor([[A]], dtype=torch.float64), torch.ones(1, 1), eps)
    l_clip = -loss.item()
    clipped = min(max(r, 1 - eps), 1 + eps) * A
    assert l_clip <= r * A + 1e-12 and l_clip <= clipped + 1e-12
    assert math.isclose(l_clip, min(r * A, clipped), rel_tol=1e-12, abs_tol=1e-12)


@given(seed=seeds)
def test_at_ratio_one_ppo_is_the_policy_gradient(seed):
    """With logp = old_logp (r = 1, the first step on fresh samples) the gradient of −loss w.r.t.
    the logits θ is the REINFORCE gradient mean_t A_t·∇_θ log π(a_t) = A_t·(onehot(a_t) − π_t)/N."""
    g = torch.Generator().manual_seed(seed)
    N, K = 5, 4
    theta = torch.randn(N, K, generator=g, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, K, (N,), generator=g)
    A = torch.randn(N, generator=g, dtype=torch.float64)
    logp = theta.log_softmax(-1).gather(-1, actions[:, None]).T  # (1, N)
    loss, stats = policy_loss(logp, logp.detach(), A[None], torch.ones(1, N))
    loss.backward()
    expected = A[:, None] * (F.one_hot(actions, K) - theta.detach().softmax(-1)) / N
    torch.testing.assert_close(-theta.grad, expected)
    assert float(stats["ratio"]) == 1.0 and float(stats["clipfrac"]) == 0.0
    assert float(stats["approx_kl"]) == 0.0


def test_policy_stats_by_hand():
    """approx_kl = mean (r − 1) − log r over real tokens, clipfrac = share with |r − 1| > ε,
    ratio = mean r; the masked token (r = 100) is ignored by all three."""
    r = torch.tensor([[1.0, 1.5, 0.5, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    _, stats = policy_loss(r.log(), torch.zeros_like(r), torch.ones_like(r), mask, clip_eps=0.2)
    k3 = [(x - 1) - math.log(x) for x in (1.0, 1.5, 0.5)]
    assert math.isclose(float(stats["approx_kl"]), sum(k3) / 3, rel_tol=1e-12)
    assert math.isclose(float(stats["clipfrac"]), 2 / 3, rel_tol=1e-6)
    assert math.isclose(float(stats["ratio"]), 1.0, rel_tol=1e-12)


# =============================================================================== value loss

def test_value_loss_and_clipping():
    """Unclipped: ½·mean (V − target)², gradient (V − target)/N. With clip 0.2 around old = 0:
    V = 1, target = 2 -> the clipped V (0.2) is worse, its error 3.24 is used and V gets no
    gradient; V = 1, target = 0.5 -> the unclipped error is larger and is used as is."""
    values = torch.tensor([[1.0, 1.0, 5.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 3, dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.5, -3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask)
    loss.backward()
    assert math.isclose(loss.item(), 0.5 * (1.0 + 0.25) / 2)
    torch.testing.assert_close(values.grad, torch.tensor([[-0.5, 0.25, 0.0]], dtype=torch.float64))

    values.grad = None
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    loss.backward()
    assert math.isclose(loss.item(), 0.5 * (1.8 ** 2 + 0.25) / 2)
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.25, 0.0]], dtype=torch.float64))
    assert math.isclose(float(stats["value_clipfrac"]), 1.0)  # both real tokens moved by 1 > 0.2


def test_value_clipfrac_counts_moves_past_the_clip_range_not_rounding():
    """value_clipfrac is the fraction of tokens with |V − V_old| > clip: a move of 0.1 inside a
    clip range of 0.2 is not clipped, although old + clamp(V − old) differs from V by rounding
    in float32; a move of 0.3 is; without a clip range nothing is."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    _, inside = value_loss(torch.tensor([[0.04]]), torch.tensor([[-0.06]]), torch.zeros(1, 1),
                           mask, clip_range=0.2)
    assert float(inside["value_clipfrac"]) == 0.0
    _, outside = value_loss(torch.tensor([[0.24]]), torch.tensor([[-0.06]]), torch.zeros(1, 1),
                            mask, clip_range=0.2)
    assert float(outside["value_clipfrac"]) == 1.0
    _, unclipped = value_loss(torch.tensor([[5.0]]), torch.tensor([[-0.06]]), torch.zeros(1, 1),
                              mask)
    assert float(unclipped["value_clipfrac"]) == 0.0


@given(seed=seeds)
def test_value_clipping_is_inactive_near_old_values(seed):
    """When every |V − V_old| ≤ clip_range, the clipped and unclipped value losses are equal."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = old + 0.19 * (2 * torch.rand(3, 5, generator=g, dtype=torch.float64) - 1)
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) < 0.7
    plain, _ = value_loss(values, old, returns, mask)
    clipped, _ = value_loss(values, old, returns, mask, clip_range=0.2)
    assert plain.item() == clipped.item()


def test_explained_variance():
    """1 for a perfect value model, 0 for predicting the mean return, negative for a bad one;
    masked positions (garbage) are ignored."""
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == 1.0
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == 0.0
    assert explained_variance(-returns, returns, mask).item() < 0


def test_ppo_loss_is_the_lectures_sum():
    """loss = −(L^CLIP − c1·L^VF + c2·H) from the separate terms; the value model's gradient is
    c1 times that of the value loss alone, and the entropy's gradient is −c2/N per real token."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 5, 7
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    old_logp = -torch.rand(B, T, generator=g)
    logp = old_logp + 0.3 * torch.randn(B, T, generator=g)
    A, returns = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    old_values = torch.randn(B, T, generator=g)
    values = (old_values + 0.5 * torch.randn(B, T, generator=g)).requires_grad_()
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    entropy = token_entropy(logits)
    entropy.retain_grad()
    c1, c2 = 0.3, 0.05
    loss, stats = ppo_loss(logp, old_logp, A, values, old_values, returns, mask, entropy,
                           clip_eps=0.2, vf_coef=c1, ent_coef=c2, value_clip=0.2)
    loss.backward()
    pg, _ = policy_loss(logp, old_logp, A, mask, 0.2)
    vf, _ = value_loss(values, old_values, returns, mask, 0.2)
    h = entropy_bonus(logits, mask)
    torch.testing.assert_close(loss, -(-pg - c1 * vf + c2 * h))
    torch.testing.assert_close(stats["entropy"], h.detach())
    vf_values = values.detach().requires_grad_()
    value_loss(vf_values, old_values, returns, mask, 0.2)[0].backward()
    torch.testing.assert_close(values.grad, c1 * vf_values.grad)
    torch.testing.assert_close(entropy.grad, -c2 * mask / mask.sum())


def test_entropy_bonus():
    """Uniform next-token distributions have entropy ln V; masked positions do not count."""
    logits = torch.zeros(1, 3, 5)
    logits[0, 2, 0] = 1e4  # a certain position, masked out below
    assert math.isclose(entropy_bonus(logits, torch.tensor([[1, 1, 0]])).item(), math.log(5),
                        rel_tol=1e-6)
    assert entropy_bonus(logits, torch.tensor([[0, 0, 1]])).item() == 0.0


# =============================================================================== returns, GAE

@given(seed=seeds, gamma=st.floats(0, 1))
def test_returns_satisfy_the_recursion(seed, gamma):
    """G_t = r_t + γ·G_{t+1} inside each response, G = r at its last token, 0 where masked."""
    rewards, _, mask = per_token_batch(seed)
    G = discounted_returns(rewards, mask, gamma)
    B, T = rewards.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                assert G[b, t] == 0
            elif t + 1 < T and mask[b, t + 1]:
                assert math.isclose(G[b, t], rewards[b, t] + gamma * G[b, t + 1], abs_tol=1e-12)
            else:
                assert G[b, t] == rewards[b, t]


@given(seed=seeds, gamma=st.floats(0, 1), span=st.booleans())
def test_returns_match_the_plain_loop(seed, gamma, span):
    """The vectorised reverse loop equals Σ_k γ^k r_{t+k} summed one step at a time, for
    responses of different lengths and for arbitrary masks (a masked step is skipped)."""
    rewards, _, mask = per_token_batch(seed, span=span)
    torch.testing.assert_close(discounted_returns(rewards, mask, gamma),
                               discounted_returns_reference(rewards, mask, gamma))


def test_returns_by_hand_and_gamma_zero():
    """A worked example: rewards (1, 0, 2) with γ = 0.5 give G = (1.5, 1, 2); with γ = 0 the
    agent is myopic and G = r (ch. 2)."""
    rewards = torch.tensor([[9.0, 1.0, 0.0, 2.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    G = discounted_returns(rewards, mask, gamma=0.5)
    assert G.tolist() == [[0.0, 1.5, 1.0, 2.0, 0.0]]
    assert discounted_returns(rewards, mask, gamma=0.0).tolist() == [[0.0, 1.0, 0.0, 2.0, 0.0]]


@given(seed=seeds, gamma=st.floats(0, 1), lam=st.floats(0, 1), span=st.booleans())
def test_gae_matches_the_plain_loop(seed, gamma, lam, span):
    """Vectorised GAE equals A_t = Σ_k (γλ)^k δ_{t+k} computed one row and step at a time, and
    the returns are A + V on real tokens."""
    rewards, values, mask = per_token_batch(seed, span=span)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    torch.testing.assert_close(ret, torch.where(mask, adv + values, 0.0))


@given(seed=seeds, gamma=st.floats(0, 1))
def test_gae_lambda_one_is_return_minus_value(seed, gamma):
    """λ = 1: A_t = G_t − V(s_t) (Monte Carlo advantage), and the returns are G_t."""
    rewards, values, mask = per_token_batch(seed)
    adv, ret = gae(rewards, values, mask, gamma, lam=1.0)
    G = discounted_returns(rewards, mask, gamma)
    torch.testing.assert_close(adv, torch.where(mask, G - values, 0.0))
    torch.testing.assert_close(ret, G)


@given(seed=seeds, gamma=st.floats(0, 1))
def test_gae_lambda_zero_is_the_td_error(seed, gamma):
    """λ = 0: A_t = δ_t = r_t + γ·V(s_{t+1}) − V(s_t), with V = 0 after the last real token."""
    rewards, values, mask = per_token_batch(seed)
    adv, _ = gae(rewards, values, mask, gamma, lam=0.0)
    next_real = F.pad(mask[:, 1:], (0, 1))
    next_values = torch.where(next_real, F.pad(values[:, 1:], (0, 1)), 0.0)
    delta = rewards + gamma * next_values - values
    torch.testing.assert_close(adv, torch.where(mask, delta, 0.0))


def test_terminal_reward_gives_the_lectures_advantage():
    """Reward only at the last token, γ = λ = 1: A_t = r − V(s_t) at every token (ch. 7)."""
    values = torch.tensor([[0.0, 0.3, -0.2, 0.5]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    mask = torch.tensor([[0, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.7, 2.2, 1.5]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 2.0, 2.0, 2.0]]))


# ======================================================================= the KL-penalised reward

def scored_rollout(seed, B=5, T=8):
    """A rollout's worth of tensors: scores (B,), log π_θ and log π_ref (B, T), and a response
    mask whose responses are not empty (every row has at least one response token)."""
    g = torch.Generator().manual_seed(seed)
    score = 3 * torch.randn(B, generator=g, dtype=torch.float64)
    logp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    ref_logp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(0, T, (1,), generator=g))
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        mask[b, start:end] = True
    return score, logp, ref_logp, mask


@given(seed=seeds, beta=st.floats(0, 2))
def test_kl_penalised_rewards_sum_to_score_minus_beta_kl(seed, beta):
    """Σ_t r_t over a response = r_φ(x, y) − β·Σ_t (log π_θ(y_t) − log π_ref(y_t)) (ch. 5), each
    response token carries −β·KL_t (the last one r_φ too), and masked positions carry 0."""
    score, logp, ref_logp, mask = scored_rollout(seed)
    rewards = kl_penalised_rewards(score, logp, ref_logp, mask, beta)
    kl = ((logp - ref_logp) * mask).sum(-1)  # (B,) by hand
    torch.testing.assert_close(rewards.sum(-1), score - beta * kl)
    assert torch.all(rewards[~mask] == 0)
    last = torch.tensor([int(row.nonzero().max()) for row in mask])
    for b in range(len(score)):
        for t in mask[b].nonzero().flatten().tolist():
            expected = -beta * (logp[b, t] - ref_logp[b, t]) + (score[b] if t == last[b] else 0)
            assert math.isclose(float(rewards[b, t]), float(expected), abs_tol=1e-12)
    torch.testing.assert_close(kl_penalised_return(score, token_kl(logp, ref_logp, mask), beta),
                               rewards.sum(-1))


@given(seed=seeds, beta=st.floats(0, 2))
def test_zero_kl_leaves_the_score_on_the_last_token_only(seed, beta):
    """When π_θ = π_ref (every KL_t = 0) the per-token reward is r_φ(x, y) on each response's last
    token and 0 everywhere else, whatever β; with β = 0 the same holds for any policy."""
    score, logp, ref_logp, mask = scored_rollout(seed)
    for rewards in (kl_penalised_rewards(score, logp, logp.clone(), mask, beta),
                    kl_penalised_rewards(score, logp, ref_logp, mask, 0.0)):
        expected = torch.zeros_like(rewards)
        for b in range(len(score)):
            expected[b, int(mask[b].nonzero().max())] = score[b]
        assert torch.equal(rewards, expected)


@given(seed=seeds, beta=st.floats(0, 2))
def test_gae_with_gamma_lambda_one_on_kl_penalised_rewards_is_the_bandit_form(seed, beta):
    """With γ = λ = 1, GAE on the per-token rewards gives at a response's first token
    A = Σ_t r_t − V(s_0) = r_φ − β·KL − V(x): the lecture's γ = 0 advantage (ch. 7), and the
    return there is R = r_φ − β·KL, the value model's target at the prompt."""
    score, logp, ref_logp, mask = scored_rollout(seed)
    values = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed + 1),
                         dtype=torch.float64)
    rewards = kl_penalised_rewards(score, logp, ref_logp, mask, beta)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    first = mask.long().argmax(-1)  # (B,) first response token
    rows = torch.arange(len(score))
    A, R = bandit_advantages(score, token_kl(logp, ref_logp, mask), values[rows, first], beta)
    torch.testing.assert_close(adv[rows, first], A)
    torch.testing.assert_close(ret[rows, first], R)


def test_bandit_advantage_is_reward_minus_value_of_the_prompt():
    """A = R − V(x) with R = r_φ(x, y) − β·KL(y) (lecture ch. 7, γ = 0), by hand."""
    score = torch.tensor([1.0, -0.5])
    kl = torch.tensor([[0.0, 0.2, 0.3, 0.0], [0.0, 0.0, -0.1, 0.5]])  # (B, T), 0 off the response
    v_x = torch.tensor([0.25, -1.0])
    A, R = bandit_advantages(score, kl, v_x, beta=0.1)
    torch.testing.assert_close(R, torch.tensor([1.0 - 0.1 * 0.5, -0.5 - 0.1 * 0.4]))
    torch.testing.assert_close(A, R - v_x)
    A0, R0 = bandit_advantages(score, kl, torch.zeros(2), beta=0.0)  # β = 0, V = 0: A = r_φ
    assert torch.equal(A0, score) and torch.equal(R0, score)


@given(seed=seeds, beta=st.floats(0, 1),
       advantage=st.sampled_from(["gae", "bandit", "group", "grpo"]),
       kl_in=st.sampled_from(["reward", "loss"]), group_std=st.booleans())
def test_compute_advantages_calls_the_lecture_steps(seed, beta, advantage, kl_in, group_std):
    """train_ppo.compute_advantages is the lecture's step 3 and nothing more: GAE on
    `kl_penalised_rewards` (gae), A = R − V(x) from `bandit_advantages` on every response token
    with V(x) regressed onto R at the prompt (bandit), or the leave-one-out baseline on
    R = r_φ − β·KL (group, no value target); whitened over the rollout's real tokens. GRPO:
    `group_normalized_advantages` of R − β·KL (--kl-in reward) or of R alone (--kl-in loss: the
    KL is grpo_loss's term), not whitened again."""
    import types
    from minirlhf.distributed import Dist
    from train_ppo import PPOConfig, Rollout, compute_advantages
    if kl_in == "loss" and advantage in ("gae", "bandit"):
        kl_in = "reward"  # --kl-in loss needs a critic-free advantage
    k, P = 2, 2  # samples per prompt; prompt length: responses start at column P − 1 of (B, T-1)
    score, logp, ref_logp, _ = scored_rollout(seed, B=4, T=7)
    g = torch.Generator().manual_seed(seed + 2)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for b in range(4):
        mask[b, P - 1:P - 1 + int(torch.randint(1, 7 - P + 2, (1,), generator=g))] = True
    values = torch.randn(4, 7, generator=g, dtype=torch.float64)
    kl = token_kl(logp, ref_logp, mask)
    ro = Rollout(["x"] * 4, types.SimpleNamespace(prompt_len=P), mask, logp, ref_logp, values,
                 kl, score, score, {}, [""] * 4)
    cfg = PPOConfig(advantage=advantage, samples_per_prompt=k, gamma=1.0, lam=0.9, kl_in=kl_in,
                    group_std=group_std or advantage != "grpo")
    adv, returns, value_mask = compute_advantages(ro, beta, cfg, Dist(0, 1, torch.device("cpu")))
    b_r = beta if kl_in == "reward" else 0.0  # the β of the reward
    if advantage == "gae":
        raw, want_returns = gae(kl_penalised_rewards(score, logp, ref_logp, mask, beta), values,
                                mask, 1.0, 0.9)
        assert torch.equal(value_mask, mask)
    else:
        if advantage == "bandit":
            A, R = bandit_advantages(score, kl, values[:, P - 1], beta)
        elif advantage == "group":
            A, R = group_baseline_advantages(kl_penalised_return(score, kl, b_r), k), None
        else:
            A = group_normalized_advantages(kl_penalised_return(score, kl, b_r), k, group_std)
            R = None
        raw = torch.where(mask, A[:, None].expand_as(logp), 0.0)
        want_returns = torch.zeros_like(values)
        want_value_mask = torch.zeros_like(mask)
        if R is not None:
            want_returns[:, P - 1], want_value_mask[:, P - 1] = R, True
        assert torch.equal(value_mask, want_value_mask)
    torch.testing.assert_close(returns, want_returns)
    want = raw if advantage == "grpo" else masked_whiten(raw, mask)
    torch.testing.assert_close(adv, want)


@given(seed=seeds, gamma=st.floats(0, 1), lam=st.floats(0, 1), span=st.booleans())
def test_masked_positions_do_not_leak(seed, gamma, lam, span):
    """Rewriting rewards and values at masked positions (huge numbers) changes no output at a
    real position, and every masked output is 0."""
    rewards, values, mask = per_token_batch(seed, span=span)
    g = torch.Generator().manual_seed(seed + 1)
    junk = lambda x: torch.where(mask, x, 1e6 * torch.randn(x.shape, generator=g, dtype=x.dtype))
    rewards2, values2 = junk(rewards), junk(values)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv2, ret2 = gae(rewards2, values2, mask, gamma, lam)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)
    assert torch.equal(discounted_returns(rewards, mask, gamma),
                       discounted_returns(rewards2, mask, gamma))
    assert torch.all(adv2[~mask] == 0) and torch.all(ret2[~mask] == 0)


@given(seed=seeds, shift_mean=st.booleans())
def test_masked_whiten_uses_real_tokens_only(seed, shift_mean):
    """After whitening the real tokens have variance 1 and mean 0 (or their old mean with
    shift_mean=False); masked tokens come back as 0 and their content does not matter."""
    _, x, mask = per_token_batch(seed, span=False)
    assume(mask.sum() >= 2 and masked_var(x, mask) > 1e-3)
    white = masked_whiten(x, mask, shift_mean=shift_mean)
    expected_mean = 0.0 if shift_mean else masked_mean(x, mask).item()
    assert math.isclose(masked_mean(white, mask).item(), expected_mean, abs_tol=1e-6)
    assert math.isclose(masked_var(white, mask).item(), 1.0, rel_tol=1e-5)
    assert torch.all(white[~mask] == 0)
    torch.testing.assert_close(masked_whiten(torch.where(mask, x, 1e6), mask, shift_mean), white)


# =============================================================================== ch. 3: REINFORCE

def categorical_setup():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(4, generator=g, dtype=torch.float64)
    R = torch.tensor([10.0, 11.0, 13.0, 10.5], dtype=torch.float64)  # a large common offset
    return g, theta, R


def test_log_derivative_trick_matches_the_exact_gradient():
    """∇_θ E_{a~π_θ}[R(a)] computed exactly (autograd through Σ_a π(a)R(a)) equals the
    Monte-Carlo mean of ∇log π(a)·R(a) over samples a ~ π, within 5 standard errors; the PPO loss
    at r = 1 with A = R produces exactly that sample mean (ch. 3, step 5)."""
    g, theta, R = categorical_setup()
    theta = theta.requires_grad_()
    (theta.softmax(-1) * R).sum().backward()
    exact, theta.grad = theta.grad.clone(), None

    N = 20_000
    a = torch.multinomial(theta.detach().softmax(-1), N, replacement=True, generator=g)
    logp = theta.log_softmax(-1)[a][None]  # (1, N)
    loss, _ = policy_loss(logp, logp.detach(), R[a][None], torch.ones(1, N))
    loss.backward()
    mc = -theta.grad

    per_sample = R[a, None] * (F.one_hot(a, 4) - theta.detach().softmax(-1))  # (N, K)
    torch.testing.assert_close(mc, per_sample.mean(0))
    se = per_sample.std(0) / math.sqrt(N)
    assert torch.all((mc - exact).abs() < 5 * se)


def test_constant_baseline_keeps_the_mean_and_lowers_the_variance():
    """Subtracting b = E[R] leaves E[∇log π·(R − b)] = ∇E[R] (exactly, by enumeration) and lowers
    the estimator's variance E‖g‖² − ‖E g‖² (ch. 3, "baseline subtraction")."""
    _, theta, R = categorical_setup()
    pi = theta.softmax(-1)
    score = torch.eye(4, dtype=torch.float64) - pi  # row a: ∇_θ log π(a)

    def mean_and_variance(b):
        g = (R - b)[:, None] * score  # (K, K) per-action gradient estimate
        mean = (pi[:, None] * g).sum(0)
        return mean, (pi * (g ** 2).sum(-1)).sum() - (mean ** 2).sum()

    mean_plain, var_plain = mean_and_variance(0.0)
    mean_base, var_base = mean_and_variance((pi * R).sum())
    torch.testing.assert_close(mean_base, mean_plain)
    assert var_base < 0.1 * var_plain


def test_leave_one_out_baseline_is_unbiased():
    """With k samples per prompt, E[(1/k) Σ_i ∇log π(a_i)·A_i] over all K^k joint draws equals
    ∇E[R] exactly for RLOO advantages; the naive group mean, which includes R_i in its own
    baseline, shrinks the gradient by (k − 1)/k."""
    _, theta, R = categorical_setup()
    K, k = 4, 3
    pi = theta.softmax(-1)
    score = torch.eye(K, dtype=torch.float64) - pi
    exact = (pi[:, None] * R[:, None] * score).sum(0)
    rloo, naive = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
    for draw in itertools.product(range(K), repeat=k):
        a = torch.tensor(draw)
        p = pi[a].prod()
        rloo += p * (group_baseline_advantages(R[a], k)[:, None] * score[a]).mean(0)
        naive += p * ((R[a] - R[a].mean())[:, None] * score[a]).mean(0)
    torch.testing.assert_close(rloo, exact)
    torch.testing.assert_close(naive, exact * (k - 1) / k)


@given(seed=seeds, k=st.integers(2, 5), n_groups=st.integers(1, 4))
def test_group_baseline_is_leave_one_out(seed, k, n_groups):
    """A_i = R_i − mean of the other k − 1 rewards of its group (checked by a loop), so each
    group's advantages sum to 0 and equal k/(k−1)·(R_i − group mean)."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(n_groups * k, generator=g, dtype=torch.float64)
    A = group_baseline_advantages(R, k)
    for i in range(len(R)):
        group = list(range(i // k * k, i // k * k + k))
        others = [float(R[j]) for j in group if j != i]
        assert math.isclose(A[i], R[i] - sum(others) / (k - 1), abs_tol=1e-12)
    torch.testing.assert_close(A.reshape(-1, k).sum(-1), torch.zeros(n_groups, dtype=torch.float64))


# =============================================================================== KL estimators

@given(seed=seeds, k=st.integers(2, 6), n_groups=st.integers(1, 4))
def test_grpo_advantages_have_zero_mean_and_unit_std_per_group(seed, k, n_groups):
    """A_i = (R_i − mean)/(std + ε) within each prompt's group: every group has mean 0 and
    std s/(s + ε) = 1 up to ε, s its rewards' std."""
    g = torch.Generator().manual_seed(seed)
    R = 3 * torch.randn(n_groups * k, generator=g, dtype=torch.float64) + 5
    A = group_normalized_advantages(R, k).reshape(n_groups, k)
    s = R.reshape(n_groups, k).std(-1, unbiased=False)
    torch.testing.assert_close(A.mean(-1), torch.zeros(n_groups, dtype=torch.float64))
    torch.testing.assert_close(A.std(-1, unbiased=False), s / (s + 1e-8))
    for i in range(n_groups):  # by hand, group by group
        r = R[i * k:(i + 1) * k]
        torch.testing.assert_close(A[i], (r - r.mean()) / (r.std(unbiased=False) + 1e-8))


def test_grpo_constant_groups_give_zero_advantage_and_no_nan():
    """A group whose k rewards are equal (all right, all wrong) carries no signal: exactly 0."""
    R = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    A = group_normalized_advantages(R, 3)
    assert torch.isfinite(A).all()
    assert torch.equal(A[:3], torch.zeros(3)) and torch.equal(A[6:], torch.zeros(3))
    assert A[3] < 0 < A[4]


@given(seed=seeds, k=st.integers(2, 6), n_groups=st.integers(1, 4))
def test_grpo_without_std_is_rloo_up_to_the_leave_one_out_factor(seed, k, n_groups):
    """Without the std, R_i − mean = (k − 1)/k · (R_i − mean of the other k − 1): RLOO's
    advantage (lecture ch. 3, baseline subtraction) scaled by (k − 1)/k."""
    R = torch.randn(n_groups * k, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    torch.testing.assert_close(group_normalized_advantages(R, k, use_std=False),
                               (k - 1) / k * group_baseline_advantages(R, k))


@given(logp=st.floats(-20, 0), d=st.floats(-10, 10))
def test_k3_value_and_gradient_match_a_float64_reference(logp, d):
    """GRPO's KL term in the loss is k3 = ratio − 1 − log ratio, ratio = π_ref/π_θ; its
    gradient with respect to log π_θ is 1 − ratio. float32 against a float64 hand computation."""
    lp = torch.tensor(logp, dtype=torch.float32, requires_grad=True)
    ref = torch.tensor(logp + d, dtype=torch.float32)
    k3 = kl_k3(lp, ref)
    k3.backward()
    ratio = math.exp(d)
    assert math.isclose(k3.item(), ratio - 1 - d, rel_tol=1e-5, abs_tol=1e-5)
    assert math.isclose(lp.grad.item(), 1 - ratio, rel_tol=1e-5, abs_tol=1e-5)


@given(seed=seeds, beta=st.floats(0, 2), ent_coef=st.floats(0, 0.1))
def test_grpo_loss_is_the_clipped_surrogate_plus_beta_times_the_k3_term(seed, beta, ent_coef):
    """grpo_loss = −L^CLIP + β·mean_t k3 − c2·H over response tokens, and the gradient of its
    KL term with respect to each log π_θ(y_t) is β·(1 − π_ref/π_θ)/n (n response tokens),
    against a float64 hand computation."""
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 5
    logp = (-3 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logp.detach() + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    ent = torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    loss, stats = grpo_loss(logp, old, ref, adv, mask, ent, beta, 0.2, ent_coef)
    pg, _ = policy_loss(logp, old, adv, mask, 0.2)
    n = int(mask.sum())
    m = mask.double()
    k3 = ((ref - logp).exp() - 1 - (ref - logp)).detach()
    want = pg + beta * (k3 * m).sum() / n - ent_coef * (ent * m).sum() / n
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(stats["kl_loss"], (k3 * m).sum() / n)
    lp = logp.detach().clone().requires_grad_(True)
    (beta * kl_loss(lp, ref, mask)).backward()
    want_grad = torch.where(mask, beta * (1 - (ref - lp.detach()).exp()) / n, 0.0)
    torch.testing.assert_close(lp.grad, want_grad)


def test_kl_loss_is_zero_with_zero_gradient_at_the_reference():
    """At π_θ = π_ref the k3 term is 0 and pulls nowhere; away from it, it is positive."""
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = kl_loss(logp, logp.detach(), mask)
    loss.backward()
    assert loss.item() == 0 and torch.equal(logp.grad, torch.zeros_like(logp))
    assert kl_loss(logp, logp.detach() + 0.3, mask).item() > 0


@given(seed=seeds)
def test_grpo_loss_without_beta_is_ppos_surrogate_without_a_critic(seed):
    """With β = 0 (the KL in the reward) and no value model, grpo_loss is L_PPO with L^VF = 0:
    RLOO trains through the same clipped surrogate as PPO."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(4, 6, generator=g)
    old = logp + 0.2 * torch.randn(4, 6, generator=g)
    adv = torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.8
    mask[0, 0] = True
    zeros = torch.zeros_like(logp)
    loss, _ = grpo_loss(logp, old, logp - 1, adv, mask, None, 0.0)
    want, _ = ppo_loss(logp, old, adv, zeros, zeros, zeros, mask,
                       value_mask=torch.zeros_like(mask))
    torch.testing.assert_close(loss, want)


def test_k1_and_k3_are_unbiased():
    """For a ~ π: mean k1 and mean k3 equal KL(π‖π_ref) = Σ π log π/π_ref within 5 standard
    errors (200k samples, random categoricals far apart)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        logp_all = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)
        ref_all = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)
        kl = (logp_all.exp() * (logp_all - ref_all)).sum().item()
        a = torch.multinomial(logp_all.exp(), 200_000, replacement=True, generator=g)
        for estimator in (kl_k1, kl_k3):
            k = estimator(logp_all[a], ref_all[a])
            se = k.std().item() / math.sqrt(len(a))
            assert abs(k.mean().item() - kl) < 5 * se, estimator.__name__


def test_near_the_reference_k3_has_low_variance_and_k2_small_bias():
    """Schulman's trade-off: for π close to π_ref, k3 (unbiased) has a far smaller spread than k1,
    and k2's exact expectation Σ π·½(log ratio)² is within 10% of the KL; far from π_ref k2 is
    visibly biased (off by more than 10%)."""
    g = torch.Generator().manual_seed(1)
    logp_all = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)
    for scale, k2_close in ((0.1, True), (2.0, False)):
        noise = scale * torch.randn(6, generator=g, dtype=torch.float64)
        ref_all = (logp_all + noise).log_softmax(-1)
        pi = logp_all.exp()
        kl = (pi * kl_k1(logp_all, ref_all)).sum().item()
        expected_k2 = (pi * kl_k2(logp_all, ref_all)).sum().item()
        assert (abs(expected_k2 - kl) < 0.1 * kl) == k2_close
        if k2_close:
            std = lambda k: math.sqrt((pi * (k - kl) ** 2).sum().item())  # exact spread
            assert std(kl_k3(logp_all, ref_all)) < 0.2 * std(kl_k1(logp_all, ref_all))


@given(logp=st.floats(-60, 0), d=st.floats(-30, 30), dtype=st.sampled_from([torch.float32,
                                                                             torch.float64]))
def test_k2_k3_are_never_negative(logp, d, dtype):
    """k3 = (ratio − 1) − log ratio ≥ 0 and k2 ≥ 0 for any pair of log-probs, in float32 too
    (including tiny differences, where exp(x) − 1 − x would round below 0)."""
    lp = torch.tensor([logp], dtype=dtype)
    ref = lp + torch.tensor([d], dtype=dtype)
    assert kl_k3(lp, ref).item() >= 0 and kl_k2(lp, ref).item() >= 0


@given(seed=seeds)
def test_estimators_vanish_when_policies_agree(seed):
    """π = π_ref: k1 = k2 = k3 = 0 on every token."""
    logp = -torch.rand(3, 5, generator=torch.Generator().manual_seed(seed)) * 10
    for estimator in (kl_k1, kl_k2, kl_k3):
        assert torch.all(estimator(logp, logp.clone()) == 0)


# =============================================================================== ch. 5 optimum

def bandit(seed=0, K=5):
    g = torch.Generator().manual_seed(seed)
    ref_logp = torch.randn(K, generator=g, dtype=torch.float64).log_softmax(-1)
    r = torch.randn(K, generator=g, dtype=torch.float64)
    return g, ref_logp, r


def closed_form_optimum(ref_logp, r, beta):
    return (ref_logp + r / beta).softmax(-1)  # π* = π_ref·exp(r/β)/Z, CS224N notes


def exact_kl_penalised_loss(theta, ref_logp, r, beta):
    """The policy loss for the exact expectation over the K arms: the per-sample reward
    r(a) − β·k1(a) (ch. 5, ch. 7 step 2), a baseline E[R], PPO's policy_loss at r = 1. A token mean
    over arms weighted by K·π(a) is the expectation Σ_a π(a)·(...)."""
    K = len(theta)
    logp = theta.log_softmax(-1)  # (K,) log π(a)
    with torch.no_grad():
        pi = logp.exp()
        R = r - beta * kl_k1(logp, ref_logp)  # KL-penalised reward of each arm
        A = R - (pi * R).sum()  # advantage with baseline b = E[R]
    loss, _ = policy_loss(logp[None], logp.detach()[None], (K * pi * A)[None], torch.ones(1, K))
    return loss


def test_kl_penalised_policy_gradient_vanishes_at_the_closed_form_optimum():
    """At π* = π_ref·exp(r/β)/Z the policy gradient of E[r] − β·KL(π‖π_ref) is exactly 0, and at
    π_ref it is not (so the test below has something to do)."""
    _, ref_logp, r = bandit()
    for beta in (0.3, 1.0, 3.0):
        theta = closed_form_optimum(ref_logp, r, beta).log().requires_grad_()
        exact_kl_penalised_loss(theta, ref_logp, r, beta).backward()
        assert theta.grad.abs().max() < 1e-12
        theta = ref_logp.clone().requires_grad_()
        exact_kl_penalised_loss(theta, ref_logp, r, beta).backward()
        assert theta.grad.abs().max() > 1e-3


def test_exact_policy_gradient_converges_to_the_closed_form_optimum():
    """A tabular softmax policy started at π_ref and trained with Adam on the exact expectation of
    the KL-penalised policy gradient reaches π_ref·exp(r/β)/Z (total variation < 0.02)."""
    _, ref_logp, r = bandit()
    beta = 0.5
    theta = ref_logp.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.01, total_iters=1500)
    for _ in range(1500):
        loss = exact_kl_penalised_loss(theta, ref_logp, r, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    pi_star = closed_form_optimum(ref_logp, r, beta)
    tv = 0.5 * (theta.detach().softmax(-1) - pi_star).abs().sum().item()
    tv_start = 0.5 * (ref_logp.exp() - pi_star).abs().sum().item()
    assert tv_start > 0.2 and tv < 0.02


def test_sampled_rlhf_loop_converges_to_the_closed_form_optimum():
    """The RLHF recipe on a one-step bandit with samples: draw k answers per prompt from π_θ,
    reward r − β·k1 against π_ref, leave-one-out advantages, PPO's policy_loss, Adam. The policy
    ends at π_ref·exp(r/β)/Z up to total variation < 0.02. (Sampling noise dies out near the
    optimum: there r(a) − β·log π*(a)/π_ref(a) = β·log Z for every arm, so all advantages are 0.)"""
    g, ref_logp, r = bandit()
    beta, n_prompts, k, iters = 0.5, 64, 8, 400
    theta = ref_logp.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.02, total_iters=iters)
    for _ in range(iters):
        with torch.no_grad():  # rollout: sample and score
            a = torch.multinomial(theta.softmax(-1), n_prompts * k, replacement=True, generator=g)
            old_logp = theta.log_softmax(-1)[a]  # (N,)
            R = r[a] - beta * kl_k1(old_logp, ref_logp[a])  # KL-penalised reward, ch. 7 step 2
            A = group_baseline_advantages(R, k)  # (N,)
        logp = theta.log_softmax(-1)[a]
        loss, _ = policy_loss(logp[None], old_logp[None], A[None], torch.ones(1, len(a)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    pi_star = closed_form_optimum(ref_logp, r, beta)
    tv = 0.5 * (theta.detach().softmax(-1) - pi_star).abs().sum().item()
    assert tv < 0.02


# =============================================================================== KL controllers

def test_adaptive_kl_controller_moves_beta_the_right_way():
    """KL above target raises β, below lowers it, at target keeps it; one update changes β by at
    most ±20%·n_steps/horizon (the clip), as in Ziegler et al."""
    def after(kl, n_steps=100):
        ctl = AdaptiveKLController(kl_coef=0.1, target=6.0, horizon=1000)
        return ctl.update(kl, n_steps)

    assert after(12.0) > 0.1 and after(1.0) < 0.1 and after(6.0) == 0.1
    assert math.isclose(after(7.2), 0.1 * (1 + 0.2 * 0.1))  # error 0.2 exactly
    assert math.isclose(after(600.0, n_steps=1000), 0.1 * 1.2)  # clipped at +20%
    assert math.isclose(after(0.0, n_steps=1000), 0.1 * 0.8)  # clipped at −20%


def test_kl_controllers_round_trip_through_state_dict():
    """A controller rebuilt from state_dict() continues exactly like the original; the fixed
    controller never moves."""
    ctl = AdaptiveKLController(kl_coef=0.2, target=4.0, horizon=500)
    for kl in (10.0, 8.0, 3.0):
        ctl.update(kl, 64)
    clone = AdaptiveKLController(kl_coef=1.0, target=1.0, horizon=1.0)
    clone.load_state_dict(ctl.state_dict())
    assert [ctl.update(5.0, 64), ctl.update(2.0, 64)] == [clone.update(5.0, 64),
                                                          clone.update(2.0, 64)]
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05 and fixed.kl_coef == 0.05
    restored = FixedKLController(1.0)
    restored.load_state_dict(fixed.state_dict())
    assert restored.kl_coef == 0.05
