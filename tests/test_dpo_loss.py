"""Properties of the DPO loss (lecture ch. 8, CS224N notes) and its IPO / conservative variants."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from train_dpo import dpo_loss, dpo_loss_single_ratio
from train_rm import reward_loss

logps = st.lists(st.tuples(*[st.floats(-50, 0)] * 4), min_size=1, max_size=6)
betas = st.floats(0.01, 5.0)


def unpack(rows, requires_grad=False):
    """(policy_chosen, policy_rejected, ref_chosen, ref_rejected), each (B,) float64."""
    cols = [torch.tensor(c, dtype=torch.float64, requires_grad=requires_grad) for c in zip(*rows)]
    return tuple(cols)


def margin_of(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)  # m = log π/π_ref (y_w) − log π/π_ref (y_l)


@given(logps, betas)
def test_the_two_forms_in_the_notes_are_equal(rows, beta):
    """−log σ(β log π(y_w)/π_ref(y_w) − β log π(y_l)/π_ref(y_l)) equals
    −log σ(β log [π(y_w)·π_ref(y_l)] / [π(y_l)·π_ref(y_w)]) (CS224N notes, two forms of L_DPO)."""
    x = unpack(rows)
    loss, _ = dpo_loss(*x, beta)
    torch.testing.assert_close(loss, dpo_loss_single_ratio(*x, beta))


@given(st.lists(st.tuples(st.floats(-50, 0), st.floats(-50, 0)), min_size=1, max_size=6), betas)
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(rows, beta):
    """π_θ = π_ref: every implicit reward β·log π_θ/π_ref is 0, the loss is ln 2 (a coin flip)."""
    chosen, rejected = (torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    loss, stats = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-12)
    for key in ("chosen_reward", "rejected_reward", "margin", "accuracy"):
        assert float(stats[key]) == 0.0


@given(logps, betas)
def test_swapping_chosen_and_rejected(rows, beta):
    """Swapping y_w and y_l maps m -> −m (the reward margin flips sign) and
    loss(m) − loss(−m) = −β·mean(m), since log σ(x) − log σ(−x) = x."""
    pc, pr, rc, rr = unpack(rows)
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    swapped, swapped_stats = dpo_loss(pr, pc, rr, rc, beta)
    m = margin_of(pc, pr, rc, rr)
    torch.testing.assert_close(swapped_stats["margin"], -stats["margin"])
    torch.testing.assert_close(stats["margin"], beta * m.mean())
    assert math.isclose(loss.item() - swapped.item(), -beta * m.mean().item(),
                        rel_tol=1e-9, abs_tol=1e-9)


@given(logps, betas)
def test_gradients(rows, beta):
    """∂L/∂log π(y_w) = −β·σ(−β·m)/B and ∂L/∂log π(y_l) = +β·σ(−β·m)/B: raise the chosen, lower
    the rejected, weighted by how wrongly the implicit reward ranks the pair."""
    pc, pr, rc, rr = unpack(rows, requires_grad=True)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta)
    loss.backward()
    weight = beta * torch.sigmoid(-beta * margin_of(pc, pr, rc, rr)).detach() / len(rows)
    torch.testing.assert_close(pc.grad, -weight)
    torch.testing.assert_close(pr.grad, weight)
    torch.testing.assert_close(rc.grad, weight)  # the reference enters with the opposite sign
    torch.testing.assert_close(rr.grad, -weight)


@given(logps, betas, st.floats(0.0, 0.49))
def test_label_smoothing(rows, beta, eps):
    """ε = 0 is plain DPO exactly; otherwise the loss is (1−ε)·softplus(−βm) + ε·softplus(βm),
    whose minimum is at a finite margin: σ(β·m*) = 1 − ε, i.e. m* = log((1−ε)/ε)/β."""
    x = unpack(rows)
    plain, _ = dpo_loss(*x, beta)
    assert torch.equal(dpo_loss(*x, beta, label_smoothing=0.0)[0], plain)
    m = margin_of(*x)
    smoothed, _ = dpo_loss(*x, beta, label_smoothing=eps)
    expected = ((1 - eps) * F.softplus(-beta * m) + eps * F.softplus(beta * m)).mean()
    torch.testing.assert_close(smoothed, expected)
    if eps > 0.01:
        m_star = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64,
                              requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        dpo_loss(m_star, zero, zero, zero, beta, label_smoothing=eps)[0].backward()
        assert abs(m_star.grad.item()) < 1e-9


@given(logps, st.floats(0.05, 5.0))
def test_ipo_is_minimised_at_margin_one_over_two_beta(rows, beta):
    """IPO = (m − 1/(2β))² per pair: 0 with zero gradient at m = 1/(2β), positive elsewhere."""
    x = unpack(rows)
    m = margin_of(*x)
    loss, _ = dpo_loss(*x, beta, loss_type="ipo")
    torch.testing.assert_close(loss, ((m - 1 / (2 * beta)) ** 2).mean())
    target = torch.tensor([1 / (2 * beta)], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    at_min, _ = dpo_loss(target, zero, zero, zero, beta, loss_type="ipo")
    at_min.backward()
    assert at_min.item() == 0.0 and target.grad.item() == 0.0
    off, _ = dpo_loss(target.detach() + 0.1, zero, zero, zero, beta, loss_type="ipo")
    assert off.item() > 0


def test_bad_options_are_refused():
    """An unknown loss_type, or label smoothing with IPO, raises instead of silently training."""
    x = (torch.zeros(2),) * 4
    with pytest.raises(ValueError):
        dpo_loss(*x, 0.1, loss_type="hinge")
    with pytest.raises(ValueError):
        dpo_loss(*x, 0.1, label_smoothing=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(*x, 0.1, rpo_alpha=1.0)  # RPO needs the chosen responses' lengths


@given(logps, betas, st.floats(0.0, 10.0),
       st.lists(st.integers(1, 40), min_size=6, max_size=6))
def test_rpo_adds_the_chosen_responses_per_token_nll(rows, beta, alpha, lengths):
    """RPO: L = L_DPO + α·(−Σ_i log π_θ(y_w,i) / Σ_i |y_w,i|), the chosen responses' NLL as a
    token mean. The loss is DPO's plus that term, its gradient w.r.t. log π_θ(y_w,i) is DPO's
    minus α/Σ|y_w|, the rejected and reference gradients are DPO's, and α = 0 is plain DPO. The
    stats report the two terms apart: "dpo_loss" is DPO's loss and "nll" the NLL, at any α."""
    pc, pr, rc, rr = unpack(rows, requires_grad=True)
    n = torch.tensor(lengths[:len(rows)], dtype=torch.float64)
    dpo, _ = dpo_loss(pc, pr, rc, rr, beta)
    rpo, stats = dpo_loss(pc, pr, rc, rr, beta, rpo_alpha=alpha, chosen_tokens=n)
    nll = -pc.sum() / n.sum()
    torch.testing.assert_close(rpo, dpo + alpha * nll)
    torch.testing.assert_close(stats["nll"], nll.detach())  # measured whenever lengths are given
    torch.testing.assert_close(stats["dpo_loss"], dpo.detach())  # the DPO term alone
    g_dpo = torch.autograd.grad(dpo, (pc, pr, rc, rr))
    g_rpo = torch.autograd.grad(rpo, (pc, pr, rc, rr))
    torch.testing.assert_close(g_rpo[0], g_dpo[0] - alpha / n.sum())
    for a, b in zip(g_rpo[1:], g_dpo[1:]):
        torch.testing.assert_close(a, b)
    halved, _ = dpo_loss(pc, pr, rc, rr, beta, rpo_alpha=alpha, chosen_tokens=n,
                         nll_norm=2 * float(n.sum()))  # a torchrun process's share of the mean
    torch.testing.assert_close(halved, dpo + alpha * nll / 2)
    plain, _ = dpo_loss(pc, pr, rc, rr, beta, rpo_alpha=0.0, chosen_tokens=n)
    assert torch.equal(plain, dpo)


