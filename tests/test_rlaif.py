"""RLAIF (lecture ch. 8): a judge model's labels (`judge_labels`), the relabelling of pairs
(`relabel_with_judge`) and its agreement with the human labeller (`label_agreement`), and
--labeller's checks. The end-to-end runs are in tests/test_scripts.py, the refusals of a run in
tests/test_failures.py."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from minirlhf.tokenizer import Tokenizer
from minirlhf.world import World, pair_label_prob
from train_rm import (RMConfig, encode_pairs, judge_labels, label_agreement,
                      preference_probability, relabel_with_judge)

rewards = st.floats(-30, 30, allow_nan=False)
score_pairs = st.lists(st.tuples(rewards, rewards), min_size=1, max_size=16)


def split(pairs, dtype=torch.float32):
    return (torch.tensor([a for a, _ in pairs], dtype=dtype),
            torch.tensor([b for _, b in pairs], dtype=dtype))


@given(score_pairs)
def test_greedy_picks_the_larger_score_and_a_tie_keeps_the_order(pairs):
    """Greedy: a is chosen exactly when r_a ≥ r_b, its P(a ≻ b) is that 1 or 0, and it draws
    nothing from the rng."""
    r_a, r_b = split(pairs)
    rng = np.random.default_rng(0)
    a_chosen, p = judge_labels(r_a, r_b, rng, greedy=True)
    assert a_chosen.dtype == torch.bool and a_chosen.shape == r_a.shape
    assert a_chosen.tolist() == [a >= b for a, b in zip(r_a.tolist(), r_b.tolist())]
    assert p.tolist() == [float(a) for a in a_chosen.tolist()]
    assert rng.random() == np.random.default_rng(0).random()  # no draw consumed


@given(st.lists(st.tuples(st.floats(-6, 6), st.floats(-6, 6)), min_size=1, max_size=4),
       st.integers(0, 2**32 - 1))
def test_sampled_labels_are_drawn_with_the_bradley_terry_probability(pairs, seed):
    """Over M draws of the same pair, the judge chooses a with frequency σ(r_a − r_b), within
    5 binomial standard deviations; the returned P(a ≻ b) is σ(r_a − r_b) itself."""
    M = 20000
    r_a, r_b = split(pairs)
    a_chosen, p = judge_labels(r_a.repeat(M), r_b.repeat(M), np.random.default_rng(seed))
    q = preference_probability(r_a.double(), r_b.double())
    torch.testing.assert_close(p[:len(pairs)], q)
    freq = a_chosen.view(M, len(pairs)).double().mean(0)
    for f, qi in zip(freq.tolist(), q.tolist()):
        assert abs(f - qi) <= 5 * math.sqrt(qi * (1 - qi) / M) + 1e-12, (f, qi)


grid = st.integers(-1000, 1000).map(lambda k: k / 8)  # sums and differences stay exact


@given(st.lists(st.tuples(grid, grid), min_size=1, max_size=16), st.integers(-1000, 1000),
       st.integers(0, 2**32 - 1), st.booleans())
def test_shifting_both_scores_changes_nothing(pairs, c, seed, greedy):
    """r_a + c, r_b + c: the same probabilities and, with the same rng, the same labels."""
    r_a, r_b = split(pairs, torch.float64)
    a1, p1 = judge_labels(r_a, r_b, np.random.default_rng(seed), greedy)
    a2, p2 = judge_labels(r_a + c, r_b + c, np.random.default_rng(seed), greedy)
    assert torch.equal(a1, a2) and torch.equal(p1, p2)


@pytest.mark.parametrize("greedy", [False, True])
def test_labels_are_finite_and_certain_at_extreme_scores(greedy):
    """At ±1e4 (float32) P(a ≻ b) is exactly 1, 0 or ½, never NaN, and a label drawn at 1 or 0
    is certain."""
    big = 1e4
    r_a = torch.tensor([big, -big, big, -big, 0.0]).repeat(1000)
    r_b = torch.tensor([-big, big, big, -big, big]).repeat(1000)
    a_chosen, p = judge_labels(r_a, r_b, np.random.default_rng(1), greedy)
    assert torch.isfinite(p).all() and ((0 <= p) & (p <= 1)).all()
    certain = torch.tensor([True, False, True, True, False]).repeat(1000)
    if greedy:
        assert torch.equal(a_chosen, r_a >= r_b)
    else:
        sure = torch.tensor([True, True, False, False, True]).repeat(1000)
        assert torch.equal(a_chosen[sure], certain[sure])
        assert p.view(1000, 5)[0].tolist() == [1.0, 0.0, 0.5, 0.5, 0.0]


def test_shapes_must_match():
    with pytest.raises(ValueError, match="must be"):
        judge_labels(torch.zeros(3), torch.zeros(4), np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# relabel_with_judge and its stats, with a judge that looks its scores up
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("The capital of Greece is Athens. What is 2 plus 3? " * 20, 270)


class LookupJudge:
    """A judge whose reward of (prompt, response) is table[response]: labels that can be
    predicted by hand."""

    def __init__(self, tok, rows, table):
        self.by_ids = {}
        for r in rows:
            for key in ("chosen", "rejected"):
                self.by_ids[tuple(tok.render(r["prompt"], r[key])[0])] = table[r[key]]

    def score(self, tokens, attn_mask):  # (N, T), (N, T) -> (N,)
        return torch.tensor([self.by_ids[tuple(t[m].tolist())] for t, m in zip(tokens, attn_mask)])


def world_rows():
    """Rows on the built-in world's prompts: a demonstration, then two worse answers."""
    world, rng = World(0), np.random.default_rng(0)
    rows = []
    for p in world.test_prompts[:4]:
        good = world.demonstration(p, rng)
        rows += [{"prompt": p.text, "chosen": good, "rejected": "Sure! " + good},
                 {"prompt": p.text, "chosen": good, "rejected": "I do not know."}]
    return rows


