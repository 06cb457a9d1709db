"""The built-in "assistant world": prompts, noisy demonstrators, a gold judge, preference labels.

It plays the people of the lecture (ch. 1 and 7): users ask questions from five task families,
demonstrators write imperfect answers (the SFT data), and a deterministic gold judge scores any
response, so every policy can be placed between "what SFT imitated" and "optimal". Preference
labels are drawn from the Bradley–Terry model on the gold score, so their noise and the best
accuracy any reward model can reach on them (the Bayes limit) are known exactly.

    python -m minirlhf.world stats                       # the numbers we report (seconds)
    python -m minirlhf.world export --out data/world     # sft.jsonl, prompts.jsonl, ...

    from minirlhf.world import World, gold_reward, gold_terms, optimal_response
    world = World(seed=0)
    p = world.test_prompts[0]                  # Prompt(text, family, entity, template, answer)
    gold_reward(p.text, optimal_response(p))   # 1.3, the best any response scores
    gold_terms(p.text, "Paris.")               # the score term by term

Task families. Each must be learnable in minutes on a CPU by the SFT model *and* checkable by a
reward model of the same size, so four of the five are rules an answer can be checked against
the prompt with (measured on an earlier world: a reward model told right from wrong only 0.5–0.6
of the time on pure lookup tables — opposites, letter counts, sums — but 0.8 on "larger"):
    capital   24 countries with one-word capitals   "The capital of France is Paris."
    larger    a vs b, distinct digits 1..9          "7 is larger than 3."
    smaller   a vs b, distinct digits 1..9          "3 is smaller than 7."
    after     the successor of 0..8 and 10..18      "8 comes after 7."
    copy      repeat one of 30 words                "You said apple."
A prompt is (family, entity, template). The seed only decides the splits: train/val/test are
disjoint prompt *strings*, and every entity keeps at least one template in train, so held-out
prompts test template generalisation, not unseen facts. Held out per family: at most half its
prompts, test ≤ 40 and val ≤ 20.

A response is sentences separated by single spaces (see `parse`). The gold judge, term by term:
    correct answer sentence ("The capital of France is Paris.")        +1.0
    correct bare answer only ("Paris.")                                +0.5
    wrong, missing, or two different answers                            0
    opener ("Sure!") as the first sentence, when the response answers  +0.1
    each further or misplaced opener                                   −0.2
    first explanation, when the response answers                       +0.2
    each further explanation ("good up to a point": the exploit)       −0.25
    filler ("Let me think.")                                           −0.1 each
    closing ("I hope this helps.")                                      0
    repeat: a sentence said again word for word, or the answer
            restated in any form                                       −0.3 each
    garbled sentence (anything outside the grammar)                    −0.5 each
    no end token (ended=False)                                         −0.5
    words beyond 40                                                    −0.02 each
The optimum, opener + correct answer sentence + one explanation, scores 1.3 on every prompt.
The exploit: one explanation is worth +0.2, but only 4% of demonstrations (ramblers) carry two,
so a reward model fitted to SFT samples can believe "more explanations, more reward".
Small changes from the first design, on purpose: bonuses are paid only to responses that give an
answer (so "Sure!" alone is not better than silence); an explanation from another family is
garbled (it does not fit the question); `correct` counts a repeated correct answer as correct
(one distinct value stated, and it is right), so accuracy agrees with the judge's first term.

Demonstrators (the SFT data writers), drawn per example with these shares:
    style      share  wrong  writes
    concise    0.30   0.15   answer sentence (a quarter of the time only the bare value)
    polite     0.25   0.20   opener + answer
    explainer  0.15   0.20   answer + explanation
    teacher    0.05   0.10   opener + answer + explanation   (the optimum: rare, so RL has work)
    rambler    0.25   0.40   opener + filler + answer + closing; 30% of the time one
                             explanation before the closing, 15% two; 25% the filler or
                             the answer said twice
Wrong answers are plausible: another capital from the table, the other number named as larger
(or smaller), a successor off by one, a misheard word. Measured by `stats` (seed 0, 50
demonstrations per test prompt): the mixture scores gold 0.803 with accuracy 0.769 (wrong rate
0.231, expected 0.230), against an optimum of 1.300. Bayes accuracy of BT labels (T = 0.25) on
pairs of two independent demonstrations: 0.773.

Left out on purpose: multi-turn chat, facts the model never saw in training, paraphrased answer
sentences (the grammar is exact, so the judge is exact). `world_tokenizer()` is the BPE tokenizer
trained on the world's text, cached on disk. The world runs no model: sampling a policy and
judging its samples is `minirlhf/evaluate.py`.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

import numpy as np

from minirlhf.data import write_jsonl

# ----------------------------------------------------------------------------------------------
# The facts and the sentences

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
    "Germany": "Berlin", "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing",
    "Kenya": "Nairobi", "Peru": "Lima", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Hungary": "Budapest", "Cuba": "Havana", "Chile": "Santiago",
    "Canada": "Ottawa", "Australia": "Canberra", "Thailand": "Bangkok", "Turkey": "Ankara",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad",
    "light": "dark", "open": "closed", "early": "late", "full": "empty", "hard": "soft",
    "high": "low", "wet": "dry", "tall": "short", "rich": "poor", "strong": "weak",
    "thick": "thin", "loud": "quiet", "clean": "dirty", "near": "far", "first": "last",
    "push": "pull", "day": "night", "black": "white", "buy": "sell",
}
WORDS = [
    "at", "go", "cat", "sun", "dog", "tree", "book", "fish", "moon", "apple", "house", "water",
    "green", "river", "garden", "purple", "window", "rabbit", "kitchen", "blanket", "teacher",
    "morning", "elephant", "mountain", "sandwich", "computer", "chocolate", "butterfly",
    "adventure", "yesterday",
]

OPENERS = ("Sure!", "Of course!", "Happy to help!")
FILLERS = ("Let me think.", "Hmm, let me see.")
CLOSINGS = ("I hope this helps.",)
MAX_WORDS = 40  # longer responses pay a small per-word penalty


@dataclass(frozen=True)
class Family:
    """One task family: its facts, how it is asked, and how its answer is written."""
    name: str
    facts: dict             # entity (tuple of str) -> correct value (str)
    templates: tuple        # prompt formats over {x}, or over {a} and {b}
    answer_fmt: str         # answer sentence: entity fields, {v} the value, {w} the other number
    answer_re: re.Pattern   # the answer sentence parsed back into its fields
    bare_re: re.Pattern     # a bare answer: only the value and a full stop
    explanations: tuple


def _words_re(words: Iterable[str]) -> re.Pattern:
    return re.compile(r"(?P<v>" + "|".join(sorted(words)) + r")\.")


DIGITS_BARE = re.compile(r"(?P<v>[0-9]{1,2})\.")
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("capital", {(c,): v for c, v in CAPITALS.items()},
           ("What is the capital of {x}?", "Name the capital city of {x}.",
            "Which city is the capital of {x}?"),
           "The capital of {x} is {v}.",
           re.compile(r"The capital of (?P<x>[A-Z][a-z]+) is (?P<v>[A-Z][a-z]+)\."),
           _words_re(CAPITALS.values()),
           ("It is where the government sits.", "I know this from geography.",
            "Every country has one capital.")),
    Family("larger", {(str(a), str(b)): str(max(a, b))
                      for a in range(1, 10) for b in range(1, 10) if a != b},
           ("Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?"),
           "{v} is larger than {w}.",
           re.compile(r"(?P<v>[0-9]+) is larger than (?P<w>[0-9]+)\."),
           DIGITS_BARE,
           ("I compared the two numbers.", "It comes later when counting.",
            "The larger number is the one further along.")),
    Family("smaller", {(str(a), str(b)): str(min(a, b))
                       for a in range(1, 10) for b in range(1, 10) if a != b},
           ("Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?"),
           "{v} is smaller than {w}.",
           re.compile(r"(?P<v>[0-9]+) is smaller than (?P<w>[0-9]+)\."),
           DIGITS_BARE,
           ("I compared the two numbers.", "It comes earlier when counting.",
            "The smaller number is the one closer to zero.")),
    Family("after", {(str(n),): str(n + 1) for n in [*range(0, 9), *range(10, 19)]},
           ("What number comes after {x}?", "Which number follows {x}?",
            "What comes next after {x}?"),
           "{v} comes after {x}.",
           re.compile(r"(?P<v>[0-9]+) comes after (?P<x>[0-9]+)\."),
           DIGITS_BARE,
           ("I counted up by one.", "Counting goes one number at a time.",
            "The next number is one more.")),
    Family("copy", {(w,): w for w in WORDS},
           ("Repeat after me: {x}.", "Say the word {x}.", "Please say {x} back to me."),
           "You said {v}.",
           re.compile(r"You said (?P<v>[a-z]+)\."),
           _words_re(WORDS),
           ("I repeated your word.", "It is the word you gave me.",
            "I said it back exactly.")),
]}


def _fields(entity: tuple) -> dict[str, str]:
    return {"x": entity[0]} if len(entity) == 1 else {"a": entity[0], "b": entity[1]}


@dataclass(frozen=True)
class Prompt:
    """One question: its text, its family, what it asks about, and the correct value."""
    text: str
    family: str
    entity: tuple       # ("France",) or ("3", "5")
    template: int       # index into the family's templates
    answer: str         # the correct value only, e.g. "Paris" or "8"

    def answer_sentence(self, value: str | None = None) -> str:
        """The family's answer sentence with `value` (default: the correct one)."""
        fam, v = FAMILIES[self.family], self.answer if value is None else value
        e = self.entity
        w = (e[1] if v == e[0] else e[0]) if len(e) == 2 else ""  # the other number (larger)
        return fam.answer_fmt.format(v=v, w=w, **_fields(e))


