"""Evaluating a policy on the built-in world: sample responses, then judge them.

`evaluate` samples one (or `repeats`) responses per prompt and returns the gold judge's mean
score, the accuracy, the length and, given a reference model, the KL to it. `final_evaluation`
is what every stage prints at its end (sampled at temperature 1 and greedy). `kl_optimum`
estimates the closed-form optimum π_ref·exp(r/β)/Z of the KL-regularised objective (lecture
ch. 5) by reweighting samples (`tilt`).

    from minirlhf.evaluate import evaluate
    evaluate(policy, tokenizer, World(0).test_prompts, ref=sft_model)   # {"gold", "accuracy", ...}

This module sits above `world.py` (which judges text and runs no model) and the sampler.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .masking import token_logprobs
from .sampler import generate
from .world import BT_TEMPERATURE, PromptLike, correct, gold_reward, lookup, optimal_score


def evaluate(policy, tokenizer, prompts: Sequence[PromptLike], *, ref=None,
             temperature: float = 1.0, max_new_tokens: int = 64, batch_size: int = 256,
             seed: int = 0, n_samples: int = 0, repeats: int = 1, per_sample: bool = False,
             reward=None) -> dict:
    """Sample one response per prompt and judge it.

    Returns mean gold score, accuracy, mean response length (tokens, end excluded), the fraction
    that ended properly, and — given a reference model and temperature 1 — the mean KL to it,
    KL(π‖π_ref) estimated per response as Σ_t log π(y_t) − log π_ref(y_t) over its tokens (k1,
    lecture ch. 5; unbiased because the responses are sampled from π). `samples` holds the first
    `n_samples` (prompt, response, gold) for printing. `repeats` samples each prompt that many
    times (a lower-variance estimate on a small prompt set; greedy decoding needs only 1).
    `per_sample` adds every sample's gold and correctness as arrays "golds" and "correct", in
    prompt order with a prompt's repeats side by side; given `reward`, a function of the sampled
    batch (tokens (B, T), attn_mask (B, T), ended (B,)) -> (B,) such as a reward model's score,
    also its values as "rewards".
    """
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    prompts = [lookup(p) for p in prompts for _ in range(repeats)]
    golds, accs, lengths, ends, kls, samples, rewards = [], [], [], [], [], [], []
    was_training = policy.training
    policy.eval()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        g = generate(policy, [tokenizer.render_prompt(p.text) for p in chunk], max_new_tokens,
                     eos_id=tokenizer.end_id, pad_id=tokenizer.pad_id, temperature=temperature,
                     generator=gen)
        if ref is not None and temperature == 1.0:
            with torch.no_grad():
                ref_logits = ref(g.tokens, g.attn_mask)                              # (B, T, V)
            ref_logp = token_logprobs(ref_logits[:, :-1].float(), g.tokens[:, 1:])  # (B, T-1)
            mask = g.response_mask[:, 1:]
            kl = torch.where(mask, g.logprobs[:, 1:] - ref_logp, 0.0).sum(-1)       # (B,)
            kls += kl.tolist()
        if reward is not None:
            with torch.no_grad():
                rewards += reward(g.tokens, g.attn_mask, g.ended).float().tolist()
        for p, ids, ended in zip(chunk, g.responses(), g.ended.tolist()):
            text = tokenizer.decode(ids)
            golds.append(gold_reward(p, text, ended))
            accs.append(float(correct(p, text)))
            lengths.append(len(ids))
            ends.append(float(ended))
            if len(samples) < n_samples:
                samples.append({"prompt": p.text, "response": text, "gold": golds[-1]})
    policy.train(was_training)
    out = {"gold": float(np.mean(golds)), "accuracy": float(np.mean(accs)),
           "length": float(np.mean(lengths)), "ended": float(np.mean(ends)), "n": len(golds),
           "optimum": float(np.mean([optimal_score(p) for p in prompts]))}
    if kls:
        out["kl"] = float(np.mean(kls))
    if n_samples:
        out["samples"] = samples
    if per_sample:
        out["golds"], out["correct"] = np.array(golds), np.array(accs)
        if reward is not None:
            out["rewards"] = np.array(rewards)
    return out


def final_evaluation(policy, tokenizer, prompts: Sequence[PromptLike], *, ref=None,
                temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                repeats: int = 16) -> dict:
    """The final evaluation every stage prints: `repeats` samples per prompt at `temperature`
    (KL to `ref` included) and greedy decoding. Returns {"sampled": {...}, "greedy": {...}}.
    16 samples for each of the 152 test prompts: the sampled gold's standard error is ~0.007
    (measured from the spread within prompts), so a gap-closed figure moves by ~1.5 points
    between evaluation seeds; with 4 samples it moved by ~3."""
    out = {}
    for name, temp in (("sampled", temperature), ("greedy", 0.0)):
        r = evaluate(policy, tokenizer, prompts, ref=ref if temp == 1.0 else None,
                     temperature=temp, max_new_tokens=max_new_tokens, seed=seed,
                     repeats=repeats if temp > 0 else 1)
        print(f"test ({name}, T={temp:g}): gold {r['gold']:.3f} | accuracy {r['accuracy']:.3f} | "
              f"length {r['length']:.1f} | ended {r['ended']:.3f} | optimum {r['optimum']:.2f}"
              + (f" | kl {r['kl']:.2f}" if "kl" in r else ""), flush=True)
        out[name] = r
    return out


def tilt(scores: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Self-normalised weights of K samples per prompt under π* ∝ π·exp(r/β) (lecture ch. 5).

    scores: (P, K) rewards r of K responses sampled from π for each of P prompts
    returns weights (P, K), each row summing to 1 (∝ exp(r/β)), and the KL(π*‖π) estimate
            (P,) Σ_k w_k·log(K·w_k): 0 for uniform weights, at most log K
    """
    z = scores / beta
    w = np.exp(z - z.max(axis=1, keepdims=True))  # max subtracted: no overflow for small β
    w /= w.sum(axis=1, keepdims=True)
    K = scores.shape[1]
    kl = np.sum(np.where(w > 0, w * np.log(np.maximum(w * K, 1e-300)), 0.0), axis=1)
    return w, kl


