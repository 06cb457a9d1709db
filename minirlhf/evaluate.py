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

import os
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import CheckpointError, load_stage
from .data import read_prompts, write_jsonl
from .device import autocast
from .masking import token_logprobs
from .sampler import generate
from .training import by_length
from .world import (BT_TEMPERATURE, Prompt, PromptLike, World, correct, gold_reward,
                    is_world_prompt, optimal_score)


def evaluate(policy, tokenizer, prompts: Sequence[PromptLike], *, ref=None,
             temperature: float = 1.0, max_new_tokens: int = 64, batch_size: int = 256,
             seed: int = 0, n_samples: int = 0, repeats: int = 1, per_sample: bool = False,
             reward=None, records: bool = False, desc: str | None = None) -> dict:
    """Sample `repeats` responses per prompt and describe them: mean length (tokens, end
    excluded) and the fraction that ended properly; given a reference model and temperature 1,
    the mean KL to it, KL(π‖π_ref) estimated per response as Σ_t log π(y_t) − log π_ref(y_t)
    over its tokens (k1, lecture ch. 5; unbiased because the responses are sampled from π);
    given `reward`, a function of the sampled batch (tokens (B, T), attn_mask (B, T), ended
    (B,), prompts, responses: B texts each) -> (B,), such as a reward model's score or a
    grading function (minirlhf/graders.py), its mean. The gold judge scores the responses
    to the world's own prompts (any prompt it knows, whatever the tokenizer): "gold",
    "accuracy" and "optimum" average those.

    `samples` holds the first `n_samples` (prompt, response, gold) for printing. `per_sample`
    adds every sample's gold and correctness as arrays "golds" and "correct" (world prompts), in
    prompt order with a prompt's repeats side by side, and "rewards" given `reward`. `records`
    adds "records": one dict per response (prompt, response, greedy, length, ended and, where
    known, kl, reward, gold, correct), the lines of samples.jsonl. `desc` shows a progress bar.
    """
    device = next(policy.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts for _ in range(repeats)]
    golds, accs, lengths, ends, kls, samples, rewards, recs = [], [], [], [], [], [], [], []
    was_training = policy.training
    policy.eval()
    bar = tqdm(total=len(texts), desc=desc, disable=None if desc else True, leave=False)
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        rendered = [tokenizer.render_prompt(p) for p in chunk]
        budget = min(max_new_tokens, policy.config.block_size - max(map(len, rendered)))
        if budget < 1:  # a prompt of your own data may leave less room than --max-new-tokens
            raise ValueError(f"an evaluation prompt of {max(map(len, rendered))} tokens leaves "
                             f"no room for a response in the block size")
        g = generate(policy, rendered, budget, eos_id=tokenizer.end_id,
                     pad_id=tokenizer.pad_id, temperature=temperature, generator=gen)
        kl = reward_of = None
        if ref is not None and temperature == 1.0:
            with torch.no_grad():                                                 # (B, T-1)
                ref_logp = by_length(lambda x, m: token_logprobs(ref(x, m)[:, :-1].float(),
                                                                 x[:, 1:]),
                                     g.tokens, g.attn_mask, g.tokens.device)
            mask = g.response_mask[:, 1:]
            kl = torch.where(mask, g.logprobs[:, 1:] - ref_logp, 0.0).sum(-1).tolist()  # (B,)
            kls += kl
        responses = [tokenizer.decode(ids) for ids in g.responses()]
        if reward is not None:
            with torch.no_grad():
                reward_of = reward(g.tokens, g.attn_mask, g.ended, chunk,
                                   responses).float().tolist()
            rewards += reward_of
        for j, (p, ids, ended) in enumerate(zip(chunk, g.responses(), g.ended.tolist())):
            rec = {"prompt": p, "response": responses[j], "greedy": temperature == 0,
                   "length": len(ids), "ended": bool(ended)}
            rec.update({} if kl is None else {"kl": kl[j]})
            rec.update({} if reward_of is None else {"reward": reward_of[j]})
            lengths.append(len(ids))
            ends.append(float(ended))
            if is_world_prompt(p):  # the gold judge knows the world's prompts only
                rec["gold"] = gold_reward(p, rec["response"], ended)
                rec["correct"] = correct(p, rec["response"])
                golds.append(rec["gold"])
                accs.append(float(rec["correct"]))
            if len(samples) < n_samples:
                samples.append({"prompt": p, "response": rec["response"],
                                "gold": rec.get("gold")})
            recs.append(rec)
        bar.update(len(chunk))
    bar.close()
    policy.train(was_training)
    out = {"length": float(np.mean(lengths)), "ended": float(np.mean(ends)), "n": len(texts)}
    if golds:
        world_prompts = [p for p in texts if is_world_prompt(p)]
        out = {"gold": float(np.mean(golds)), "accuracy": float(np.mean(accs)), **out,
               "optimum": float(np.mean([optimal_score(p) for p in world_prompts]))}
        if len(golds) < len(texts):
            out["n_judged"] = len(golds)
    if kls:
        out["kl"] = float(np.mean(kls))
    if rewards:
        out["reward"] = float(np.mean(rewards))
    if n_samples:
        out["samples"] = samples
    if per_sample:
        out["golds"], out["correct"] = np.array(golds), np.array(accs)
        if reward is not None:
            out["rewards"] = np.array(rewards)
    if records:
        out["records"] = recs
    return out