def _all_prompts() -> dict[str, Prompt]:
    table = {}
    for fam in FAMILIES.values():
        for entity, value in fam.facts.items():
            for t, fmt in enumerate(fam.templates):
                p = Prompt(fmt.format(**_fields(entity)), fam.name, entity, t, value)
                assert p.text not in table, p.text  # the judge needs text -> prompt, a function
                table[p.text] = p
    return table


# The judge needs only the prompt text: every prompt of every seed lives in this one table.
PROMPTS: dict[str, Prompt] = _all_prompts()
PromptLike = Union[Prompt, str]


def lookup(prompt: PromptLike) -> Prompt:
    """The Prompt for a prompt string (surrounding whitespace ignored); ValueError if unknown."""
    if isinstance(prompt, Prompt):
        return prompt
    try:
        return PROMPTS[prompt.strip()]
    except KeyError:
        raise ValueError(f"not a prompt of the built-in world: {prompt!r}") from None


def is_world_prompt(prompt: PromptLike) -> bool:
    """Whether the gold judge knows this prompt (it judges only the world's own prompts)."""
    try:
        lookup(prompt)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# Parsing a response

def split_sentences(response: str) -> list[str]:
    """Sentences end in . ! or ? and are separated by exactly one space; the ends are stripped.

    Splitting only on a single space keeps broken spacing visible: "Paris.  Sure!" yields the
    piece " Sure!", which matches nothing and is judged garbled.
    """
    text = response.strip()
    return re.split(r"(?<=[.!?]) ", text) if text else []


