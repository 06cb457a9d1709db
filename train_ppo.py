"""RLHF with PPO: improve the policy against the reward model, penalised by its KL to the SFT
reference (lecture ch. 4 PPO, ch. 5 the KL-penalised objective, ch. 7 the four-model loop).

    python train_ppo.py --sft out/sft --rm out/rm                # ~2 min on 2 CPU cores
    python train_ppo.py --kl-coef 0 --out out/ppo_no_kl          # no KL anchor: reward hacking
    python train_ppo.py --advantage bandit                        # the lecture's γ = 0 form
    python train_ppo.py --advantage group                         # critic-free RLOO baseline
    python train_ppo.py --resume                                  # continue a stopped run
    torchrun --standalone --nproc_per_node 4 train_ppo.py         # 4 GPUs, 1/4 of the prompts each

Four models (lecture ch. 7): the policy π_θ (trainable, starts as the SFT model), the reference
π_ref (a frozen SFT copy), the reward model r_φ (frozen) and the value model V_ψ (trainable,
starts as the reward model). One iteration is three phases, labelled in the loop below:
  1. rollout (no grad): sample responses, score them with r_φ, record log π_θold, log π_ref, V;
  2. advantages: per-token reward −β·(log π_θ − log π_ref) plus r_φ(x, y) on the last token,
     then GAE(γ, λ) and whitening — or the lecture's bandit form A = R − V(x), or RLOO;
  3. update: shuffled minibatches of the rollout (--epochs passes), L_PPO = L^CLIP − c1·L^VF + c2·H.
Every iteration logs the proxy reward (r_φ), the KL to the reference, the PPO diagnostics, and
the gold judge's score of the same rollouts, so reward hacking is visible when it happens.

Writes OUT/checkpoint.pt (the policy; the value model and KL controller ride in it for
--resume), OUT/metrics.jsonl, OUT/eval.json (test prompts: gold, accuracy, KL, proxy).

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

from minirlhf.checkpoint import (CHECKPOINT, CheckpointError, check_compatible, load_checkpoint,
                                 load_stage, rng_state, save_stage, set_rng_state)
from minirlhf.config import check_ranges, parse_config
from minirlhf.data import DataError, read_prompts
from minirlhf.device import autocast, maybe_compile
from minirlhf.distributed import masked_mean_var, mean_over_ranks, shard, wrap
from minirlhf.masking import masked_mean, masked_var, masked_whiten, token_entropy, token_logprobs
from minirlhf.model import ScalarHeadModel
from minirlhf.rl import (AdaptiveKLController, FixedKLController, gae, group_baseline_advantages,
                         kl_k1)
from minirlhf.sampler import generate
from minirlhf.tokenizer import TokenizerError
from minirlhf.training import (MetricsLog, NonFiniteError, check_finite, fail, make_optimizer,
                               read_metrics, set_lr, start_run, write_json)
from minirlhf.evaluate import evaluate, final_evaluation
from minirlhf.world import World, correct, gold_reward, lookup


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
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),  # k3: (r − 1) − log r
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


# ----------------------------------------------------------------------------------------------
# The training loop: rollout (no grad) -> advantages -> update epochs over minibatches
# ----------------------------------------------------------------------------------------------

@dataclass
class PPOConfig:
    out: str = "out/ppo"              # folder for checkpoint.pt (the policy), metrics, eval.json
    sft: str = "out/sft"              # SFT stage (or gpt2:DIR): the initial policy and frozen reference
    rm: str = "out/rm"                # reward model stage (frozen)
    prompts: str | None = None        # prompts JSONL to train on; none = the world's train prompts
    resume: bool = False              # continue OUT/checkpoint.pt where a stopped run left off
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
    advantage: Literal["gae", "bandit", "group"] = "gae"  # gae | bandit: γ=0, A = R − V(x) | group: RLOO, no critic
    gamma: float = 1.0                # discount γ (lecture ch. 2)
    lam: float = 0.95                 # GAE λ
    whiten: bool = True               # normalise advantages over the batch's real tokens
    # update
    epochs: int = 1                   # passes over each rollout (see the note under the fields)
    minibatch_size: int = 32          # responses per gradient step
    clip_eps: float = 0.2             # ε of L^CLIP
    vf_coef: float = 0.5              # c1, weight of the value loss
    ent_coef: float = 0.0             # c2, weight of the entropy bonus
    value_clip: float | None = 0.2    # clip range for value updates (none = unclipped)
    lr: float = 2e-4                  # policy learning rate (AdamW, constant after warmup)
    value_lr: float = 1e-3            # value model learning rate
    warmup: int = 5                   # iterations of linear learning-rate warmup
    grad_clip: float = 1.0            # max gradient norm, per model
    value_init: Literal["rm", "sft"] = "rm"  # the value model starts from the reward model or the SFT trunk
    # logging
    eval_every: int = 20              # iterations between held-out gold evaluations
    ckpt_every: int = 20              # iterations between checkpoints (and at the end)
    # Rollout size and epochs, measured on the built-in world (same SFT and reward model, seeds
    # 0 and 1, 100 iterations): 16 prompts x 4 with 2 epochs closed 33% and 38% of the SFT ->
    # optimum gold gap; 32 prompts x 4 with 1 epoch (the same 4 minibatch steps, on twice the
    # samples, none reused) 46% and 47% on one thread and 39% in a pipeline run on two (PPO's
    # end point moves by several points with floating-point rounding), for ~1.3x the time per
    # iteration; minibatches of 64 (2 steps per iteration) 38%. With the reward model on 48000
    # pairs (test accuracy 0.762 against 0.741) the pipeline run closed 55%. The minibatches
    # after the first are already off-policy, so the ratio and its clipping still act with one
    # epoch.

    def check(self):
        check_ranges(self, positive=("iterations", "prompts_per_iter", "samples_per_prompt",
                                     "max_new_tokens", "epochs", "minibatch_size", "eval_every",
                                     "ckpt_every", "target_kl", "kl_horizon", "grad_clip"),
                     non_negative=("warmup", "vf_coef", "ent_coef"))
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError("--value-clip must be positive (or none)")
        if self.advantage == "group" and self.samples_per_prompt < 2:
            raise ValueError("--advantage group needs --samples-per-prompt of at least 2")
        if self.kl_coef < 0 or self.lr <= 0 or self.value_lr <= 0 or self.temperature <= 0:
            raise ValueError("--kl-coef must be >= 0; --lr, --value-lr, --temperature > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1 and 0 < self.clip_eps < 1):
            raise ValueError("need 0 <= --gamma, --lam <= 1 and 0 < --clip-eps < 1")


def per_token_logprobs(model, tokens, attn_mask, device, with_entropy=False):
    """log π(tokens[:, t+1] | tokens[:, :t+1]) for every t: (B, T-1); optionally the entropy."""
    with autocast(device):
        logits = model(tokens, attn_mask)[:, :-1]                                  # (B, T-1, V)
    logits = logits.float()
    logp = token_logprobs(logits, tokens[:, 1:])                                    # (B, T-1)
    return (logp, token_entropy(logits)) if with_entropy else logp


def state_values(value_model, tokens, attn_mask, device):
    """V(s_t) for the state before each target token: (B, T-1)."""
    with autocast(device):
        return value_model(tokens, attn_mask)[:, :-1].float()                      # (B, T-1)


def train(cfg: PPOConfig, prog: str = "train_ppo.py") -> dict:
    dist = start_run(cfg, prog)  # one process, or one of torchrun's (minirlhf/distributed.py)
    device = dist.device
    world = World(cfg.seed)
    ck_path = os.path.join(cfg.out, CHECKPOINT)
    resume_ck = load_checkpoint(ck_path) if cfg.resume and os.path.exists(ck_path) else None

    # --- the four models of lecture ch. 7 ---
    policy, tok, _ = load_stage(cfg.sft, "gpt", device)          # π_θ: trainable
    ref, _, _ = load_stage(cfg.sft, "gpt", device)               # π_ref: frozen SFT copy
    reward_model, rm_tok, rm_ck = load_stage(cfg.rm, "scalar", device)  # r_φ: frozen
    if rm_tok.fingerprint() != tok.fingerprint():
        raise CheckpointError(f"{cfg.rm}: the reward model uses another tokenizer than {cfg.sft}")
    if cfg.value_init == "rm":                                   # V_ψ: trainable
        value_model = copy.deepcopy(reward_model)
    else:
        value_model = ScalarHeadModel.from_gpt(policy)
    for frozen in (ref, reward_model):
        frozen.eval().requires_grad_(False)
    use_critic = cfg.advantage != "group"
    if cfg.max_new_tokens >= policy.config.block_size:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                         f"the model's block size {policy.config.block_size}")
    if cfg.prompts:
        prompt_texts = [r["prompt"] for r in read_prompts(cfg.prompts, tok, policy.config.block_size - cfg.max_new_tokens)]
    else:
        prompt_texts = [p.text for p in world.train_prompts]
    if cfg.prompts_per_iter > len(prompt_texts):
        raise ValueError(f"--prompts-per-iter {cfg.prompts_per_iter} is more than the "
                         f"{len(prompt_texts)} prompts to draw from")
    if max(len(tok.render_prompt(p)) for p in prompt_texts) + cfg.max_new_tokens > policy.config.block_size:
        raise ValueError("--max-new-tokens plus the longest prompt exceeds the model's block size")

    policy_opt = make_optimizer(policy, cfg.lr, 0.0)
    value_opt = make_optimizer(value_model, cfg.value_lr, 0.0)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
              if cfg.adaptive_kl else FixedKLController(cfg.kl_coef))
    it = 0
    if resume_ck is not None:
        check_compatible(resume_ck, ck_path, model_config=policy.config, tokenizer=tok)
        policy.load_state_dict(resume_ck["model"])
        policy_opt.load_state_dict(resume_ck["optimizer"])
        extra = resume_ck["extra"]
        value_model.load_state_dict(extra["value_model"])
        value_opt.load_state_dict(extra["value_optimizer"])
        kl_ctl.load_state_dict(extra["kl_controller"])
        set_rng_state(resume_ck["rng"])
        it = resume_ck["step"]
        print(f"resumed from {ck_path} at iteration {it}")
    fwd = maybe_compile(policy, device, cfg.compile)
    # the update's passes; under torchrun DDP: backward averages gradients over processes
    train_fwd, train_value = wrap(fwd, dist), wrap(value_model, dist)
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), it if resume_ck else None,
                     enabled=dist.is_main)

    def save(it):
        save_stage(cfg.out, model=policy, model_kind="gpt", config=cfg, tokenizer=tok, step=it,
                   optimizer=policy_opt, rng=rng_state(),
                   extra={"value_model": {k: v.detach().cpu() for k, v in value_model.state_dict().items()},
                          "value_optimizer": value_opt.state_dict(),
                          "kl_controller": kl_ctl.state_dict()})

    k = cfg.samples_per_prompt
    t_start = time.time()
    bar = tqdm(total=cfg.iterations, initial=it, desc="ppo", disable=None if dist.is_main else True,
               leave=False)
    while it < cfg.iterations:
        beta = kl_ctl.kl_coef
        for opt, lr in ((policy_opt, cfg.lr), (value_opt, cfg.value_lr)):
            set_lr(opt, lr * min(1.0, (it + 1) / max(1, cfg.warmup)))

        # ============ 1. rollout (no grad): generate, then score with the four models ============
        t0 = time.time()
        rng = np.random.default_rng([cfg.seed, it])
        chosen = rng.choice(len(prompt_texts), size=cfg.prompts_per_iter, replace=False)
        chosen = shard(chosen, dist)  # this process's share of the prompts (torchrun)
        batch_prompts = [prompt_texts[i] for i in chosen for _ in range(k)]  # prompt-major groups
        policy.eval()
        sample_seed = (cfg.seed * 100_003 + it) * dist.world_size + dist.rank  # its own samples
        gen = generate(policy, [tok.render_prompt(p) for p in batch_prompts], cfg.max_new_tokens,
                       eos_id=tok.end_id, pad_id=tok.pad_id, temperature=cfg.temperature,
                       generator=torch.Generator(device=device).manual_seed(sample_seed))
        policy.train()
        tokens, attn_mask = gen.tokens, gen.attn_mask                             # (B, T)
        mask = gen.response_mask[:, 1:]                   # (B, T-1) targets that are response tokens
        t1 = time.time()
        with torch.no_grad():
            old_logp = per_token_logprobs(fwd, tokens, attn_mask, device)          # (B, T-1) log π_θold
            ref_logp = per_token_logprobs(ref, tokens, attn_mask, device)          # (B, T-1) log π_ref
            old_values = (state_values(value_model, tokens, attn_mask, device)     # (B, T-1) V(s_t)
                          if use_critic else torch.zeros_like(old_logp))
            with autocast(device):
                score = reward_model.score(tokens, attn_mask).float()             # (B,) r_φ(x, y)
        proxy = score.clone()
        score = score + cfg.no_end_penalty * (~gen.ended).float()                  # unfinished: penalty
        t2 = time.time()

        # ============ 2. advantages: per-token reward −β·KL, plus r_φ at the last token ============
        kl = torch.where(mask, kl_k1(old_logp, ref_logp), 0.0)  # (B, T-1) log π_θ − log π_ref, ch. 5
        kl_per_response = kl.sum(-1)                                                # (B,)
        check_finite(it + 1, proxy_reward=proxy.mean(), kl=kl_per_response.mean())  # name the cause
        value_mask = mask
        if cfg.advantage == "gae":
            rewards = -beta * kl                                                    # (B, T-1)
            last = mask.long().cumsum(-1).argmax(-1)                                # (B,) last response token
            rewards[torch.arange(len(last)), last] += score                        # r_φ arrives at the end
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        else:
            R = score - beta * kl_per_response        # (B,) one reward per response: r_φ − β·KL
            if cfg.advantage == "bandit":             # lecture ch. 7, γ = 0: A = R − V(x)
                v_x = old_values[:, gen.prompt_len - 1]   # V(x): value of the prompt state
                A = R - v_x                                                         # (B,)
                value_mask = torch.zeros_like(mask)
                value_mask[:, gen.prompt_len - 1] = True  # V(x) regresses onto R
                returns = torch.zeros_like(old_values)
                returns[:, gen.prompt_len - 1] = R
            else:                                     # RLOO: R minus the mean R of the other k−1
                A = group_baseline_advantages(R, k)
                returns = torch.zeros_like(old_values)
                value_mask = torch.zeros_like(mask)   # no critic to train
            advantages = torch.where(mask, A[:, None].expand_as(old_logp), 0.0)   # (B, T-1)
        if cfg.whiten:  # with the mean and variance of the whole rollout, every process's
            advantages = masked_whiten(advantages, mask,
                                       mean_var=masked_mean_var(advantages, mask, dist))

        # ============ 3. update: epochs over shuffled minibatches, L_PPO (lecture ch. 4) ============
        B = tokens.shape[0]
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + it)
        agg = {}
        for epoch in range(cfg.epochs):
            # a minibatch of --minibatch-size responses is split over the processes like B
            for mb in torch.randperm(B, generator=g).split(cfg.minibatch_size // dist.world_size):
                mb = mb.to(device)
                logp, entropy = per_token_logprobs(train_fwd, tokens[mb], attn_mask[mb], device,
                                                   with_entropy=True)
                values = (state_values(train_value, tokens[mb], attn_mask[mb], device)
                          if use_critic else torch.zeros_like(logp))
                loss, stats = ppo_loss(logp, old_logp[mb], advantages[mb], values, old_values[mb],
                                       returns[mb], mask[mb], entropy, cfg.clip_eps, cfg.vf_coef,
                                       cfg.ent_coef, cfg.value_clip, value_mask[mb])
                check_finite(it + 1, loss=loss)  # it + 1: the iteration as the log numbers it
                loss.backward()
                pg_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                check_finite(it + 1, policy_grad_norm=pg_norm)
                policy_opt.step()
                policy_opt.zero_grad(set_to_none=True)
                if use_critic:
                    v_norm = torch.nn.utils.clip_grad_norm_(value_model.parameters(), cfg.grad_clip)
                    check_finite(it + 1, value_grad_norm=v_norm)
                    value_opt.step()
                    value_opt.zero_grad(set_to_none=True)
                for name, v in stats.items():
                    agg.setdefault(name, []).append(float(v))
        t3 = time.time()
        it += 1
        bar.update(1)

        # ============ log: proxy reward, KL, PPO diagnostics, and the gold judge on the rollouts ====
        texts = [tok.decode(ids) for ids in gen.responses()]
        known = [i for i, p in enumerate(batch_prompts) if is_world_prompt(p)]
        gold = [gold_reward(batch_prompts[i], texts[i], bool(gen.ended[i])) for i in known]
        acc = [float(correct(batch_prompts[i], texts[i])) for i in known]
        row = {"proxy": proxy.mean().item(), "kl": kl_per_response.mean().item(), "beta": beta,
               "gold": float(np.mean(gold)) if gold else None,
               "accuracy": float(np.mean(acc)) if acc else None,
               "length": mask.sum(-1).float().mean().item(),
               "ended": gen.ended.float().mean().item(),
               **{n: float(np.mean(v)) for n, v in agg.items()},
               "time_generate": t1 - t0, "time_score": t2 - t1, "time_update": t3 - t2}
        row = mean_over_ranks(row, dist)  # the whole rollout's means (each process: B responses)
        kl_ctl.update(row["kl"], B * dist.world_size)
        log.write(it, split="train", **row)
        judged = (f"gold {row['gold']:+.3f} | acc {row['accuracy']:.2f}" if row["gold"] is not None
                  else "gold n/a (not the built-in world)")
        print(f"iter {it:4d} | rm {row['proxy']:+.3f} | {judged} | kl {row['kl']:6.2f} | β {beta:.3f} | "
              f"approx_kl {row['approx_kl']:.4f} | clipfrac {row['clipfrac']:.3f} | "
              f"entropy {row['entropy']:.3f} | vf {row['value_loss']:.4f} | "
              f"ev {row['explained_variance']:+.2f} | len {row['length']:4.1f} | "
              f"{t1 - t0:.2f}/{t2 - t1:.2f}/{t3 - t2:.2f}s", flush=True)
        # every process evaluates (they would otherwise wait for rank 0); rank 0 prints and writes
        if not cfg.prompts and (it % cfg.eval_every == 0 or it == cfg.iterations):
            ev = evaluate(policy, tok, world.val_prompts, ref=ref, max_new_tokens=cfg.max_new_tokens,
                          seed=cfg.seed + 7)
            log.write(it, split="val", gold=ev["gold"], accuracy=ev["accuracy"], kl=ev["kl"],
                      length=ev["length"])
            print(f"iter {it:4d} | held-out: gold {ev['gold']:+.3f} | accuracy "
                  f"{ev['accuracy']:.3f} | kl {ev['kl']:.2f}", flush=True)
        if dist.is_main and (it % cfg.ckpt_every == 0 or it == cfg.iterations):
            save(it)
    bar.close()
    seconds = time.time() - t_start
    if not dist.is_main:  # rank 0 evaluates and writes eval.json
        return {"train_seconds": seconds, "iterations": it}

    # --- final evaluation on the test prompts: sampled (T = 1) and greedy, with KL to SFT ---
    result = {"train_seconds": seconds, "iterations": it}
    rows = read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    train_rows = [r for r in rows if r["split"] == "train"]
    tail = train_rows[-max(1, len(train_rows) // 10):]
    result["final_proxy"] = float(np.mean([r["proxy"] for r in tail]))
    result["phase_seconds"] = {p: float(np.median([r[f"time_{p}"] for r in train_rows]))
                               for p in ("generate", "score", "update")}
    if not cfg.prompts:
        result.update(final_evaluation(policy, tok, world.test_prompts, ref=ref,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed))
        # the proxy on held-out prompts: what the reward model thinks of the final policy
        result["test_proxy"] = reward_on(policy, reward_model, tok, world.test_prompts, cfg, device)
        print(f"test proxy reward (RM) {result['test_proxy']:+.3f} | median phase seconds "
              f"{result['phase_seconds']}")
    write_json(os.path.join(cfg.out, "eval.json"), result)
    return result


@torch.no_grad()
def reward_on(policy, reward_model, tok, prompts, cfg, device) -> float:
    """Mean reward-model score of policy samples (temperature 1) on the given prompts."""
    gen = generate(policy, [tok.render_prompt(p.text) for p in prompts], cfg.max_new_tokens,
                   eos_id=tok.end_id, pad_id=tok.pad_id,
                   generator=torch.Generator(device=device).manual_seed(cfg.seed + 11))
    with autocast(device):
        score = reward_model.score(gen.tokens, gen.attn_mask).float()
    return score.mean().item()


def is_world_prompt(text: str) -> bool:
    try:
        lookup(text)
        return True
    except ValueError:
        return False


def main(argv=None):
    prog = "train_ppo.py"
    cfg = parse_config(PPOConfig, argv, prog, description=__doc__.split("\n\n")[0])
    try:
        train(cfg, prog)
    except (DataError, CheckpointError, TokenizerError, NonFiniteError, ValueError) as e:
        fail(prog, str(e))


if __name__ == "__main__":
    main()
