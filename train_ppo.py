"""RLHF with PPO: improve the policy against the reward model, penalised by its KL to the SFT
reference (lecture ch. 4 PPO, ch. 5 the KL-penalised objective, ch. 7 the four-model loop).

    python train_ppo.py --sft out/sft --rm out/rm                # ~2 min on 2 CPU cores
    python train_ppo.py --kl-coef 0 --out out/ppo_no_kl          # no KL anchor: reward hacking
    python train_ppo.py --advantage bandit                        # the lecture's γ = 0 form
    python train_ppo.py --advantage group                         # critic-free RLOO baseline
    python train_ppo.py --reward verifier --out out/rft           # RFT: 1 for a right answer
    python train_ppo.py --reward verifier --advantage grpo        # GRPO: group-normalised, k3 KL
    python train_ppo.py --reward gold --out out/ppo_gold          # a perfect labeller (world)
    python train_ppo.py --resume                                  # continue a stopped run
    torchrun --standalone --nproc_per_node 4 train_ppo.py         # 4 GPUs, 1/4 of the prompts each

Four models (lecture ch. 7), loaded in the first line of `train()`: the policy π_θ (trainable,
starts as the SFT model), the reference π_ref (a frozen SFT copy), the reward model r_φ (frozen)
and the value model V_ψ (trainable, starts as the reward model). One iteration is three phases,
each a function below:
  1. `rollout` (no grad): sample responses from π_θ; score them with r_φ; record log π_θold,
     log π_ref and V(s_t);
  2. `compute_advantages`: per-token reward −β·(log π_θ − log π_ref) plus r_φ(x, y) on the last
     token (`minirlhf.rl.kl_penalised_rewards`), then GAE(γ, λ) and whitening; or the lecture's
     γ = 0 form A = R − V(x) (`minirlhf.rl.bandit_advantages`), or RLOO;
  3. `ppo_update`: shuffled minibatches of the rollout (--epochs passes), one step each on
     L_PPO = L^CLIP − c1·L^VF + c2·H.
Every iteration logs the proxy reward (r_φ), the KL to the reference, the PPO diagnostics, and
the gold judge's score of the same rollouts, so reward hacking is visible when it happens.

Writes OUT/checkpoint.pt (the policy; the value model and KL controller ride in it for
--resume), OUT/metrics.jsonl, OUT/eval.json (test prompts: gold, accuracy, KL, proxy).

The reward need not be a reward model (CS224N, "Reinforcement Fine-Tuning"): --reward verifier
is a grading function, 1 for a right answer (the world's checker, or your `module:function`),
--reward gold the world's gold judge, on its labellers' scale (minirlhf/graders.py). Then no
reward model is loaded and V_ψ starts from the SFT trunk. --advantage grpo (Shao et al. 2024)
drops V_ψ: A = (R − mean of the prompt's k responses)/std, and β·KL leaves the reward for a k3
term in the loss (`grpo_loss`).

Left out on purpose: a shared policy/value trunk, reward whitening across iterations, several
reward models, multi-turn episodes.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from minirlhf.checkpoint import (CHECKPOINT, CheckpointError, check_compatible, check_stage,
                                 load_checkpoint, load_stage, rng_state, save_stage,
                                 set_rng_state)
from minirlhf.config import check_ranges, parse_config
from minirlhf.data import DataError, hold_out, read_prompts
from minirlhf.device import autocast, maybe_compile, uses_bf16
from minirlhf.distributed import masked_mean_var, mean_over_ranks, shard, wrap
from minirlhf.masking import masked_mean, masked_var, masked_whiten, token_entropy, token_logprobs
from minirlhf.model import ScalarHeadModel
from minirlhf.rl import (AdaptiveKLController, FixedKLController, bandit_advantages, gae,
                         group_baseline_advantages, group_normalized_advantages, kl_loss,
                         kl_penalised_return, kl_penalised_rewards, token_kl)
from minirlhf.sampler import Generation, generate
from minirlhf.tokenizer import TokenizerError
from minirlhf.training import (NonFiniteError, by_length, check_finite, fail, guarded_run,
                               live_columns, make_optimizer, open_log, read_metrics, set_lr,
                               start_run, write_json)
from minirlhf.evaluate import evaluate, evaluation_prompts, final_evaluation, write_samples
from minirlhf.graders import GraderError, all_world_prompts, make_reward
from minirlhf.world import World, correct, gold_reward, is_world_prompt


LOG_RATIO_BOUND = 20.0  # |log π_θ/π_θold| is clamped here inside policy_loss


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, returned as a loss to minimise: −L^CLIP (lecture ch. 4).

    logp:       (B, T) log π_θ(a_t|s_t) of the sampled tokens under the current policy (grad)
    old_logp:   (B, T) the same under the policy that sampled them, π_θold (no grad)
    advantages: (B, T) A_t (no grad)
    mask:       (B, T) 1 on response tokens
    returns     loss (scalar), stats {"policy_loss", "approx_kl", "clipfrac", "ratio"}

        L^CLIP = mean_t min(r_t·A_t, clip(r_t, 1−ε, 1+ε)·A_t),   r_t = π_θ/π_θold

    mean_t is a token mean over the batch. Once r_t has left [1−ε, 1+ε] in the direction A_t
    favours, the clipped term wins the min and the token's gradient is exactly 0 (ch. 4 table).
    Stats: approx_kl is Schulman's k3 estimate of KL(π_θold‖π_θ) from the old policy's samples,
    (r − 1) − log r; clipfrac the fraction of tokens with |r − 1| > ε; ratio the mean r_t.
    All use log r clamped to ±LOG_RATIO_BOUND, which keeps loss and stats finite (see below).
    """
    # The log-ratio is clamped to ±LOG_RATIO_BOUND: exp overflows float32 past 88, and a ratio
    # beyond e^±20 only arises when rollout and update disagree completely. Within the bound
    # nothing changes. Beyond it the token's gradient is 0, as clipping already makes it for
    # A > 0, r > 1+ε; where the unclipped term was active (A < 0 with r > e^20, A > 0 with
    # r < e^−20) that gradient is lost.
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # (B, T)
    ratio = log_ratio.exp()  # (B, T) r_t(θ), lecture ch. 4
    surr_unclipped = ratio * advantages  # (B, T) r_t·A_t, L^CPI
    surr_clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages  # (B, T) clip(r_t)·A_t
    l_clip = masked_mean(torch.min(surr_unclipped, surr_clipped), mask)  # L^CLIP, lecture ch. 4
    loss = -l_clip  # we minimise
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),  # k3
            "clipfrac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[returns − values] / Var[returns] over real tokens: 1 is a perfect value model,
    0 no better than predicting the mean, < 0 worse. NaN when the returns are constant.

    values, returns, mask: (B, T) -> scalar.
    """
    var_returns = masked_var(returns, mask)
    if var_returns == 0:
        return returns.new_tensor(float("nan"))
    return 1 - masked_var(returns - values, mask) / var_returns


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range: float | None = None) -> tuple[torch.Tensor, dict]:
    """Value regression L^VF = mean_t ½·(V(s_t) − V_target)² (lecture ch. 4).

    values:     (B, T) V_ψ(s_t) from the value model being trained (grad)
    old_values: (B, T) the values predicted at rollout time (no grad); used only when clipping
    returns:    (B, T) V_target, e.g. the returns from `minirlhf.rl.gae` (no grad)
    mask:       (B, T) 1 on response tokens
    clip_range: None, or the PPO2 value clip: V is also evaluated clipped to old_values ± clip
                and the larger (more pessimistic) of the two squared errors is used
    returns     loss (scalar), stats {"value_loss", "explained_variance", "value_clipfrac"}
                (value_clipfrac: the fraction of tokens with |V − V_old| > clip_range)

    The ½ (as in CleanRL) makes the gradient V − V_target; the lecture writes the square without
    it, a factor the coefficient c1 absorbs.
    """
    vf_unclipped = (values - returns) ** 2  # (B, T)
    vf = vf_unclipped
    if clip_range is not None:
        values_clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)  # (B, T)
        vf_clipped = (values_clipped - returns) ** 2  # (B, T)
        vf = torch.max(vf_unclipped, vf_clipped)  # PPO2 value clipping
    loss = 0.5 * masked_mean(vf, mask)  # L^VF, lecture ch. 4
    with torch.no_grad():
        stats = {
            "value_loss": loss.detach(),
            "explained_variance": explained_variance(values, returns, mask),
            # tokens whose V moved past the clip range (the clipped V differs from V there);
            # comparing the two squared errors instead miscounts float rounding as clipping
            "value_clipfrac": (masked_mean(((values - old_values).abs() > clip_range).float(),
                                           mask) if clip_range is not None
                               else values.new_zeros(())),
        }
    return loss, stats


def entropy_bonus(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """H[π_θ]: token mean of the entropy of the next-token distributions (lecture ch. 4).

    logits: (B, T, V) the policy's logits aligned with mask (B, T) -> scalar, in nats.
    """
    return masked_mean(token_entropy(logits), mask)


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
             values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
             mask: torch.Tensor, entropy: torch.Tensor | None = None, clip_eps: float = 0.2,
             vf_coef: float = 0.5, ent_coef: float = 0.0, value_clip: float | None = None,
             value_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The full PPO objective L_PPO = L^CLIP − c1·L^VF + c2·H, returned as loss = −L_PPO (ch. 4).

    logp, old_logp, advantages: (B, T) as in `policy_loss`
    values, old_values, returns: (B, T) as in `value_loss`
    mask:     (B, T) 1 on response tokens
    entropy:  (B, T) per-token entropy H(π_θ(·|s_t)), e.g. `token_entropy(logits)`; None -> H = 0
    clip_eps: ε; vf_coef: c1; ent_coef: c2; value_clip: `value_loss`'s clip_range
    value_mask: (B, T) where L^VF is taken, if not on every response token (the bandit form
              regresses only V(x), the value of the prompt)
    returns   loss (scalar), stats: those of `policy_loss` and `value_loss`, "entropy", "loss"

    The policy and the value model are separate networks here, so one total is only a
    convenience: L^CLIP and H send gradients to the policy, L^VF to the value model.
    """
    pg_loss, pg_stats = policy_loss(logp, old_logp, advantages, mask, clip_eps)
    value_mask = mask if value_mask is None else value_mask
    vf_loss, vf_stats = value_loss(values, old_values, returns, value_mask, value_clip)
    l_clip = -pg_loss  # L^CLIP
    l_vf = vf_loss  # L^VF
    h = masked_mean(entropy, mask) if entropy is not None else logp.new_zeros(())  # H[π_θ]
    l_ppo = l_clip - vf_coef * l_vf + ent_coef * h  # L_PPO = L^CLIP − c1 L^VF + c2 H, lecture ch. 4
    loss = -l_ppo  # we minimise
    stats = {**pg_stats, **vf_stats, "entropy": h.detach(), "loss": loss.detach()}
    return loss, stats


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor | None = None,
              beta: float = 0.0, clip_eps: float = 0.2, ent_coef: float = 0.0,
              estimator: str = "k3") -> tuple[torch.Tensor, dict]:
    """The critic-free objective of GRPO (Shao et al. 2024, DeepSeekMath, eq. 3) and RLOO, as a
    loss: −(L^CLIP − β·D_KL + c2·H). No value model, so no L^VF.

    logp, old_logp, advantages, mask: (B, T) as in `policy_loss`
    ref_logp: (B, T) log π_ref of the sampled tokens (no grad)
    entropy:  (B, T) per-token entropy, or None (H = 0)
    beta:     β of the KL *loss term* (`minirlhf.rl.kl_loss`, k3 by default); 0 when the KL is
              in the reward instead (--kl-in reward)
    returns   loss (scalar), stats: those of `policy_loss`, "kl_loss", "entropy", "loss"

    DeepSeekMath averages over each response's tokens, then over the group; this token mean over
    the batch weights every token the same, as `policy_loss` does for PPO.
    """
    pg_loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_eps)
    d_kl = kl_loss(logp, ref_logp, mask, estimator)  # D_KL(π_θ‖π_ref), k3: eq. 4
    h = masked_mean(entropy, mask) if entropy is not None else logp.new_zeros(())  # H[π_θ]
    loss = pg_loss + beta * d_kl - ent_coef * h  # −(L^CLIP − β·D_KL + c2·H)
    return loss, {**stats, "kl_loss": d_kl.detach(), "entropy": h.detach(),
                  "loss": loss.detach()}