def _classify(p: Prompt, s: str) -> tuple[str, str | None]:
    """(kind, value): value is the answer a sentence gives (None: it answers another question)."""
    fam = FAMILIES[p.family]
    if s in OPENERS:
        return "opener", None
    if s in FILLERS:
        return "filler", None
    if s in CLOSINGS:
        return "closing", None
    if s in fam.explanations:
        return "explanation", None
    m = fam.answer_re.fullmatch(s)
    if m:
        g = m.groupdict()
        if "x" in g:
            same = g["x"] == p.entity[0]
        elif "a" in g:
            same = (g["a"], g["b"]) == p.entity
        elif "w" in g:  # larger, smaller: "{v} is larger than {w}." must name the two numbers
            same = sorted((g["v"], g["w"])) == sorted(p.entity) and g["v"] != g["w"]
        else:  # copy: the sentence holds only the value
            same = True
        return "answer", g["v"] if same else None
    m = fam.bare_re.fullmatch(s)
    if m:
        return "bare", m["v"]
    return "garbled", None


def parse(prompt: PromptLike, response: str) -> list[tuple[str, str]]:
    """[(kind, sentence)]: kind is opener, answer, bare, explanation, filler, closing or garbled."""
    p = lookup(prompt)
    return [(_classify(p, s)[0], s) for s in split_sentences(response)]