@given(logps, betas)
def test_dpo_is_the_reward_model_loss_on_implicit_rewards(rows, beta):
    """L_DPO is exactly L_RM (train_rm.reward_loss) applied to r = β·log π_θ/π_ref: loss,
    accuracy, margin and mean rewards all agree (CS224N notes: "the ideal RM can be computed")."""
    pc, pr, rc, rr = unpack(rows)
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    rm_loss, rm_stats = reward_loss(beta * (pc - rc), beta * (pr - rr))
    torch.testing.assert_close(loss, rm_loss)
    for key in ("accuracy", "margin"):
        torch.testing.assert_close(stats[key], rm_stats[key])
    torch.testing.assert_close(stats["chosen_reward"], rm_stats["chosen_reward"])
    torch.testing.assert_close(stats["rejected_reward"], rm_stats["rejected_reward"])


def test_finite_for_huge_log_prob_differences_float32():
    """Log-prob differences up to 1e4 in float32 give a finite loss and finite gradients, for
    the sigmoid, conservative and IPO losses."""
    big = torch.tensor([1e4, -1e4, 0.0, 5e3])
    for kwargs in ({}, {"label_smoothing": 0.1}, {"loss_type": "ipo"}):
        pc = torch.zeros(4, requires_grad=True)
        pr = torch.zeros(4, requires_grad=True)
        loss, stats = dpo_loss(pc, pr, -big, big, beta=1.0, **kwargs)
        loss.backward()
        assert torch.isfinite(loss), kwargs
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), kwargs
        assert all(torch.isfinite(v).all() for v in stats.values()), kwargs
    assert torch.isfinite(dpo_loss_single_ratio(pc, pr, -big, big, beta=1.0))