def final_evaluation(policy, tokenizer, prompts: Sequence[PromptLike], *, ref=None,
                     reward=None, temperature: float = 1.0, max_new_tokens: int = 64,
                     seed: int = 0, repeats: int = 16, out_dir: str | None = None) -> dict:
    """The final evaluation every stage prints: `repeats` samples per prompt at `temperature`
    (KL to `ref` included) and greedy decoding. Returns {"sampled": {...}, "greedy": {...}}
    and, given `out_dir`, writes every response to OUT/samples.jsonl (`write_samples`).
    16 samples for each of the 152 test prompts: the sampled gold's standard error is ~0.007,
    so a gap-closed figure moves by ~1.5 points between evaluation seeds (docs/results.md)."""
    out, lines = {}, []
    for name, temp in (("sampled", temperature), ("greedy", 0.0)):
        r = evaluate(policy, tokenizer, prompts, ref=ref if temp == 1.0 else None,
                     reward=reward, temperature=temp, max_new_tokens=max_new_tokens, seed=seed,
                     repeats=repeats if temp > 0 else 1, records=True, desc=f"eval {name}")
        lines += r.pop("records")
        judged = (f"gold {r['gold']:.3f} | accuracy {r['accuracy']:.3f} | " if "gold" in r
                  else "")
        print(f"test ({name}, T={temp:g}): {judged}length {r['length']:.1f} | ended "
              f"{r['ended']:.3f}" + (f" | optimum {r['optimum']:.2f}" if "optimum" in r else "")
              + (f" | kl {r['kl']:.2f}" if "kl" in r else "")
              + (f" | reward {r['reward']:+.3f}" if "reward" in r else ""), flush=True)
        out[name] = r
    if out_dir is not None:
        write_samples(out_dir, lines)
    return out


def write_samples(out_dir: str, records: list[dict], step: int | None = None) -> str:
    """OUT/samples.jsonl: one line per response (prompt, response, greedy, length, ended, and
    where known kl, reward, gold, correct; `step` when given), written atomically."""
    path = os.path.join(out_dir, "samples.jsonl")
    write_jsonl(path, [r if step is None else {"step": step, **r} for r in records])
    return path


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


def evaluation_prompts(path: str | None, training_prompts: list[str], held_out: list[str], tok,
                       max_len: int, seed: int) -> tuple[list[str], str]:
    """The prompts a stage is judged on at its end, and a line saying where they come from:
    --eval-prompts FILE when given; else the built-in world's test prompts when every training
    prompt is one of the world's; else `held_out`, prompts of data the stage did not train on
    (each once). `max_len`: the longest prompt, in tokens, that leaves room for a response."""
    if path:
        rows = read_prompts(path, tok, max_len)
        return [r["prompt"] for r in rows], f"{path} ({len(rows)} prompts)"
    if all(is_world_prompt(p) for p in training_prompts):
        test = [p.text for p in World(seed).test_prompts]
        return test, f"the built-in world's test prompts ({len(test)})"
    held = list(dict.fromkeys(held_out))
    if not held:
        raise ValueError("no prompts to evaluate on: pass --eval-prompts FILE")
    return held, f"{len(held)} prompts held out from the training data"


def reward_model_scorer(reward_model, device, no_end_penalty: float = 0.0):
    """`evaluate`'s reward: the reward model's score r_φ(x, y) of each sampled response, plus
    `no_end_penalty` for a response that never ended (as PPO's rollout scores it)."""
    def score(tokens, attn_mask, ended, prompts=None, responses=None):
        with autocast(device):                                                      # (B,)
            r = by_length(lambda x, m: reward_model.score(x, m).float(), tokens, attn_mask,
                          device)
        return r + no_end_penalty * (~ended).float()
    return score


def stage_scorer(path: str, tok, device):
    """`reward_model_scorer` of the reward model in a stage folder (a stage's --rm flag)."""
    reward_model, rm_tok, _ = load_stage(path, "scalar", device)
    if rm_tok.fingerprint() != tok.fingerprint():
        raise CheckpointError(f"--rm {path}: the reward model uses another tokenizer")
    return reward_model_scorer(reward_model.eval(), device)
