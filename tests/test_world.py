"""Properties of the built-in world: the judge's optimum, correctness first, Bradley–Terry labels,
the Bayes limit, the splits, determinism, and the demonstrators' measured noise."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from minirlhf import world as W
from minirlhf.world import (BT_TEMPERATURE, DEMONSTRATORS, FAMILIES, PROMPTS, World,
                            bayes_accuracy, correct, demonstration, expected_accuracy,
                            gold_reward, label_pair, lookup, optimal_response, optimal_score,
                            parse, preference_prob, shortfall_by_kind, wrong_value)

prompt_texts = st.sampled_from(sorted(PROMPTS))
seeds = st.integers(0, 2**32 - 1)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))  # the textbook form, independent of W.sigmoid


def wrong_sentence(p, rng) -> str:
    return p.answer_sentence(wrong_value(p, rng))


# Perturbations of the optimal response that a person would judge worse: each must lose gold.
def perturb(p, kind: str, rng) -> tuple[str, bool]:
    fam = FAMILIES[p.family]
    sents = W.split_sentences(optimal_response(p))
    i = int(rng.integers(len(sents) + 1))
    if kind == "wrong answer":
        sents[1] = wrong_sentence(p, rng)
    elif kind == "bare answer":
        sents[1] = f"{p.answer}."
    elif kind == "repeat":
        sents.insert(i, sents[int(rng.integers(len(sents)))])
    elif kind == "extra explanation":
        sents.insert(i, fam.explanations[int(rng.integers(len(fam.explanations)))])
    elif kind == "extra opener":
        sents.insert(i, W.OPENERS[int(rng.integers(len(W.OPENERS)))])
    elif kind == "filler":
        sents.insert(i, W.FILLERS[int(rng.integers(len(W.FILLERS)))])
    elif kind == "garbled word":
        j = int(rng.integers(len(sents)))
        words = sents[j].split(" ")
        words[int(rng.integers(len(words)))] = "zzq"
        sents[j] = " ".join(words)
    elif kind == "drop opener":
        del sents[0]
    elif kind == "drop explanation":
        del sents[2]
    elif kind == "unended":
        return " ".join(sents), False
    return " ".join(sents), True


HARMFUL = ["wrong answer", "bare answer", "repeat", "extra explanation", "extra opener", "filler",
           "garbled word", "drop opener", "drop explanation", "unended"]


@given(prompt_texts, st.sampled_from(HARMFUL), seeds)
def test_optimal_response_beats_every_harmful_perturbation(text, kind, seed):
    """The optimum (opener + right answer + one explanation, 1.3) beats each perturbation."""
    p = lookup(text)
    best = gold_reward(p, optimal_response(p))
    assert best == optimal_score(p) == pytest.approx(1.3)
    response, ended = perturb(p, kind, np.random.default_rng(seed))
    assert gold_reward(p, response, ended) < best


def grammar_sentence(p, rng) -> str:
    """Any sentence the grammar knows, for any family, right or wrong, or junk."""
    fam = FAMILIES[p.family]
    other = FAMILIES[list(FAMILIES)[int(rng.integers(len(FAMILIES)))]]
    pool = [*W.OPENERS, *W.FILLERS, *W.CLOSINGS, *fam.explanations, *other.explanations,
            p.answer_sentence(), wrong_sentence(p, rng), f"{p.answer}.", f"{wrong_value(p, rng)}.",
            "zzq qq.", "The capital of"]
    return pool[int(rng.integers(len(pool)))]


@given(prompt_texts, st.integers(0, 12), st.booleans(), seeds)
def test_no_response_scores_above_the_optimum(text, n, ended, seed):
    """Gold of any sentence sequence from the grammar (plus junk) is at most optimal_score."""
    p, rng = lookup(text), np.random.default_rng(seed)
    response = " ".join(grammar_sentence(p, rng) for _ in range(n))
    assert gold_reward(p, response, ended) <= optimal_score(p)


@given(prompt_texts, st.integers(0, 5), st.booleans(), seeds)
def test_wrong_answer_scores_below_correct_in_the_same_style(text, n, bare, seed):
    """Same surrounding sentences, same position: the right value always beats a wrong one."""
    p, rng = lookup(text), np.random.default_rng(seed)
    others = [s for s in (grammar_sentence(p, rng) for _ in range(n))  # whole sentences only:
              if s[-1] in ".!?" and W._classify(p, s)[0] not in ("answer", "bare")]
    i = int(rng.integers(len(others) + 1))
    wrong = wrong_value(p, rng)
    right_s, wrong_s = (f"{p.answer}.", f"{wrong}.") if bare else (p.answer_sentence(),
                                                                   p.answer_sentence(wrong))
    right_r = " ".join(others[:i] + [right_s] + others[i:])
    wrong_r = " ".join(others[:i] + [wrong_s] + others[i:])
    assert gold_reward(p, right_r) > gold_reward(p, wrong_r)
    assert correct(p, right_r) and not correct(p, wrong_r)


def test_within_each_demonstrator_every_correct_demo_beats_every_wrong_one():
    """Correctness dominates style: per style, min gold of correct demos > max gold of wrong."""
    rng, prompts = np.random.default_rng(0), World(0).train_prompts
    for style in DEMONSTRATORS:
        golds = {True: [], False: []}
        for p in prompts[::3]:
            for _ in range(4):
                r = demonstration(p, rng, style)
                golds[correct(p, r)].append(gold_reward(p, r))
        assert golds[True] and golds[False], style
        assert min(golds[True]) > max(golds[False]), style


@pytest.mark.parametrize("response, ended, expected", [
    ("Sure! The capital of France is Paris. It is where the government sits.", True, 1.3),
    ("The capital of France is Paris.", True, 1.0),
    ("Paris.", True, 0.5),
    ("Sure! Paris.", True, 0.6),
    ("The capital of France is Rome.", True, 0.0),
    ("The capital of France is Paris. The capital of France is Rome.", True, -0.3),  # conflicting
    ("The capital of France is Paris. Paris.", True, 0.7),                           # restated
    ("The capital of Spain is Madrid.", True, 0.0),            # answers another question
    ("Sure! It is where the government sits.", True, 0.0),     # no answer: no bonuses
    ("The capital of France is Paris. Sure!", True, 0.8),      # a misplaced opener
    ("The capital of France is Paris. I counted up by one.", True, 0.5),  # other family
    ("The capital of France is Paris. It is where the government sits. "
     "I know this from geography.", True, 0.95),               # the second explanation costs 0.25
    ("Sure! Let me think. The capital of France is Paris. I hope this helps.", True, 1.0),
    ("The capital of France is Paris.", False, 0.5),
    ("The capital of France is Paris.  Sure!", True, 0.5),    # double space: garbled piece
    ("The capital of France is Paris", True, -0.5),           # no full stop: garbled
    ("", True, 0.0),
    ("The capital of France is Paris. " + "Let me think. " * 12, True,
     1.0 - 0.1 * 12 - 0.3 * 11 - 0.02 * (6 + 36 - 40)),        # fillers, repeats, length
])
def test_judge_table(response, ended, expected):
    """Worked examples of the documented judge table on one prompt."""
    assert gold_reward("What is the capital of France?", response, ended) == pytest.approx(expected)


def test_parse_kinds_and_prompt_lookup():
    """parse labels each sentence; the judge gives the same result from a string or a Prompt."""
    w = World(0)
    p = w.test_prompts[5]
    assert [k for k, _ in parse(p.text, optimal_response(p))] == ["opener", "answer", "explanation"]
    assert w.prompt(p.text) is p
    r = demonstration(p, np.random.default_rng(0))
    assert gold_reward(p.text, r) == gold_reward(p, r) == gold_reward(" " + p.text + "\n", r)
    with pytest.raises(ValueError, match="not a prompt"):
        gold_reward("What is the capital of Atlantis?", "Sure!")


# ----- Bradley–Terry labels and the Bayes limit

def test_equal_rewards_give_one_half():
    p = "Which number follows 4?"
    a, b = "Sure! 5 comes after 4.", "Of course! 5 comes after 4."  # different text, same gold
    assert preference_prob(p, a, b) == 0.5
    assert preference_prob(p, a, a) == 0.5


@pytest.mark.parametrize("b, ended_b", [
    ("Of course! 5 comes after 4.", True),          # Δ = 0.2
    ("5 comes after 4.", True),                     # Δ = 0.3
    ("Sure! 5 comes after 4.", False),              # Δ = 0.5
    ("6 comes after 4.", True),                     # Δ = 1.3
])
def test_label_rate_matches_bradley_terry(b, ended_b):
    """Empirical P(a chosen) over many draws is σ(Δ/T) within 4 standard errors."""
    p, a = "Which number follows 4?", "Sure! 5 comes after 4. I counted up by one."
    q = sig((gold_reward(p, a) - gold_reward(p, b, ended_b)) / BT_TEMPERATURE)
    assert preference_prob(p, a, b, True, ended_b) == pytest.approx(q)
    rng, n = np.random.default_rng(1), 4000
    wins = 0
    for _ in range(n):
        chosen, rejected = label_pair(p, a, b, rng, True, ended_b)
        assert {chosen, rejected} == {a, b}
        wins += chosen == a
    assert abs(wins / n - q) < 4 * math.sqrt(q * (1 - q) / n)
    # The labeller does not care about argument order: swapping a and b swaps the probability.
    assert preference_prob(p, b, a, ended_b, True) == pytest.approx(1 - q)


def test_bayes_accuracy_closed_form():
    """bayes_accuracy = mean of σ(|Δ|/T) over the pairs, with ended flags honoured."""
    p = "What is the capital of Japan?"
    opt, polite = optimal_response(p), "Of course! The capital of Japan is Tokyo."
    wrong = "The capital of Japan is Rome."
    pairs = [(p, opt, polite), (p, wrong, opt), (p, polite, polite), (p, opt, opt, True, False)]
    deltas = [0.2, 1.3, 0.0, 0.5]
    expected = float(np.mean([sig(d / BT_TEMPERATURE) for d in deltas]))
    assert bayes_accuracy(pairs) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        bayes_accuracy([])


def test_expected_accuracy_of_the_judge_is_the_bayes_limit():
    """A predictor that ranks by the gold score itself has expected accuracy = the Bayes limit;
    one that always ranks the other way has 1 − that; each pair counts σ(Δ/T) or 1 − σ(Δ/T)."""
    p = "What is the capital of Japan?"
    opt, polite = optimal_response(p), "Of course! The capital of Japan is Tokyo."
    wrong = "The capital of Japan is Rome."
    pairs = [(p, opt, polite), (p, wrong, opt), (p, polite, wrong), (p, opt, wrong, True, False)]
    gold = [0.2, -1.3, 1.1, 1.8]  # g_a − g_b; the last b lacks its end token (−0.5)
    assert gold[:3] == [pytest.approx(gold_reward(p, a) - gold_reward(p, b))
                        for _, a, b in pairs[:3]]
    bayes = bayes_accuracy(pairs)
    assert expected_accuracy(pairs, gold) == pytest.approx(bayes, abs=1e-12)
    assert expected_accuracy(pairs, [-g for g in gold]) == pytest.approx(1 - bayes, abs=1e-12)
    q = [sig(d / BT_TEMPERATURE) for d in gold]
    assert expected_accuracy(pairs, [1, 1, -1, -1]) == pytest.approx(
        np.mean([q[0], q[1], 1 - q[2], 1 - q[3]]), abs=1e-12)
    with pytest.raises(ValueError):
        expected_accuracy(pairs, [1.0])


def test_shortfall_by_kind_sorts_pairs_and_adds_up_to_the_whole_gap():
    """Pairs go to "<family> right vs wrong", "both right" or "both wrong" by the judge's
    correctness; a predictor that ranks by the gold score loses 0 points in every kind; one that
    ranks only the "both wrong" pairs the wrong way loses points there alone; and the kinds'
    points add up to 100·(Bayes limit − expected accuracy) of all the pairs."""
    cap, nxt = "What is the capital of Japan?", "What number comes after 7?"
    pairs = [(cap, optimal_response(cap), "The capital of Japan is Rome."),      # capital r/w
             (cap, "Of course! The capital of Japan is Tokyo.", "Tokyo."),        # both right
             (nxt, "Sure! 9 comes after 7.", "6 comes after 7."),                 # both wrong
             (nxt, "Lima.", "Sure! 8 comes after 7. I counted up by one.")]       # after r/w
    gold = [gold_reward(p, a) - gold_reward(p, b) for p, a, b in pairs]
    judge = shortfall_by_kind(pairs, gold)
    assert set(judge) == {"capital right vs wrong", "both right", "both wrong",
                          "after right vs wrong"}
    assert all(v["n"] == 1 and v["points_lost"] == pytest.approx(0, abs=1e-12)
               for v in judge.values())
    flipped = [g if i != 2 else -g for i, g in enumerate(gold)]
    out = shortfall_by_kind(pairs, flipped)
    q = sig(gold[2] / BT_TEMPERATURE)  # 0.1 gold apart: the opener
    assert out["both wrong"]["points_lost"] == pytest.approx(100 * (2 * q - 1) / 4)
    assert out["both wrong"]["expected_accuracy"] == pytest.approx(1 - q)
    assert sum(v["points_lost"] for k, v in out.items() if k != "both wrong") == pytest.approx(0)
    rng = np.random.default_rng(0)
    margins = rng.normal(size=len(pairs)).tolist()
    total = sum(v["points_lost"] for v in shortfall_by_kind(pairs, margins).values())
    assert total == pytest.approx(100 * (bayes_accuracy(pairs) - expected_accuracy(pairs, margins)))
    with pytest.raises(ValueError):
        shortfall_by_kind(pairs, [1.0])


# ----- splits, determinism, demonstrators

@pytest.mark.parametrize("seed", [0, 1, 7])
def test_splits_disjoint_complete_and_every_entity_trained(seed):
    w = World(seed)
    tr, va, te = ({p.text for p in ps} for ps in (w.train_prompts, w.val_prompts, w.test_prompts))
    assert len(tr) == len(w.train_prompts) and len(va) == len(w.val_prompts)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == set(PROMPTS)
    trained = {(p.family, p.entity) for p in w.train_prompts}
    assert trained == {(f.name, e) for f in FAMILIES.values() for e in f.facts}
    for name in FAMILIES:
        n_test = sum(p.family == name for p in w.test_prompts)
        n_val = sum(p.family == name for p in w.val_prompts)
        assert 15 <= n_test <= 40 and 5 <= n_val <= 20, (name, n_test, n_val)


def test_generation_is_deterministic_for_a_seed():
    a, b, c = World(3), World(3), World(4)
    assert [p.text for p in a.test_prompts] == [p.text for p in b.test_prompts]
    assert [p.text for p in a.test_prompts] != [p.text for p in c.test_prompts]
    assert a.sft_examples(50, rng=5) == b.sft_examples(50, rng=5)
    assert a.sft_examples(50, rng=5) != a.sft_examples(50, rng=6)


def test_demonstrator_wrong_rate_in_range():
    """The measured wrong-answer rate of the mixture lies in [0.2, 0.3] and matches the table."""
    ex = World(0).sft_examples(6000, rng=0)
    rate = 1.0 - float(np.mean([correct(e["prompt"], e["completion"]) for e in ex]))
    assert 0.2 <= rate <= 0.3
    assert abs(rate - W.EXPECTED_WRONG_RATE) < 4 * math.sqrt(0.23 * 0.77 / len(ex))


def test_demonstrations_parse_without_garbled_sentences():
    """Every demonstrator writes inside the grammar, with an answer, and under the length limit."""
    rng = np.random.default_rng(0)
    for p in World(0).train_prompts:
        for style in DEMONSTRATORS:
            r = demonstration(p, rng, style)
            kinds = [k for k, _ in parse(p, r)]
            assert "garbled" not in kinds, (style, r)
            assert "answer" in kinds or "bare" in kinds, (style, r)
            assert len(r.split()) <= W.MAX_WORDS, r


def test_sft_examples_cover_every_family_evenly():
    ex = World(0).sft_examples(500, rng=0)
    fams = [lookup(e["prompt"]).family for e in ex]
    assert all(fams.count(f) == 100 for f in FAMILIES)
    assert {e["prompt"] for e in ex} <= {p.text for p in World(0).train_prompts}


def test_export_writes_readable_files(tmp_path, capsys):
    from minirlhf.data import read_prompts, read_sft
    W.main(["export", "--out", str(tmp_path / "d"), "--n-sft", "30", "--seed", "2"])
    sft = read_sft(tmp_path / "d" / "sft.jsonl")
    assert sft == World(2).sft_examples(30, rng=2)
    for name, split in [("prompts", "train"), ("val_prompts", "val"), ("test_prompts", "test")]:
        rows = read_prompts(tmp_path / "d" / f"{name}.jsonl")
        assert [r["prompt"] for r in rows] == [p.text for p in World(2).split(split)]
    W.main(["stats", "--per-prompt", "2"])
    assert "Bayes accuracy" in capsys.readouterr().out