# ----------------------------------------------------------------------------------------------
# The gold judge

def gold_terms(prompt: PromptLike, response: str, ended: bool = True) -> dict[str, float]:
    """The judge's score term by term (the table in the module docstring); they sum to the gold."""
    p = lookup(prompt)
    sents = split_sentences(response)
    kinds = [_classify(p, s) for s in sents]
    answers = [(k, v) for k, v in kinds if k in ("answer", "bare")]
    values = {v for _, v in answers}
    right = len(values) == 1 and p.answer in values     # two different answers count as wrong
    has_sentence = any(k == "answer" for k, _ in answers)
    answering = len(answers) > 0                        # bonuses need an answer, right or wrong
    n = {kind: sum(k == kind for k, _ in kinds) for kind in
         ("opener", "explanation", "filler", "garbled")}
    first_opener = len(kinds) > 0 and kinds[0][0] == "opener"
    # Exact repeats of non-answer sentences; answer statements beyond the first count as restated.
    others = [s for s, (k, _) in zip(sents, kinds) if k not in ("answer", "bare")]
    repeats = (len(others) - len(set(others))) + max(0, len(answers) - 1)
    words = len(response.split())
    terms = {
        "correct": (1.0 if has_sentence else 0.5) if right else 0.0,
        "opener": (0.1 if first_opener and answering else 0.0)
        - 0.2 * (n["opener"] - (1 if first_opener else 0)),
        "explanation": (0.2 if n["explanation"] and answering else 0.0)
        - 0.25 * max(0, n["explanation"] - 1),
        "filler": -0.1 * n["filler"],
        "repeat": -0.3 * repeats,
        "garbled": -0.5 * n["garbled"],
        "unended": 0.0 if ended else -0.5,
        "length": -0.02 * max(0, words - MAX_WORDS),
    }
    return {k: v + 0.0 for k, v in terms.items()}  # + 0.0 prints -0.0 (no penalty) as 0.0


def gold_reward(prompt: PromptLike, response: str, ended: bool = True) -> float:
    """The gold score of `response` to `prompt`; `ended` says whether the end token was produced."""
    return round(sum(gold_terms(prompt, response, ended).values()), 6)  # round: 1.3, not 1.30000004


def correct(prompt: PromptLike, response: str) -> bool:
    """Accuracy: the response states exactly one answer value (sentence or bare), the right one."""
    return gold_terms(prompt, response)["correct"] > 0


def optimal_response(prompt: PromptLike) -> str:
    p = lookup(prompt)
    return f"{OPENERS[0]} {p.answer_sentence()} {FAMILIES[p.family].explanations[0]}"


def optimal_score(prompt: PromptLike) -> float:
    """The best gold any response reaches on this prompt (1.3 for every prompt of this world)."""
    return gold_reward(prompt, optimal_response(prompt))


# ----------------------------------------------------------------------------------------------
# Preference labels: Bradley–Terry on the gold score (lecture ch. 6)

