"""Properties of the Bradley–Terry preference model and reward-model loss (lecture ch. 6)."""
import math

import numpy as np
import pytest
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


probs = st.floats(0, 1, allow_nan=False)


@given(st.lists(st.tuples(rewards, rewards, probs), min_size=1, max_size=8))
def test_label_probability_loss_is_the_expected_loss_over_the_labellers_coin(pairs):
    """With p_chosen = q the loss is what the lecture's loss averages to over a labeller who
    prefers a with probability q: q·L(a ≻ b) + (1 − q)·L(b ≻ a), pair by pair; q = 1 is the
    lecture's loss itself; ∂L/∂Δ = (σ(Δ) − q)/B, zero exactly where σ(Δ) matches q."""
    r_a = as_tensor([p[0] for p in pairs]).requires_grad_()
    r_b = as_tensor([p[1] for p in pairs]).requires_grad_()
    q = as_tensor([p[2] for p in pairs])
    loss, stats = reward_loss(r_a, r_b, q)
    per_pair = [qi * reward_loss(a[None], b[None])[0] + (1 - qi) * reward_loss(b[None], a[None])[0]
                for a, b, qi in zip(r_a.detach(), r_b.detach(), q)]
    torch.testing.assert_close(loss, torch.stack(per_pair).mean())
    lecture, _ = reward_loss(r_a, r_b)
    torch.testing.assert_close(reward_loss(r_a, r_b, torch.ones_like(q))[0], lecture)
    assert math.isclose(float(stats["accuracy"]), (r_a > r_b).double().mean().item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="shape"):  # a (B, 1) p would broadcast to (B, B)
        reward_loss(r_a, r_b, q[:, None])
    loss.backward()
    g = (torch.sigmoid(r_a - r_b).detach() - q) / len(pairs)
    torch.testing.assert_close(r_a.grad, g)
    torch.testing.assert_close(r_b.grad, -g)


def test_label_probability_loss_is_finite_for_huge_reward_differences_float32():
    """The cross-entropy form stays finite at |Δ| = 1e4 in float32, for any label probability."""
    r_w = torch.tensor([1e4, -1e4, 1e4, -1e4], requires_grad=True)
    r_l = torch.zeros(4)
    q = torch.tensor([0.9, 0.9, 0.0, 1.0])
    loss, _ = reward_loss(r_w, r_l, q)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(r_w.grad).all()
    assert math.isclose(loss.item(), (0.1 * 1e4 + 0.9 * 1e4 + 1e4 + 1e4) / 4, rel_tol=1e-5)


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


class _Tok:
    pad_id = 0


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=10)
       .map(lambda ps: [(a, b) for a, b in ps if a != b] or [(0, 1)]))
def test_shared_sequences_are_scored_once_with_the_same_rewards_and_gradients(index_pairs):
    """pair_batch scores each distinct sequence once (a prompt's k responses make k(k−1)/2
    pairs): the rewards and the Bradley–Terry loss's gradients equal those of scoring every pair
    on its own, chosen and rejected each in a batch of one (the plain reference path)."""
    from minirlhf.model import GPTConfig, ScalarHeadModel
    from train_rm import pair_batch, score_pairs
    torch.manual_seed(0)
    rm = ScalarHeadModel(GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2,
                                   n_embd=8)).double()  # float64 scores: equal to the last bit
    gen = torch.Generator().manual_seed(1)
    pool = [torch.randint(1, 16, (n,), generator=gen).tolist() for n in (3, 5, 4, 7, 2, 6)]
    pairs = [(pool[a], pool[b]) for a, b in index_pairs]
    tokens, attn_mask, chosen, rejected = pair_batch(pairs, _Tok, None)
    assert len(tokens) == len({i for ab in index_pairs for i in ab})  # each sequence once
    r = rm.score(tokens, attn_mask)                      # as score_pairs does, in float64 here
    r_c, r_r = r[chosen], r[rejected]
    loss, _ = reward_loss(r_c, r_r)
    grads = torch.autograd.grad(loss, list(rm.parameters()))

    def alone(seq):
        return rm.score(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.bool))[0]
    ref_c = torch.stack([alone(c) for c, _ in pairs])
    ref_r = torch.stack([alone(r) for _, r in pairs])
    ref_loss, _ = reward_loss(ref_c, ref_r)
    ref_grads = torch.autograd.grad(ref_loss, list(rm.parameters()))
    torch.testing.assert_close(r_c, ref_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_r, ref_r, rtol=1e-12, atol=1e-12)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)
    # score_pairs (autocast, float32 rewards) reads the same rows
    s_c, s_r = score_pairs(rm.score, pairs, _Tok, torch.device("cpu"))
    torch.testing.assert_close(s_c, ref_c.float())
    torch.testing.assert_close(s_r, ref_r.float())


def test_pair_groups_are_the_pairs_of_one_prompts_responses():
    """pair_groups joins consecutive pairs that share a response (the layout --make-pairs writes:
    a prompt's k responses, then the next prompt's) and keeps unrelated pairs apart."""
    from minirlhf.training import pair_groups
    a, b, c, d, e, f, g = ([i] for i in range(7))
    pairs = [(a, b), (c, a), (a, d), (b, c), (d, b), (c, d),   # k = 4: six pairs of a, b, c, d
             (e, f),                                          # k = 2: one pair
             (g, a), (f, g)]       # a is the first group's, not this one's; g joins them
    assert pair_groups(pairs) == [[0, 1, 2, 3, 4, 5], [6], [7, 8]]
    assert pair_groups([(a, b), (c, d)]) == [[0], [1]]
    assert pair_groups(pairs, max_size=4) == [[0, 1, 2, 3], [4, 5], [6], [7, 8]]
    assert pair_groups([(a, b, 3), (b, c, 3)]) == [[0, 1]]  # DPO's (chosen, rejected, n_prompt)


@given(st.lists(st.integers(1, 7), min_size=1, max_size=40), st.integers(1, 20),
       st.integers(0, 3))
def test_group_batches_keep_groups_whole_and_cover_every_pair_once(sizes, batch_size, epoch):
    """Each epoch's batches are unions of whole groups, hold every pair exactly once, and are
    the same when drawn again (a resumed run reads the same batches)."""
    from minirlhf.training import group_batches
    groups, start = [], 0
    for k in sizes:
        groups.append(list(range(start, start + k)))
        start += k
    lengths = np.random.default_rng(0).integers(1, 50, size=start)
    batches = group_batches(3, epoch, groups, lengths, batch_size)
    group_of = {i: j for j, g in enumerate(groups) for i in g}
    seen = np.concatenate(batches)
    assert len(seen) == len(set(seen.tolist()))                     # no pair twice
    kept = {group_of[i] for i in seen.tolist()}
    assert sorted(seen.tolist()) == sorted(i for j in kept for i in groups[j])  # whole groups
    dropped = len(groups) - len(kept)            # epoch_batches drops a ragged last batch only
    assert dropped < max(1, round(batch_size * len(groups) / start))  # < one batch
    assert all(np.array_equal(x, y) for x, y in
               zip(batches, group_batches(3, epoch, groups, lengths, batch_size)))