def kl_optimum(policy, tokenizer, prompts: Sequence[PromptLike], betas: Sequence[float], *,
               samples_per_prompt: int = 64, max_new_tokens: int = 64, seed: int = 0,
               reward=None) -> list[dict]:
    """What the KL-regularised objective max_π E[r] − β·KL(π‖π_ref) is worth at each β, with
    π_ref = `policy` and r the labeller's own utility, gold / BT_TEMPERATURE (the scale on which
    preference labels are drawn, and so the scale a perfect reward model learns).

    Its optimum has the closed form π*(y|x) = π_ref(y|x)·exp(r(x, y)/β)/Z(x) (lecture ch. 5; DPO
    paper eq. 4): the target DPO at β converges to with unlimited pairs, and PPO at β with a
    perfect reward model. It is estimated by sampling K responses per prompt from π_ref at
    temperature 1 and weighting each by exp(r/β) (`tilt`). With finite K the estimate can pick
    only among the samples, so gold is a slight underestimate and KL is at most log K.
    Returns [{"beta", "gold", "accuracy", "kl"}] in the order of `betas`.

    Given `reward` (as in `evaluate`: a trained reward model's score of the sampled batch), each
    point also holds "reward_model": {"gold", "accuracy", "kl"} of π_SFT·exp(r_φ/β)/Z on the same
    samples — the optimum of the objective PPO at β actually maximises, judged by gold: what PPO
    can reach with that reward model, however well it optimises.
    """
    K = samples_per_prompt
    r = evaluate(policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed,
                 batch_size=max(1, 512 // K) * K, repeats=K, per_sample=True, reward=reward)
    golds, accs = r["golds"].reshape(-1, K), r["correct"].reshape(-1, K)      # (P, K)

    def point(scores, beta):
        w, kl = tilt(scores, beta)
        return {"gold": float((w * golds).sum(1).mean()),
                "accuracy": float((w * accs).sum(1).mean()), "kl": float(kl.mean())}
    out = []
    for beta in betas:
        out.append({"beta": float(beta), **point(golds / BT_TEMPERATURE, beta)})
        if reward is not None:
            out[-1]["reward_model"] = point(r["rewards"].reshape(-1, K), beta)
    return out