# ------------------------------------------------------------------- the closed-form optimum

def bandit(K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref_logp = torch.randn(K, generator=g, dtype=torch.float64).log_softmax(-1)
    r = torch.randn(K, generator=g, dtype=torch.float64)
    return ref_logp, r


def expected_dpo_loss(theta, ref_logp, r, beta):
    """The exact expected DPO loss of a one-token bandit: every ordered pair (y_w, y_l) = (a, b),
    a ≠ b, drawn from π_ref × π_ref and labelled a ≻ b with Bradley–Terry probability
    σ(r_a − r_b), so its weight is π_ref(a)·π_ref(b)·σ(r_a − r_b)."""
    logp = theta.log_softmax(-1)  # (K,) log π_θ(a), the "summed response log-prob"
    total = 0.0
    for a, b in itertools.permutations(range(len(theta)), 2):
        weight = (ref_logp[a] + ref_logp[b]).exp() * torch.sigmoid(r[a] - r[b])
        pair = slice(a, a + 1), slice(b, b + 1)
        loss, _ = dpo_loss(logp[pair[0]], logp[pair[1]], ref_logp[pair[0]], ref_logp[pair[1]], beta)
        total = total + weight * loss
    return total


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_dpo_recovers_the_closed_form_optimum(beta):
    """Minimising the exact expected DPO loss over a tabular policy (logits θ, LBFGS), starting
    at π_ref, recovers π* = π_ref·exp(r/β)/Z of the KL-penalised objective (total variation
    < 0.02) with no reward model and no sampling. Every pair has positive weight, so the pairwise
    log-ratios β·(h_a − h_b) = r_a − r_b, and hence π*, are identified; and the gradient
    vanishes at π*."""
    ref_logp, r = bandit()
    pi_star = (ref_logp + r / beta).softmax(-1)  # π* = π_ref exp(r/β) / Z, CS224N notes

    theta = pi_star.log().clone().requires_grad_()
    expected_dpo_loss(theta, ref_logp, r, beta).backward()
    assert theta.grad.abs().max() < 1e-12

    theta = ref_logp.clone().requires_grad_()
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_dpo_loss(theta, ref_logp, r, beta)
        loss.backward()
        return loss

    opt.step(closure)
    tv = 0.5 * (theta.detach().softmax(-1) - pi_star).abs().sum().item()
    tv_start = 0.5 * (ref_logp.exp() - pi_star).abs().sum().item()
    assert tv_start > 0.1 and tv < 0.02


class _Tok:
    pad_id = 0


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=10)
       .map(lambda ps: [(a, b) for a, b in ps if a != b] or [(0, 1)]))
def test_shared_responses_are_run_once_with_the_same_log_probs_and_gradients(index_pairs):
    """response_logprobs runs each distinct sequence of a batch once (a prompt's k responses make
    k(k−1)/2 pairs): the summed response log-probs and the DPO loss's gradients equal those of
    running every response on its own, and precompute_reference gives every pair its own two
    reference log-probs."""
    from minirlhf.masking import token_logprobs
    from minirlhf.model import GPT, GPTConfig
    from train_dpo import precompute_reference, response_logprobs
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=8)).double()
    gen = torch.Generator().manual_seed(1)
    n_prompt = 2                                          # all responses answer one prompt
    pool = [torch.randint(1, 16, (n,), generator=gen).tolist() for n in (4, 6, 5, 8, 3, 7)]
    pairs = [(pool[a], pool[b], n_prompt) for a, b in index_pairs]
    c, r = response_logprobs(model, pairs, _Tok, torch.device("cpu"))
    loss, _ = dpo_loss(c, r, torch.zeros_like(c), torch.zeros_like(r), 0.5)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    def alone(seq):  # sum of log π over the response tokens, one sequence, no padding
        logits = model(torch.tensor([seq]))[0, :-1]
        return token_logprobs(logits, torch.tensor(seq[1:]))[n_prompt - 1:].sum()
    ref_c = torch.stack([alone(a) for a, _, _ in pairs])
    ref_r = torch.stack([alone(b) for _, b, _ in pairs])
    ref_loss, _ = dpo_loss(ref_c, ref_r, torch.zeros_like(ref_c), torch.zeros_like(ref_r), 0.5)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    # response_logprobs takes log-softmax in float32 (as under autocast): float32 tolerances
    torch.testing.assert_close(c, ref_c.float())
    torch.testing.assert_close(r, ref_r.float())
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    table = precompute_reference(model.float(), pairs * 3, _Tok, torch.device("cpu"), batch_size=4)
    torch.testing.assert_close(table, torch.stack([ref_c, ref_r], 1).float().repeat(3, 1))