# ----------------------------------------------------------------------------------------------
# The training loop: rollout (no grad) -> advantages -> update epochs over minibatches
# ----------------------------------------------------------------------------------------------

@dataclass
class PPOConfig:
    out: str = "out/ppo"              # folder for checkpoint.pt (the policy), metrics, eval.json
    sft: str = "out/sft"              # SFT stage (or gpt2:DIR): the initial policy and the frozen
                                      # reference
    rm: str = "out/rm"                # reward model stage (frozen), for --reward rm
    reward: Literal["rm", "verifier", "gold"] = "rm"  # R(x, ŷ): rm, the reward model |
                                                      # verifier: 1 for a right answer, else 0
                                                      # | gold: the gold judge (world only)
    verifier: str | None = None       # --reward verifier: module:function (prompt, response) ->
                                      # number; none = the world's checker
    prompts: str | None = None        # prompts JSONL to train on; none = the world's train prompts
    resume: bool = False              # continue OUT/checkpoint.pt where a stopped run left off
    overwrite: bool = False           # start over in a used --out: its run files are replaced
    verbose: bool = False             # print the whole config at start
    seed: int = 0                     # seeds prompt order, sampling, minibatch order
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if there is one
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA and bf16-native CPUs
    compile: bool = False             # torch.compile the policy (CUDA only)
    # rollout
    iterations: int = 100             # PPO iterations (rollout + update each)
    prompts_per_iter: int = 32        # prompts sampled per iteration
    samples_per_prompt: int = 4       # responses per prompt (k; the group baseline needs k >= 2)
    max_new_tokens: int = 48          # response budget
    temperature: float = 1.0          # sampling temperature (1 = the policy π_θ itself)
    no_end_penalty: float = -1.0      # added to the reward of a response that never ends
    # objective
    kl_coef: float = 0.2              # β in r − β·KL(π_θ‖π_ref) (lecture ch. 5)
    adaptive_kl: bool = False         # adapt β toward --target-kl (Ziegler et al. 2019)
    target_kl: float = 4.0            # nats per response, for --adaptive-kl
    kl_horizon: int = 2000            # responses over which the adaptive controller reacts
    advantage: Literal["gae", "bandit", "group", "grpo"] = "gae"  # gae | bandit: γ = 0,
                                                                  # A = R − V(x) | group: RLOO
                                                                  # | grpo: (R − mean)/std per
                                                                  # prompt; group and grpo have
                                                                  # no value model
    kl_in: Literal["auto", "reward", "loss"] = "auto"  # β·KL in the per-token reward, or
                                                       # as a loss term (GRPO); auto: loss for
                                                       # grpo, else reward
    kl_estimator: Literal["auto", "k1", "k3"] = "auto"  # the KL sample: auto = k3 in the loss,
                                                        # k1 in the reward
    group_std: bool = True            # grpo: divide by the group's std (--no-group-std: centre)
    gamma: float = 1.0                # discount γ (lecture ch. 2)
    lam: float = 0.95                 # GAE λ
    whiten: bool = True               # normalise advantages over the batch's real tokens
    # update
    epochs: int = 1                   # passes over each rollout (1 beat 2: docs/results.md, "PPO")
    minibatch_size: int = 32          # responses per gradient step
    clip_eps: float = 0.2             # ε of L^CLIP
    vf_coef: float = 0.5              # c1, weight of the value loss
    ent_coef: float = 0.0             # c2, weight of the entropy bonus
    value_clip: float | None = 0.2    # clip range for value updates (none = unclipped)
    lr: float = 2e-4                  # policy learning rate (AdamW, constant after warmup)
    value_lr: float = 1e-3            # value model learning rate
    warmup: int = 5                   # iterations of linear learning-rate warmup
    grad_clip: float = 1.0            # max gradient norm, per model
    value_init: Literal["auto", "rm", "sft"] = "auto"  # the value model starts from the
                                                       # reward model or the SFT trunk; auto:
                                                       # rm with --reward rm
    # logging
    eval_every: int = 20              # iterations between held-out evaluations
    eval_repeats: int = 1             # samples per prompt at each held-out evaluation
    eval_prompts: str | None = None   # prompts JSONL to evaluate on; none = the world's prompts
                                      # (world data) or 5% of --prompts, held out from training
    eval_samples: int = 16            # samples per evaluation prompt at the end (plus greedy)
    ckpt_every: int = 20              # iterations between checkpoints (and at the end)
    def check(self):
        check_ranges(self, positive=("iterations", "prompts_per_iter", "samples_per_prompt",
                                     "max_new_tokens", "epochs", "minibatch_size", "eval_every",
                                     "ckpt_every", "target_kl", "kl_horizon", "grad_clip",
                                     "eval_samples", "eval_repeats"),
                     non_negative=("warmup", "vf_coef", "ent_coef"))
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError("--value-clip must be positive (or none)")
        if self.advantage in ("group", "grpo") and self.samples_per_prompt < 2:
            raise ValueError(f"--advantage {self.advantage} needs --samples-per-prompt of at "
                             f"least 2")
        if self.value_init == "rm" and self.reward != "rm":
            raise ValueError(f"--value-init rm needs a reward model: --reward {self.reward} "
                             f"loads none (use --value-init sft)")
        if self.verifier and self.reward != "verifier":
            raise ValueError("--verifier needs --reward verifier")
        if not self.group_std and self.advantage != "grpo":
            raise ValueError("--no-group-std applies to --advantage grpo only")
        if self.kl_coef < 0 or self.lr <= 0 or self.value_lr <= 0 or self.temperature <= 0:
            raise ValueError("--kl-coef must be >= 0; --lr, --value-lr, --temperature > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1 and 0 < self.clip_eps < 1):
            raise ValueError("need 0 <= --gamma, --lam <= 1 and 0 < --clip-eps < 1")
        if self.kl_in == "loss" and self.critic:
            raise ValueError("--kl-in loss is GRPO's form, for the critic-free --advantage grpo "
                             "or group; with a value model the KL goes in the reward")

    def unused_paths(self):
        """The path flags this run never reads (`training.check_paths` skips them): --rm when
        the reward is not a reward model."""
        return ("rm",) if self.reward != "rm" else ()

    @property
    def critic(self) -> bool:
        """Whether a value model is trained: not for the critic-free group and grpo."""
        return self.advantage not in ("group", "grpo")

    @property
    def kl_place(self) -> str:
        """Where β·KL goes: "reward" or "loss" (--kl-in; auto: loss for grpo)."""
        if self.kl_in != "auto":
            return self.kl_in
        return "loss" if self.advantage == "grpo" else "reward"

    @property
    def kl_sample(self) -> str:
        """The KL estimator of the penalty (--kl-estimator; auto: k3 in the loss, k1 in the
        reward)."""
        if self.kl_estimator != "auto":
            return self.kl_estimator
        return "k3" if self.kl_place == "loss" else "k1"


def per_token_logprobs(model, tokens, attn_mask, device, with_entropy=False, entropy_grad=True):
    """log π(tokens[:, t+1] | tokens[:, :t+1]) for every t: (B, T-1); optionally the entropy,
    outside the autograd graph with entropy_grad=False (a statistic only, no backward through
    its (B, T-1, V) softmax)."""
    with autocast(device):
        logits = model(tokens, attn_mask)[:, :-1]                                  # (B, T-1, V)
    logits = logits.float()
    logp = token_logprobs(logits, tokens[:, 1:])                                    # (B, T-1)
    if not with_entropy:
        return logp
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        return logp, token_entropy(logits)


def state_values(value_model, tokens, attn_mask, device):
    """V(s_t) for the state before each target token: (B, T-1)."""
    with autocast(device):
        return value_model(tokens, attn_mask)[:, :-1].float()                      # (B, T-1)


# ----------------------------------------------------------------------------------------------
# One iteration, in three phases (lecture ch. 7): rollout -> advantages -> PPO update
# ----------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """Phase 1's output: B = prompts × k responses, and what the four models said of them."""
    prompts: list[str]        # the B prompts, prompt-major: k responses to a prompt side by side
    gen: Generation           # tokens (B, T), attn_mask (B, T), ended (B,), prompt_len, ...
    mask: torch.Tensor        # (B, T-1) 1 where the target token is a response token
    old_logp: torch.Tensor    # (B, T-1) log π_θold(y_t), the policy that sampled
    ref_logp: torch.Tensor    # (B, T-1) log π_ref(y_t)
    old_values: torch.Tensor  # (B, T-1) V_ψ(s_t) at sampling time (0 without a critic)
    kl: torch.Tensor          # (B, T-1) log π_θold − log π_ref on response tokens (k1)
    proxy: torch.Tensor       # (B,) R(x, y): r_φ's score, or the grader's (--reward)
    score: torch.Tensor       # (B,) R(x, y) + the no-end penalty: the reward being maximised
    seconds: dict             # wall time of "generate" and "score"
    texts: list[str]          # the B responses, decoded


@torch.no_grad()
def rollout(policy, fwd, ref, reward, value_model, tok, prompt_texts: list[str],
            cfg: PPOConfig, it: int, dist, sampler_logprobs: bool = True) -> Rollout:
    """Phase 1 (no grad): sample k responses to each of this iteration's prompts from π_θ, then
    score them with the four models (lecture ch. 7, steps 1–2): `reward` is the reward model's
    score or a grader's (minirlhf/graders.py). `fwd` is the policy's forward for scoring
    (compiled with --compile); sampling uses the plain `policy`. log π_θold comes from the
    sampling pass where that is the same computation (`old_logprobs`); sampler_logprobs=False
    always runs the fresh forward (the reference path)."""
    t0 = time.time()
    rng = np.random.default_rng([cfg.seed, it])
    chosen = rng.choice(len(prompt_texts), size=cfg.prompts_per_iter, replace=False)
    chosen = shard(chosen, dist)  # this process's share of the prompts (torchrun)
    prompts = [prompt_texts[i] for i in chosen for _ in range(cfg.samples_per_prompt)]
    policy.eval()
    sample_seed = (cfg.seed * 100_003 + it) * dist.world_size + dist.rank  # its own samples
    gen = generate(policy, [tok.render_prompt(p) for p in prompts], cfg.max_new_tokens,
                   eos_id=tok.end_id, pad_id=tok.pad_id, temperature=cfg.temperature,
                   generator=torch.Generator(device=dist.device).manual_seed(sample_seed))
    policy.train()
    t1 = time.time()
    tokens, attn_mask, device = gen.tokens, gen.attn_mask, dist.device            # (B, T)
    mask = gen.response_mask[:, 1:]                   # (B, T-1) targets that are response tokens
    old_logp = old_logprobs(gen, fwd, policy, cfg, device, sampler_logprobs)   # (B, T-1) π_θold
    ref_logp = by_length(lambda x, m: per_token_logprobs(ref, x, m, device),   # (B, T-1) π_ref
                         tokens, attn_mask, device)
    old_values = (by_length(lambda x, m: state_values(value_model, x, m, device),
                            tokens, attn_mask, device)                         # (B, T-1) V(s_t)
                  if value_model is not None else torch.zeros_like(old_logp))
    texts = [tok.decode(ids) for ids in gen.responses()]
    proxy = reward(tokens, attn_mask, gen.ended, prompts, texts)                 # (B,) R(x, y)
    score = proxy + no_end_penalty(cfg) * (~gen.ended).float()                    # unfinished
    seconds = {"generate": t1 - t0, "score": time.time() - t1}
    kl = token_kl(old_logp, ref_logp, mask)  # (B, T-1) log π_θ − log π_ref, lecture ch. 5
    check_finite(it + 1, proxy_reward=proxy.mean(), kl=kl.sum(-1).mean())  # name the cause
    return Rollout(prompts, gen, mask, old_logp, ref_logp, old_values, kl, proxy, score, seconds,
                   texts)


def old_logprobs(gen: Generation, fwd, policy, cfg: PPOConfig, device,
                 from_sampler: bool = True) -> torch.Tensor:
    """log π_θold(y_t) of the rollout's tokens, (B, T-1). The sampler computed them already on
    the response tokens (0 elsewhere, where the rollout's mask is 0) in float32, with the same
    weights and dropout off: taken from there when the scoring forward would run in float32 too
    (no bf16 autocast) at temperature 1 with dropout 0, where the two agree to 5e-6
    (tests/test_fast_path.py). Otherwise, or with from_sampler=False, a fresh forward pass.
    (Sampling in bf16 to use them there too was tried, not adopted: docs/results.md.)"""
    if (from_sampler and not uses_bf16(device) and cfg.temperature == 1.0
            and policy.config.dropout == 0.0):
        return gen.logprobs[:, 1:]                          # (B, T-1) from the sampling pass
    return by_length(lambda x, m: per_token_logprobs(fwd, x, m, device), gen.tokens,
                     gen.attn_mask, device)


def no_end_penalty(cfg: PPOConfig) -> float:
    """The penalty a response that never ends gets on top of R: --no-end-penalty, except with
    the gold judge, which charges an unended response itself."""
    return 0.0 if cfg.reward == "gold" else cfg.no_end_penalty


def compute_advantages(ro: Rollout, beta: float, cfg: PPOConfig, dist):
    """Phase 2: the KL-penalised reward R − β·KL (lecture ch. 5) becomes advantages A_t and
    value targets, per --advantage:
      gae:    −β·KL_t on every token and R on the last (`kl_penalised_rewards`), then GAE(γ, λ);
      bandit: γ = 0, one action per response: A = R − V(x), R = r_φ − β·KL (ch. 7);
      group:  RLOO, A = R − the mean R of the prompt's other k − 1 responses (ch. 3), no critic;
      grpo:   A = (R − mean R of the prompt's k responses) / their std, no critic; the KL is
              then a loss term (`grpo_loss`) unless --kl-in reward.
    Returns advantages (B, T-1) (whitened over the whole rollout, except grpo's, normalised per
    group already), returns (B, T-1) and the value mask (B, T-1): where L^VF regresses V."""
    mask, value_mask = ro.mask, ro.mask
    beta = beta if cfg.kl_place == "reward" else 0.0  # in the loss instead: grpo_loss
    kl = token_kl(ro.old_logp, ro.ref_logp, mask, cfg.kl_sample)  # (B, T-1) the penalty's KL_t
    if cfg.advantage == "gae":
        rewards = kl_penalised_rewards(ro.score, ro.old_logp, ro.ref_logp, mask, beta,
                                       cfg.kl_sample)                               # (B, T-1)
        advantages, returns = gae(rewards, ro.old_values, mask, cfg.gamma, cfg.lam)
    else:
        at_prompt = ro.gen.prompt_len - 1  # column of V(x): the state before the response
        returns, value_mask = torch.zeros_like(ro.old_values), torch.zeros_like(mask)
        k = cfg.samples_per_prompt
        if cfg.advantage == "bandit":
            A, R = bandit_advantages(ro.score, kl, ro.old_values[:, at_prompt], beta)  # (B,)
            value_mask[:, at_prompt] = True  # V(x) regresses onto R
            returns[:, at_prompt] = R
        elif cfg.advantage == "group":  # no critic to train: the value mask stays empty
            A = group_baseline_advantages(kl_penalised_return(ro.score, kl, beta), k)  # (B,)
        else:  # grpo
            A = group_normalized_advantages(kl_penalised_return(ro.score, kl, beta), k,
                                            cfg.group_std)                           # (B,)
        advantages = torch.where(mask, A[:, None].expand_as(ro.old_logp), 0.0)    # (B, T-1)
    if cfg.whiten and cfg.advantage != "grpo":  # over the whole rollout, every process's
        advantages = masked_whiten(advantages, mask,
                                   mean_var=masked_mean_var(advantages, mask, dist))
    return advantages, returns, value_mask


def ppo_update(policy, value_model, policy_opt, value_opt, ro: Rollout, advantages, returns,
               value_mask, beta: float, cfg: PPOConfig, it: int, dist,
               entropy_grad: bool | None = None) -> dict:
    """Phase 3: --epochs passes over shuffled minibatches of the rollout; on each, one AdamW step
    of π_θ and of V_ψ on L_PPO = L^CLIP − c1·L^VF + c2·H (lecture ch. 4), or without a value
    model of π_θ on `grpo_loss` (β·D_KL in it with --kl-in loss). `policy` and `value_model` are
    the forward passes to train through (DDP-wrapped under torchrun; value_model None without a
    critic). The entropy H joins the graph only when c2 ≠ 0 (entropy_grad None; True forces it:
    the reference path, the same gradients). Returns each statistic's mean over the
    minibatches."""
    entropy_grad = cfg.ent_coef != 0 if entropy_grad is None else entropy_grad
    beta = beta if cfg.kl_place == "loss" else 0.0  # in the reward instead: compute_advantages
    tokens, attn_mask, device = ro.gen.tokens, ro.gen.attn_mask, dist.device
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + it)
    agg = {}
    for epoch in range(cfg.epochs):
        # a minibatch of --minibatch-size responses is split over the processes like B
        for mb in torch.randperm(len(tokens), generator=g).split(
                cfg.minibatch_size // dist.world_size):
            mb = mb.to(device)
            cols = live_columns(attn_mask[mb], device)  # drop columns that are padding in all
            x, x_mask = tokens[mb][:, cols], attn_mask[mb][:, cols]                # (b, T')
            t = slice(cols.start, cols.stop - 1)  # (B, T-1) columns of those targets
            logp, entropy = per_token_logprobs(policy, x, x_mask, device, with_entropy=True,
                                               entropy_grad=entropy_grad)           # (b, T'-1)
            old_logp, adv, mask = ro.old_logp[mb, t], advantages[mb, t], ro.mask[mb, t]
            if value_model is not None:
                values = state_values(value_model, x, x_mask, device)
                loss, stats = ppo_loss(logp, old_logp, adv, values, ro.old_values[mb, t],
                                       returns[mb, t], mask, entropy, cfg.clip_eps, cfg.vf_coef,
                                       cfg.ent_coef, cfg.value_clip, value_mask[mb, t])
            else:  # critic-free: RLOO or GRPO
                loss, stats = grpo_loss(logp, old_logp, ro.ref_logp[mb, t], adv, mask, entropy,
                                        beta, cfg.clip_eps, cfg.ent_coef, cfg.kl_sample)
            check_finite(it + 1, loss=loss)  # it + 1: the iteration as the log numbers it
            loss.backward()
            clip_and_step(policy, policy_opt, cfg.grad_clip, it + 1, "policy_grad_norm")
            if value_model is not None:
                clip_and_step(value_model, value_opt, cfg.grad_clip, it + 1, "value_grad_norm")
            for name, v in stats.items():
                agg.setdefault(name, []).append(float(v))
    return {name: float(np.mean(v)) for name, v in agg.items()}


def clip_and_step(model, optimizer, max_norm: float, step: int, name: str) -> None:
    """Clip the gradient norm, stop on a non-finite one (naming it), take the step, zero grads."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    check_finite(step, **{name: norm})
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

@guarded_run  # OUT is this run's until train() ends (minirlhf/training.py)
def train(cfg: PPOConfig, prog: str = "train_ppo.py") -> dict:
    dist = start_run(cfg, prog)  # one process, or one of torchrun's (minirlhf/distributed.py)
    policy, ref, reward_model, value_model, tok = load_four_models(cfg, dist.device)  # ch. 7
    prompt_texts, eval_set, source = training_prompts(cfg, tok, policy.config.block_size)
    reward = make_reward(cfg.reward, verifier=cfg.verifier, reward_model=reward_model,
                         device=dist.device, world_prompts=all_world_prompts(prompt_texts))
    policy_opt = make_optimizer(policy, cfg.lr, 0.0)
    value_opt = value_model and make_optimizer(value_model, cfg.value_lr, 0.0)  # None: no critic
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
              if cfg.adaptive_kl else FixedKLController(cfg.kl_coef))
    start = resume(cfg, tok, policy, policy_opt, value_model, value_opt, kl_ctl)  # or None
    it = start or 0
    fwd = maybe_compile(policy, dist.device, cfg.compile)
    train_fwd, train_value = wrap(fwd, dist), value_model and wrap(value_model, dist)  # DDP
    log = open_log(cfg, start, dist)  # OUT/metrics.jsonl (and config.json)
    world, t_start = World(cfg.seed), time.time()
    bar = tqdm(total=cfg.iterations, initial=it, desc="ppo", disable=None if dist.is_main else True,
               leave=False)
    while it < cfg.iterations:
        beta = kl_ctl.kl_coef
        for opt, lr in ((policy_opt, cfg.lr), (value_opt, cfg.value_lr)):
            if opt is not None:
                set_lr(opt, lr * min(1.0, (it + 1) / max(1, cfg.warmup)))  # linear warmup
        ro = rollout(policy, fwd, ref, reward, value_model, tok, prompt_texts, cfg, it,
                     dist)                                                      # 1. rollout
        t_update = time.time()
        advantages, returns, value_mask = compute_advantages(ro, beta, cfg, dist)  # 2.
        stats = ppo_update(train_fwd, train_value, policy_opt, value_opt, ro, advantages,
                           returns, value_mask, beta, cfg, it, dist)            # 3. update
        it += 1
        bar.update(1)
        ro.seconds["update"] = time.time() - t_update
        row = log_iteration(log, it, ro, stats, beta, cfg, dist)
        kl_ctl.update(row["kl"], len(ro.prompts) * dist.world_size)
        if it % cfg.eval_every == 0 or it == cfg.iterations:  # every process evaluates
            held_out_evaluation(log, it, policy, ref, reward, tok, world, eval_set, cfg)
        if dist.is_main and (it % cfg.ckpt_every == 0 or it == cfg.iterations):
            save(cfg, it, tok, policy, policy_opt, value_model, value_opt, kl_ctl)
    bar.close()
    result = {"train_seconds": time.time() - t_start, "iterations": it}
    if dist.is_main:  # rank 0 evaluates and writes eval.json
        result.update(final_results(cfg, policy, ref, reward, tok, world, eval_set, source,
                                    dist.device))
        write_json(os.path.join(cfg.out, "eval.json"), result)
    return result


# ----------------------------------------------------------------------------------------------
# Setting up, logging, evaluating: what the loop calls
# ----------------------------------------------------------------------------------------------

def load_four_models(cfg: PPOConfig, device):
    """The four models of lecture ch. 7: the policy π_θ (trainable, starts as the SFT model), the
    reference π_ref (a frozen SFT copy), the reward model r_φ (frozen) and the value model V_ψ
    (trainable, starts as the reward model or the SFT trunk). Returns them and the tokenizer.
    With a grader for reward (--reward verifier|gold) no reward model is loaded (None) and V_ψ
    starts from the SFT trunk; the critic-free group and grpo have no V_ψ (None)."""
    policy, tok, _ = load_stage(cfg.sft, "gpt", device)          # π_θ: trainable
    ref, _, _ = load_stage(cfg.sft, "gpt", device)               # π_ref: frozen SFT copy
    reward_model = value_model = None
    if cfg.reward == "rm":
        reward_model, rm_tok, _ = load_stage(cfg.rm, "scalar", device)  # r_φ: frozen
        if rm_tok.fingerprint() != tok.fingerprint():
            raise CheckpointError(f"{cfg.rm}: the reward model uses another tokenizer than "
                                  f"{cfg.sft}")
    if cfg.critic:  # V_ψ: trainable, from r_φ (--value-init rm; auto with --reward rm) or SFT
        from_rm = cfg.value_init == "rm" or (cfg.value_init == "auto" and cfg.reward == "rm")
        value_model = (copy.deepcopy(reward_model) if from_rm
                       else ScalarHeadModel.from_gpt(policy))
    for frozen in (ref, reward_model):
        if frozen is not None:
            frozen.eval().requires_grad_(False)
    return policy, ref, reward_model, value_model, tok


def training_prompts(cfg: PPOConfig, tok, block_size: int):
    """(training prompts, evaluation prompts, where those come from): --prompts (JSONL) or the
    world's training prompts, checked against the block size; the evaluation prompts are
    --eval-prompts, the world's test prompts (world prompts), or 5% of --prompts held out."""
    if cfg.max_new_tokens >= block_size:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                         f"the model's block size {block_size}")
    held = []
    if cfg.prompts:
        rows = read_prompts(cfg.prompts, tok, block_size - cfg.max_new_tokens)
        if not (cfg.eval_prompts or all(is_world_prompt(r["prompt"]) for r in rows)):
            rows, held = hold_out(rows, cfg.seed)  # never trained on: the evaluation's prompts
        prompt_texts = [r["prompt"] for r in rows]
    else:
        prompt_texts = [p.text for p in World(cfg.seed).train_prompts]
    if cfg.prompts_per_iter > len(prompt_texts):
        raise ValueError(f"--prompts-per-iter {cfg.prompts_per_iter} is more than the "
                         f"{len(prompt_texts)} prompts to draw from")
    longest = max(len(tok.render_prompt(p)) for p in prompt_texts)
    if longest + cfg.max_new_tokens > block_size:
        raise ValueError("--max-new-tokens plus the longest prompt exceeds the model's block size")
    eval_set, source = evaluation_prompts(cfg.eval_prompts, prompt_texts,
                                          [r["prompt"] for r in held], tok,
                                          block_size - cfg.max_new_tokens, cfg.seed)
    return prompt_texts, eval_set, source