@pytest.mark.parametrize("greedy", [True, False])
def test_a_lookup_judge_relabels_as_predicted(tok, greedy):
    """Scores 0 for the demonstrations and −1e4 / +1e4 elsewhere decide every label, greedy
    or drawn: the judge chooses the higher score. The new rows keep the prompts and the texts;
    agreement is the fraction whose label the judge kept; expected_agreement and
    human_agreement follow their formulas from the human labeller's P(chosen ≻ rejected)."""
    rows = world_rows()
    table = {r["chosen"]: 0.0 for r in rows}  # the demonstrations
    table["I do not know."] = 1e4  # the judge prefers the non-answer to them: it disagrees
    table.update({r["rejected"]: -1e4 for r in rows[::2]})  # "Sure! ..." below them
    judge = LookupJudge(tok, rows, table)
    new, stats = relabel_with_judge(judge, tok, rows, "cpu", [0, 8], greedy, batch_size=3)
    assert [r["prompt"] for r in new] == [r["prompt"] for r in rows]
    for old, r in zip(rows, new):
        assert {r["chosen"], r["rejected"]} == {old["chosen"], old["rejected"]}
        assert table[r["chosen"]] > table[r["rejected"]]
    assert new[0::2] == rows[0::2] and all(r["chosen"] == "I do not know." for r in new[1::2])
    p_h = [pair_label_prob((r["prompt"], r["chosen"], r["rejected"])) for r in rows]
    p_j = [1.0, 0.0] * 4  # P(given chosen ≻ given rejected) of the judge
    assert stats["n_pairs"] == 8 and stats["agreement"] == 0.5
    assert stats["expected_agreement"] == pytest.approx(
        np.mean([j * h + (1 - j) * (1 - h) for j, h in zip(p_j, p_h)]), abs=1e-12)
    assert stats["human_agreement"] == pytest.approx(
        np.mean([h * h + (1 - h) * (1 - h) for h in p_h]), abs=1e-12)


def test_label_agreement_formulas_and_prompts_outside_the_world(tok):
    """With a judge's P between 0 and 1 the expected agreement is p_j·p_h + (1 − p_j)(1 − p_h)
    on average; a prompt from outside the built-in world leaves only n_pairs and agreement."""
    rows = world_rows()[:4]
    p_j = torch.tensor([0.9, 0.2, 0.5, 1.0], dtype=torch.float64)
    a_chosen = torch.tensor([True, False, False, True])
    stats = label_agreement(rows, a_chosen, p_j)
    p_h = [pair_label_prob((r["prompt"], r["chosen"], r["rejected"])) for r in rows]
    assert stats["agreement"] == 0.5
    assert stats["expected_agreement"] == pytest.approx(
        np.mean([j * h + (1 - j) * (1 - h) for j, h in zip(p_j.tolist(), p_h)]), abs=1e-12)
    assert 0.5 <= stats["human_agreement"] <= 1
    outside = rows + [{"prompt": "Who wrote Hamlet?", "chosen": "Shakespeare.",
                       "rejected": "Dickens."}]
    stats = label_agreement(outside, torch.tensor([True] * 5), torch.ones(5))
    assert stats == {"n_pairs": 5, "agreement": 1.0}


def test_the_same_seed_draws_the_same_labels(tok):
    """relabel_with_judge is a function of (judge, rows, seed): a second call with the same
    seed gives the same rows (what --resume relies on); another seed may differ."""
    rows = world_rows()
    texts = sorted({r[k] for r in rows for k in ("chosen", "rejected")})
    table = {t: float(i % 3) / 2 for i, t in enumerate(texts)}
    judge = LookupJudge(tok, rows, table)
    first = relabel_with_judge(judge, tok, rows, "cpu", [3, 8])
    assert relabel_with_judge(judge, tok, rows, "cpu", [3, 8]) == first
    assert len(encode_pairs(first[0], tok)) == len(rows)


def test_a_judge_with_non_finite_rewards_cannot_label(tok):
    from minirlhf.errors import NonFiniteError
    rows = world_rows()[:2]
    table = {r[k]: 0.0 for r in rows for k in ("chosen", "rejected")}
    table[rows[1]["rejected"]] = float("nan")
    with pytest.raises(NonFiniteError, match="pair 2 are 0.0 and nan"):
        relabel_with_judge(LookupJudge(tok, rows, table), tok, rows, "cpu", [0, 8])


# ----------------------------------------------------------------------------------------------
# --labeller and --judge-greedy
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (dict(labeller="robot"), "--labeller robot: human, or ai:DIR"),
    (dict(labeller="ai:"), "--labeller ai: names no folder"),
    (dict(judge_greedy=True), "--judge-greedy needs --labeller ai:DIR"),
    (dict(labeller="ai:out/judge", noise_free_labels=True), "--noise-free-labels trains on"),
    (dict(labeller="ai:out/judge", make_pairs=True, pairs_only=True), "--pairs-only trains on"),
])
def test_labeller_checks(flags, message):
    with pytest.raises(ValueError, match=message):
        RMConfig(**flags).check()


def test_judge_dir():
    assert RMConfig().judge_dir() is None and RMConfig().inner_paths() == {}
    cfg = RMConfig(labeller="ai:out/judge", judge_greedy=True)
    cfg.check()
    assert cfg.judge_dir() == "out/judge"
    assert cfg.inner_paths() == {"labeller": ("out/judge", "stage")}