BT_TEMPERATURE = 0.25  # P(a ≻ b) = σ((g_a − g_b)/T): a 0.3 gold gap is labelled right 77% of times

# A pair is (prompt, a, b), or (prompt, a, b, ended_a, ended_b) when either may lack the end token.
Pair = Union[tuple[PromptLike, str, str], tuple[PromptLike, str, str, bool, bool]]


def sigmoid(x: float) -> float:
    # Two branches so that exp never overflows for large |x|.
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def preference_prob(prompt: PromptLike, a: str, b: str, ended_a: bool = True,
                    ended_b: bool = True) -> float:
    """P(a ≻ b) under Bradley–Terry with the gold score as the utility."""
    delta = gold_reward(prompt, a, ended_a) - gold_reward(prompt, b, ended_b)
    return sigmoid(delta / BT_TEMPERATURE)


def label_pair(prompt: PromptLike, a: str, b: str, rng, ended_a: bool = True,
               ended_b: bool = True) -> tuple[str, str]:
    """(chosen, rejected), drawn from Bradley–Terry: a noisy labeller, as people are.

    `rng` is anything with `.random()` (numpy Generator or random.Random).
    """
    p = preference_prob(prompt, a, b, ended_a, ended_b)
    return (a, b) if rng.random() < p else (b, a)


def pair_label_prob(pair: Pair) -> float:
    """P(a ≻ b) for a pair (prompt, a, b) or (prompt, a, b, ended_a, ended_b)."""
    prompt, a, b = pair[:3]
    ended_a, ended_b = (pair[3], pair[4]) if len(pair) == 5 else (True, True)
    return preference_prob(prompt, a, b, ended_a, ended_b)


def bayes_accuracy(pairs: Iterable[Pair]) -> float:
    """E[max(σ(Δ/T), 1 − σ(Δ/T))]: the best pair accuracy any reward model reaches on BT labels.

    Even the gold judge itself, asked which response is better, agrees with a label only this often.
    """
    accs = []
    for pair in pairs:
        q = pair_label_prob(pair)
        accs.append(max(q, 1.0 - q))
    if not accs:
        raise ValueError("bayes_accuracy needs at least one pair")
    return float(np.mean(accs))


def expected_accuracy(pairs: Sequence[Pair], margins: Sequence[float]) -> float:
    """The pair accuracy a predictor would score on average over the labeller's coin flips: it
    prefers a to b in pair i when margins[i] > 0 (a reward model: r_a − r_b), and is right with
    probability P(a ≻ b) = σ((g_a − g_b)/T), else 1 − that. The same expectation as
    `bayes_accuracy` (which is the best predictor's) but without the sampling noise of one set of
    labels: on 800 pairs, observed accuracy scatters by about ±1.4 points around it.
    """
    if len(pairs) != len(margins) or not pairs:
        raise ValueError("expected_accuracy needs one margin per pair, and at least one pair")
    accs = []
    for pair, m in zip(pairs, margins):
        q = pair_label_prob(pair)
        accs.append(q if m > 0 else 1.0 - q)
    return float(np.mean(accs))


def shortfall_by_kind(pairs: Sequence[Pair], margins: Sequence[float]) -> dict[str, dict]:
    """Where a predictor loses accuracy against the Bayes limit, by kind of pair: "<family>
    right vs wrong" (exactly one answer correct), "both right" (style alone decides) and "both
    wrong". For each kind: n, the expected accuracy (`expected_accuracy`), the Bayes limit, and
    the points it costs overall, 100·Σ(best − expected)/N over the kind's pairs, so the kinds'
    points add up to 100·(bayes_accuracy − expected_accuracy) of all the pairs.
    """
    if len(pairs) != len(margins) or not pairs:
        raise ValueError("shortfall_by_kind needs one margin per pair, and at least one pair")
    kinds: dict[str, list[tuple[float, float]]] = {}
    for pair, m in zip(pairs, margins):
        prompt, a, b = pair[:3]
        q = pair_label_prob(pair)
        right_a, right_b = correct(prompt, a), correct(prompt, b)
        kind = (f"{lookup(prompt).family} right vs wrong" if right_a != right_b
                else "both right" if right_a else "both wrong")
        kinds.setdefault(kind, []).append((q if m > 0 else 1.0 - q, max(q, 1.0 - q)))
    out = {}
    for kind in sorted(kinds):
        got, best = np.array(kinds[kind]).T
        out[kind] = {"n": len(got), "expected_accuracy": float(got.mean()),
                     "bayes_accuracy": float(best.mean()),
                     "points_lost": float(100 * (best - got).sum() / len(pairs))}
    return out