def save(cfg: PPOConfig, it: int, tok, policy, policy_opt, value_model, value_opt, kl_ctl):
    """OUT/checkpoint.pt: the policy, and for --resume the value model (if any), both
    optimizers, β."""
    extra = {"kl_controller": kl_ctl.state_dict()}
    if value_model is not None:
        extra["value_model"] = {k: v.detach().cpu() for k, v in value_model.state_dict().items()}
        extra["value_optimizer"] = value_opt.state_dict()
    save_stage(cfg.out, model=policy, model_kind="gpt", config=cfg, tokenizer=tok, step=it,
               optimizer=policy_opt, rng=rng_state(), extra=extra)


def resume(cfg: PPOConfig, tok, policy, policy_opt, value_model, value_opt, kl_ctl) -> int | None:
    """With --resume and OUT/checkpoint.pt: load everything `save` wrote and return the
    iteration it was written at; None for a fresh start."""
    ck_path = os.path.join(cfg.out, CHECKPOINT)
    if not (cfg.resume and os.path.exists(ck_path)):
        return None
    ck = load_checkpoint(ck_path)
    check_stage(ck, ck_path, "train_ppo.py")  # not another script's checkpoint
    check_compatible(ck, ck_path, model_config=policy.config, tokenizer=tok)
    policy.load_state_dict(ck["model"])
    policy_opt.load_state_dict(ck["optimizer"])
    if value_model is not None:
        value_model.load_state_dict(ck["extra"]["value_model"])
        value_opt.load_state_dict(ck["extra"]["value_optimizer"])
    kl_ctl.load_state_dict(ck["extra"]["kl_controller"])
    set_rng_state(ck["rng"])
    print(f"resumed from {ck_path} at iteration {ck['step']}")
    return ck["step"]


