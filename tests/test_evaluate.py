"""Evaluating a policy: per-sample judgements, and the closed-form KL-regularised optimum
π* ∝ π_ref·exp(r/β) estimated by reweighting samples (lecture ch. 5)."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf import evaluate as E
from minirlhf import world as W
from minirlhf.world import World, correct


# ----------------------------------------------------------------------------------------------
# The closed-form KL-regularised optimum π* ∝ π_ref·exp(r/β), estimated by reweighting samples

score_rows = st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=12)


@given(score_rows, st.floats(0.05, 20))
def test_tilt_weights_are_exp_r_over_beta_normalised(row, beta):
    scores = np.array([row])
    w, kl = E.tilt(scores, beta)
    assert w.sum() == pytest.approx(1.0)
    i, j = int(np.argmax(row)), int(np.argmin(row))
    assert w[0, i] / w[0, j] == pytest.approx(math.exp((row[i] - row[j]) / beta), rel=1e-6)
    assert -1e-9 <= kl[0] <= math.log(len(row)) + 1e-9


@given(score_rows, st.floats(0.05, 5), st.floats(1.01, 10))
def test_tilted_mean_rises_as_beta_falls(row, beta, factor):
    """d/dβ E_π*[r] = −Var_π*[r]/β² ≤ 0: a weaker KL anchor never buys less reward."""
    scores = np.array([row])
    strong, _ = E.tilt(scores, beta * factor)
    weak, _ = E.tilt(scores, beta)
    assert (weak * scores).sum() >= (strong * scores).sum() - 1e-9


def test_tilt_limits_and_extremes():
    scores = np.array([[0.0, 1.0, 3.0, 2.0]])
    w, kl = E.tilt(scores, 1e6)                       # β → ∞: π* = π_ref, KL 0
    np.testing.assert_allclose(w, 0.25, atol=1e-5)
    assert kl[0] == pytest.approx(0.0, abs=1e-9)
    w, kl = E.tilt(scores, 1e-3)                      # β → 0: all mass on the best sample
    np.testing.assert_allclose(w, [[0, 0, 1, 0]], atol=1e-9)
    assert kl[0] == pytest.approx(math.log(4))
    w, kl = E.tilt(np.array([[1e4, -1e4]]), 1e-2)    # no overflow at extreme r/β
    assert np.isfinite(w).all() and np.isfinite(kl).all()


def test_tilted_samples_estimate_the_exact_optimum_of_a_categorical():
    """Sampling from π_ref and reweighting by exp(r/β) gives E_π*[r] and KL(π*‖π_ref) of the
    exact π* = π_ref·exp(r/β)/Z (enumerated here over 5 actions)."""
    rng = np.random.default_rng(0)
    p_ref = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    r = np.array([0.0, 1.0, -1.0, 2.0, 3.0])
    for beta in (0.5, 1.0, 2.0):
        p_star = p_ref * np.exp(r / beta)
        p_star /= p_star.sum()
        exact_reward = float(p_star @ r)
        exact_kl = float(p_star @ np.log(p_star / p_ref))
        actions = rng.choice(5, size=(1, 200_000), p=p_ref)
        w, kl = E.tilt(r[actions], beta)
        assert (w * r[actions]).sum() == pytest.approx(exact_reward, abs=0.02)
        assert kl[0] == pytest.approx(exact_kl, abs=0.02)


def test_evaluate_per_sample_scores_are_the_judged_samples():
    """evaluate(..., repeats=K, per_sample=True) returns each sample's gold and correctness in
    prompt order, a prompt's K samples side by side: their means are the reported gold and
    accuracy, and each is the judge's verdict on the sample it belongs to."""
    import torch
    from minirlhf.model import GPT, GPTConfig
    tok = W.world_tokenizer(512)
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=1,
                           n_embd=16))
    prompts, K = World(0).test_prompts[:5], 3
    r = E.evaluate(policy, tok, prompts, max_new_tokens=8, batch_size=4, repeats=K,
                   n_samples=len(prompts) * K, per_sample=True)
    assert r["golds"].shape == r["correct"].shape == (len(prompts) * K,)
    assert r["golds"].mean() == pytest.approx(r["gold"]) and r["correct"].mean() == r["accuracy"]
    for i, s in enumerate(r["samples"]):
        assert s["prompt"] == prompts[i // K].text and s["gold"] == r["golds"][i]
        assert r["correct"][i] == correct(s["prompt"], s["response"])


def test_kl_optimum_with_a_reward_model_tilts_the_same_samples_by_its_scores():
    """kl_optimum(..., reward=f) reweights the very samples the labeller's curve uses by f's
    scores: a reward that returns the labeller's own utility of each sample (gold / T, fed back
    batch by batch) reproduces the labeller's points exactly; a constant reward leaves the SFT
    policy as it is (its mean gold, KL 0); and the labeller's points do not change."""
    import torch
    from minirlhf.model import GPT, GPTConfig
    tok = W.world_tokenizer(512)
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=1,
                           n_embd=16))
    with torch.no_grad():  # every step: the end token with probability ~0.3, else any token
        policy.transformer.ln_f.weight.zero_()
        policy.transformer.ln_f.bias.fill_(1.0)
        policy.lm_head.weight[tok.end_id] += 6.0 / 16  # (tied to the embedding)
    prompts, K, betas = World(0).test_prompts[:6], 4, [0.1, 1.0]
    kw = dict(samples_per_prompt=K, max_new_tokens=8)
    plain = E.kl_optimum(policy, tok, prompts, betas, **kw)
    # the same samples, judged (kl_optimum batches 128 samples: all 24 in one batch)
    golds = E.evaluate(policy, tok, prompts, max_new_tokens=8, batch_size=128, repeats=K,
                       per_sample=True)["golds"]
    assert golds.std() > 0  # the random policy writes responses of different worth
    feed = iter([torch.tensor(golds / W.BT_TEMPERATURE)])
    mirrored = E.kl_optimum(policy, tok, prompts, betas, reward=lambda t, m, e, *_: next(feed),
                            **kw)
    for a, b in zip(plain, mirrored):
        assert {k: a[k] for k in ("beta", "gold", "accuracy", "kl")} == {k: b[k] for k in a}
        assert b["reward_model"] == {k: a[k] for k in ("gold", "accuracy", "kl")}
    flat = E.kl_optimum(policy, tok, prompts, betas,
                        reward=lambda t, m, e, *_: torch.zeros(len(t)), **kw)
    for p in flat:
        assert p["reward_model"]["gold"] == pytest.approx(golds.mean())
        assert p["reward_model"]["kl"] == pytest.approx(0.0, abs=1e-12)