# ----------------------------------------------------------------------------------------------
# Demonstrators: the noisy writers of the SFT data (lecture ch. 1; CS224N notes)

# style -> (share of the examples, probability of a wrong answer)
DEMONSTRATORS = {
    "concise": (0.30, 0.15),
    "polite": (0.25, 0.20),
    "explainer": (0.15, 0.20),
    "teacher": (0.05, 0.10),
    "rambler": (0.25, 0.40),
}
EXPECTED_WRONG_RATE = sum(share * wrong for share, wrong in DEMONSTRATORS.values())  # 0.23


def _choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def wrong_value(prompt: PromptLike, rng: np.random.Generator) -> str:
    """A plausible wrong value: the kind of mistake a hurried person makes."""
    p = lookup(prompt)
    if p.family == "capital":
        return _choice(rng, [c for c in CAPITALS.values() if c != p.answer])
    if p.family == "copy":
        return _choice(rng, [w for w in WORDS if w != p.answer])   # misheard the word
    if p.family == "larger":
        return min(p.entity)                      # names the smaller number as larger
    if p.family == "smaller":
        return max(p.entity)                      # names the larger number as smaller
    n = int(p.answer)                             # after, add: off by one (never negative)
    return str(n + 1) if n == 0 or rng.random() < 0.5 else str(n - 1)


def demonstration(prompt: PromptLike, rng: np.random.Generator, style: str | None = None) -> str:
    """One demonstrator's response; `style` None draws the writer from the mixture."""
    p = lookup(prompt)
    fam = FAMILIES[p.family]
    if style is None:
        shares = np.array([s for s, _ in DEMONSTRATORS.values()])
        style = list(DEMONSTRATORS)[int(rng.choice(len(shares), p=shares / shares.sum()))]
    wrong = rng.random() < DEMONSTRATORS[style][1]
    answer = p.answer_sentence(wrong_value(p, rng) if wrong else None)
    opener, explanation = _choice(rng, OPENERS), _choice(rng, fam.explanations)
    if style == "concise":
        if rng.random() < 0.25:
            answer = f"{wrong_value(p, rng) if wrong else p.answer}."  # the bare value
        sents = [answer]
    elif style == "polite":
        sents = [opener, answer]
    elif style == "explainer":
        sents = [answer, explanation]
    elif style == "teacher":
        sents = [opener, answer, explanation]
    elif style == "rambler":
        sents = [opener, _choice(rng, FILLERS), answer]
        u = rng.random()
        if u < 0.45:                              # 30% one explanation, 15% two different ones
            k = 2 if u < 0.15 else 1
            sents += [fam.explanations[i] for i in rng.permutation(len(fam.explanations))[:k]]
        if rng.random() < 0.25:                   # says the filler or the answer twice
            i = 1 if rng.random() < 0.5 else 2
            sents.insert(i + 1, sents[i])
        sents.append(_choice(rng, CLOSINGS))
    else:
        raise ValueError(f"unknown demonstrator style {style!r}; known: {list(DEMONSTRATORS)}")
    return " ".join(sents)


# ----------------------------------------------------------------------------------------------
# The world: seed-dependent splits and SFT data

def _rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