def log_iteration(log, it: int, ro: Rollout, stats: dict, beta: float, cfg, dist) -> dict:
    """One metrics row and one printed line: the reward being optimised (r_φ or the grader's,
    logged as "proxy"), the KL, the PPO diagnostics, and the gold judge's verdict on the same
    rollouts (world prompts only), so reward hacking shows when it happens. Returns the row
    (means over every process's responses)."""
    texts = ro.texts
    known = [i for i, p in enumerate(ro.prompts) if is_world_prompt(p)]
    gold = [gold_reward(ro.prompts[i], texts[i], bool(ro.gen.ended[i])) for i in known]
    acc = [float(correct(ro.prompts[i], texts[i])) for i in known]
    row = {"proxy": ro.proxy.mean().item(), "kl": ro.kl.sum(-1).mean().item(), "beta": beta,
           "gold": float(np.mean(gold)) if gold else None,
           "accuracy": float(np.mean(acc)) if acc else None,
           "length": ro.mask.sum(-1).float().mean().item(),
           "ended": ro.gen.ended.float().mean().item(), **stats,
           **{f"time_{phase}": s for phase, s in ro.seconds.items()}}
    row = mean_over_ranks(row, dist)  # the whole rollout's means (each process: B responses)
    log.write(it, split="train", **row)
    judged = (f"gold {row['gold']:+.3f} | acc {row['accuracy']:.2f}" if row["gold"] is not None
              else "gold n/a (not the built-in world)")
    critic = (f"vf {row['value_loss']:.4f} | ev {row['explained_variance']:+.2f}"
              if "value_loss" in row else f"kl_loss {row['kl_loss']:.4f}")
    print(f"iter {it:4d} | {cfg.reward} {row['proxy']:+.3f} | {judged} | kl {row['kl']:6.2f} | "
          f"β {beta:.3f} | approx_kl {row['approx_kl']:.4f} | clipfrac {row['clipfrac']:.3f} | "
          f"entropy {row['entropy']:.3f} | {critic} | len {row['length']:4.1f} | "
          + "/".join(f"{s:.2f}" for s in ro.seconds.values()) + "s", flush=True)
    return row


