"""Best-of-n (minirlhf/best_of_n.py): its KL formula against an enumerated categorical, the
subset estimator against brute-force enumeration, and the tool end to end on a tiny model."""
import itertools
import os

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf import best_of_n as B
from minirlhf.model import GPT, GPTConfig
from minirlhf.world import World, world_tokenizer


def exact_best_of_n_kl(probs: np.ndarray, n: int) -> float:
    """KL(π_n‖π) of a categorical π whose outcomes are ranked by distinct rewards (probs in
    ascending order of reward): best-of-n picks outcome i with F(i)^n − F(i−1)^n, F the CDF."""
    F = np.cumsum(probs)
    pn = F ** n - np.concatenate([[0.0], F[:-1]]) ** n
    keep = pn > 0
    return float(np.sum(pn[keep] * np.log(pn[keep] / probs[keep])))


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64])
def test_kl_formula_is_the_limit_of_a_uniform_categorical(n):
    """log n − (n − 1)/n is exact for continuous rewards: a uniform categorical over K distinct
    outcomes approaches it as K grows."""
    K = 200_000
    assert exact_best_of_n_kl(np.full(K, 1 / K), n) == pytest.approx(B.best_of_n_kl(n),
                                                                      abs=1e-3)


@given(logits=st.lists(st.floats(-5, 5), min_size=2, max_size=30), n=st.integers(1, 32))
def test_kl_formula_bounds_every_enumerated_categorical(logits, n):
    """For any categorical with distinct rewards the exact KL of best-of-n is at most the
    formula (Beirami et al. 2024), and both are 0 at n = 1."""
    probs = np.exp(logits) / np.exp(logits).sum()
    exact = exact_best_of_n_kl(probs, n)
    assert -1e-12 <= exact <= B.best_of_n_kl(n) + 1e-9
    if n == 1:
        assert abs(exact) < 1e-12 and B.best_of_n_kl(1) == 0


@given(seed=st.integers(0, 2**31 - 1), N=st.integers(1, 7), data=st.data())
def test_subset_estimator_is_the_mean_over_every_n_subset(seed, N, data):
    """Σ_i w_i·v_(i) equals, exactly, the mean over all n-subsets of N samples of the value of
    each subset's best-scored sample (ties broken by sample order)."""
    n = data.draw(st.integers(1, N))
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(3, N)).astype(float)  # small integers: ties happen
    values = rng.normal(size=(3, N))
    got = B.best_of_n_values(scores, values, n)
    for p in range(3):
        bests = []
        for subset in itertools.combinations(range(N), n):
            # the best of the subset, the last among equals in a stable ascending order
            best = max(subset, key=lambda j: (scores[p, j], j))
            bests.append(values[p, best])
        assert got[p] == pytest.approx(np.mean(bests), abs=1e-12)
    assert B.best_of_n_weights(n, N).sum() == pytest.approx(1.0)


def test_n_of_one_is_the_mean_and_n_of_all_is_the_best():
    scores = np.array([[0.1, 0.9, 0.5]])
    values = np.array([[1.0, 2.0, 4.0]])
    assert B.best_of_n_values(scores, values, 1)[0] == pytest.approx(7 / 3)
    assert B.best_of_n_values(scores, values, 3)[0] == pytest.approx(2.0)


def test_the_curve_on_a_tiny_model_with_the_gold_judge_as_selector():
    """With the gold judge picking, the kept gold can only grow with n, the proxy is gold / T,
    the KL is the formula, and n = 1 is the policy's own mean."""
    tok = world_tokenizer(512)
    import torch
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                           n_embd=32)).eval()
    prompts = World(0).test_prompts[:12]
    points = B.best_of_n_curve(policy, tok, prompts, [1, 2, 4], max_new_tokens=8)
    golds = [p["gold"] for p in points]
    assert golds[0] <= golds[1] <= golds[2]
    assert all(p["proxy"] == pytest.approx(p["gold"] / 0.25) for p in points)
    assert [p["kl"] for p in points] == [B.best_of_n_kl(n) for n in (1, 2, 4)]


@pytest.mark.parametrize("flags, message", [
    (["--n", "0,2"], "--n '0,2': expected positive counts like 1,2,4,8"),
    (["--n", "a,b"], "--n 'a,b': expected counts like 1,2,4,8"),
    ([], "--selector rm needs --rm DIR (or use --selector gold)"),
])
def test_bad_flags_end_in_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        B.main(["--policy", str(tmp_path), "--out", str(tmp_path / "out")] + flags)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"{B.PROG}: error: {message}\n"
    assert not os.path.exists(tmp_path / "out")


def test_a_policy_that_is_not_a_stage_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        B.main(["--policy", str(tmp_path / "nowhere"), "--selector", "gold",
                "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert err.startswith(f"{B.PROG}: error: ") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "out")