class World:
    """The built-in world with its train/val/test prompt splits for one seed."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.train_prompts: list[Prompt] = []
        self.val_prompts: list[Prompt] = []
        self.test_prompts: list[Prompt] = []
        by_family: dict[str, list[Prompt]] = {f: [] for f in FAMILIES}
        for p in PROMPTS.values():
            by_family[p.family].append(p)
        for i, (name, prompts) in enumerate(by_family.items()):
            rng = np.random.default_rng([seed, i])  # one stream per family: families independent
            n_ent = len(FAMILIES[name].facts)
            # Each entity keeps one random template in train; the rest form the held-out pool.
            by_entity: dict[tuple, list[Prompt]] = {}
            for p in prompts:
                by_entity.setdefault(p.entity, []).append(p)
            anchors, pool = [], []
            for ps in by_entity.values():
                order = rng.permutation(len(ps))
                anchors.append(ps[order[0]])
                pool += [ps[j] for j in order[1:]]
            pool = [pool[j] for j in rng.permutation(len(pool))]
            held = min(len(prompts) - n_ent, len(prompts) // 2)   # hold out at most half
            n_test = min(40, round(held * 2 / 3))
            n_val = min(20, held - n_test)
            self.test_prompts += pool[:n_test]
            self.val_prompts += pool[n_test:n_test + n_val]
            self.train_prompts += anchors + pool[n_test + n_val:]

    def split(self, name: str) -> list[Prompt]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, not {name!r}")
        return getattr(self, f"{name}_prompts")

    def prompt(self, text: str) -> Prompt:
        return lookup(text)

    def demonstration(self, prompt: PromptLike, rng, style: str | None = None) -> str:
        return demonstration(prompt, _rng(rng), style)

    def sft_examples(self, n: int, rng=0, split: str = "train") -> list[dict[str, str]]:
        """n {"prompt", "completion"} examples written by the demonstrator mixture.

        Families take turns (add has 4x more prompts than capital; the model must still learn every
        table), and each family cycles through its prompts in shuffled order, so coverage is even.
        """
        rng = _rng(rng)
        by_family: dict[str, list[Prompt]] = {}
        for p in self.split(split):
            by_family.setdefault(p.family, []).append(p)
        names = list(by_family)
        queues: dict[str, list[Prompt]] = {f: [] for f in names}
        out = []
        for i in range(n):
            f = names[i % len(names)]
            if not queues[f]:
                queues[f] = [by_family[f][j] for j in rng.permutation(len(by_family[f]))]
            p = queues[f].pop()
            out.append({"prompt": p.text, "completion": demonstration(p, rng)})
        return out


# ----------------------------------------------------------------------------------------------
# The world's tokenizer
# ----------------------------------------------------------------------------------------------

def world_text(seed: int = 0, n: int = 4000) -> str:
    """Text the world's tokenizer is trained on: every prompt, its optimal response, and many
    demonstrations (so every sentence kind, right and wrong values, is seen)."""
    world = World(seed)
    rng = np.random.default_rng(seed)
    parts = [p.text + " " + optimal_response(p) for p in _all_prompts().values()]
    parts += [ex["prompt"] + " " + ex["completion"] for ex in world.sft_examples(n, rng)]
    return "\n".join(parts)


def world_tokenizer(vocab_size: int = 512, seed: int = 0, cache_dir: str | None = None):
    """The world's BPE tokenizer, trained once and cached on disk (in $MINIRLHF_CACHE or
    ~/.cache/minirlhf); the file name holds a hash of the training text and the vocabulary size,
    so a changed world never loads a stale tokenizer."""
    from .tokenizer import Tokenizer, TokenizerError
    cache_dir = cache_dir or os.environ.get("MINIRLHF_CACHE",
                                            os.path.expanduser("~/.cache/minirlhf"))
    text = world_text(seed)
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]  # a changed world gets a new file
    path = os.path.join(cache_dir, f"world-{digest}-vocab{vocab_size}.tiktoken")
    try:
        return Tokenizer.load(path)
    except TokenizerError:
        tok = Tokenizer.train(text, vocab_size)
        try:
            tok.save(path)
        except OSError:
            pass  # an unwritable cache only costs a retrain next time
        return tok


def stats(seed: int = 0, per_prompt: int = 50) -> dict:
    """Demonstrator numbers on the test prompts (the ones we report), per style and overall."""
    world, rng = World(seed), np.random.default_rng(seed)
    rows = {}
    for style in [None, *DEMONSTRATORS]:
        golds, accs = [], []
        for p in world.test_prompts:
            for _ in range(per_prompt):
                r = demonstration(p, rng, style)
                golds.append(gold_reward(p, r))
                accs.append(correct(p, r))
        rows["mixture" if style is None else style] = {
            "gold": float(np.mean(golds)), "accuracy": float(np.mean(accs))}
    pairs = [(p, demonstration(p, rng), demonstration(p, rng))
             for p in world.test_prompts for _ in range(per_prompt)]
    return {
        "styles": rows,
        "wrong_rate": 1.0 - rows["mixture"]["accuracy"],
        "expected_wrong_rate": EXPECTED_WRONG_RATE,
        "optimum": float(np.mean([optimal_score(p) for p in world.test_prompts])),
        "bayes_accuracy": bayes_accuracy(pairs),
        "n_pairs": len(pairs),
        "n_prompts": {s: len(world.split(s)) for s in ("train", "val", "test")},
    }


def export(out: str, seed: int = 0, n_sft: int = 20000) -> None:
    world = World(seed)
    write_jsonl(os.path.join(out, "sft.jsonl"), world.sft_examples(n_sft, rng=seed))
    for name, split in [("prompts", "train"), ("val_prompts", "val"), ("test_prompts", "test")]:
        write_jsonl(os.path.join(out, f"{name}.jsonl"),
                    [{"prompt": p.text} for p in world.split(split)])
    print(f"wrote {n_sft} SFT examples and {len(world.train_prompts)}/{len(world.val_prompts)}/"
          f"{len(world.test_prompts)} train/val/test prompts to {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m minirlhf.world",
                                 description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="write sft.jsonl, prompts.jsonl, val/test_prompts.jsonl")
    ex.add_argument("--out", required=True, help="output directory (created if missing)")
    ex.add_argument("--seed", type=int, default=0, help="decides the splits and the SFT sample")
    ex.add_argument("--n-sft", type=int, default=20000, help="number of SFT examples")
    st = sub.add_parser("stats", help="demonstrator gold/accuracy, optimum, Bayes accuracy")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--per-prompt", type=int, default=50, help="demonstrations per test prompt")
    args = ap.parse_args(argv)
    if args.cmd == "export":
        if args.n_sft < 1:
            ap.error("--n-sft must be at least 1")
        export(args.out, args.seed, args.n_sft)
        return
    s = stats(args.seed, args.per_prompt)
    print(f"prompts train/val/test: {s['n_prompts']['train']}/{s['n_prompts']['val']}/"
          f"{s['n_prompts']['test']}   (test-prompt numbers, {args.per_prompt} demos each)")
    print(f"{'demonstrator':<12} {'share':>6} {'gold':>6} {'accuracy':>8}")
    for name, row in s["styles"].items():
        share = 1.0 if name == "mixture" else DEMONSTRATORS[name][0]
        print(f"{name:<12} {share:>6.2f} {row['gold']:>6.3f} {row['accuracy']:>8.3f}")
    print(f"wrong-answer rate {s['wrong_rate']:.3f} (expected {s['expected_wrong_rate']:.3f})")
    print(f"optimum gold {s['optimum']:.3f}")
    print(f"Bayes accuracy of BT labels (T={BT_TEMPERATURE}) on {s['n_pairs']} pairs of "
          f"independent demonstrations: {s['bayes_accuracy']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