def held_out_evaluation(log, it: int, policy, ref, reward, tok, world, eval_set,
                        cfg: PPOConfig) -> None:
    """Fresh samples, --eval-repeats per prompt, logged as split "val": gold, accuracy, KL on the
    world's validation prompts, and the reward's score (r_φ or the grader's: the proxy the run
    optimises); on your own data (or --eval-prompts) the evaluation prompts, and the samples in
    OUT/samples.jsonl (the latest evaluation's)."""
    own = cfg.prompts or cfg.eval_prompts
    ev = evaluate(policy, tok, eval_set if own else world.val_prompts, ref=ref,
                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + 7, records=bool(own),
                  reward=reward, repeats=cfg.eval_repeats)
    if own:
        write_samples(cfg.out, ev.pop("records"), step=it)
    row = {k: ev[k] for k in ("gold", "accuracy", "kl", "reward", "length") if k in ev}
    log.write(it, split="val", **row)
    print(f"iter {it:4d} | held-out: " + " | ".join(f"{k} {v:.3f}" for k, v in row.items()),
          flush=True)


def final_results(cfg: PPOConfig, policy, ref, reward, tok, world, eval_set, source,
                  device) -> dict:
    """The end of the run: the proxy over the last tenth of training, the median seconds of each
    phase, and on the evaluation prompts the final evaluation (sampled and greedy, KL to SFT,
    the reward's score: r_φ or the grader's; OUT/samples.jsonl); on the world's test prompts
    also the reward's mean score of fresh samples (what it thinks of the final policy)."""
    rows = [r for r in read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
            if r["split"] == "train"]
    result = {"final_proxy": float(np.mean([r["proxy"] for r in rows[-max(1, len(rows) // 10):]])),
              "phase_seconds": {p: float(np.median([r[f"time_{p}"] for r in rows]))
                                for p in ("generate", "score", "update")},
              "eval_prompts": source}
    result.update(final_evaluation(policy, tok, eval_set, ref=ref,
                                   reward=reward,
                                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                   repeats=cfg.eval_samples, out_dir=cfg.out))
    if not cfg.prompts and not cfg.eval_prompts:
        result["test_proxy"] = reward_on(policy, reward, tok, world.test_prompts, cfg, device)
        print(f"test proxy reward ({cfg.reward}) {result['test_proxy']:+.3f} | median phase "
              f"seconds {result['phase_seconds']}")
    return result


@torch.no_grad()
def reward_on(policy, reward, tok, prompts, cfg, device) -> float:
    """Mean reward (r_φ or the grader's, without the no-end penalty) of policy samples
    (temperature 1) on the given prompts."""
    texts = [p.text for p in prompts]
    gen = generate(policy, [tok.render_prompt(p) for p in texts], cfg.max_new_tokens,
                   eos_id=tok.end_id, pad_id=tok.pad_id,
                   generator=torch.Generator(device=device).manual_seed(cfg.seed + 11))
    responses = [tok.decode(ids) for ids in gen.responses()]
    return reward(gen.tokens, gen.attn_mask, gen.ended, texts, responses).mean().item()


def main(argv=None):
    prog = "train_ppo.py"
    cfg = parse_config(PPOConfig, argv, prog, description=__doc__.split("\n\n")[0])
    try:
        train(cfg, prog)
    except (DataError, CheckpointError, TokenizerError, NonFiniteError, ValueError,
            GraderError, OSError) as e:  # OSError: a full disk, a read-only folder
        fail(prog, str(e))


if __name__ == "__main__":
    main()
