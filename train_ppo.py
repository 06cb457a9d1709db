"""RLHF with PPO: improve the policy against the reward model, penalised by its KL to the SFT
reference (lecture ch. 4 PPO, ch. 5 the KL-penalised objective, ch. 7 the four-model loop).

The losses below are pure functions of per-token tensors (B, T) with a response mask (B, T):
the clipped surrogate L^CLIP for the policy, the value loss L^VF for the value model, an entropy
bonus H, and their sum L_PPO = L^CLIP − c1·L^VF + c2·H.
"""
import torch

from minirlhf.masking import masked_mean, masked_var, token_entropy
from minirlhf.rl import kl_k3


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
    """
    log_ratio = logp - old_logp  # (B, T)
    ratio = log_ratio.exp()  # (B, T) r_t(θ), lecture ch. 4
    surr_unclipped = ratio * advantages  # (B, T) r_t·A_t, L^CPI
    surr_clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages  # (B, T) clip(r_t)·A_t
    l_clip = masked_mean(torch.min(surr_unclipped, surr_clipped), mask)  # L^CLIP, lecture ch. 4
    loss = -l_clip  # we minimise
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "approx_kl": masked_mean(kl_k3(old_logp, logp), mask),  # k3 with ratio π_θ/π_θold
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
            "value_clipfrac": masked_mean((vf > vf_unclipped).float(), mask),
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
             vf_coef: float = 0.5, ent_coef: float = 0.0,
             value_clip: float | None = None) -> tuple[torch.Tensor, dict]:
    """The full PPO objective L_PPO = L^CLIP − c1·L^VF + c2·H, returned as loss = −L_PPO (ch. 4).

    logp, old_logp, advantages: (B, T) as in `policy_loss`
    values, old_values, returns: (B, T) as in `value_loss`
    mask:     (B, T) 1 on response tokens
    entropy:  (B, T) per-token entropy H(π_θ(·|s_t)), e.g. `token_entropy(logits)`; None -> H = 0
    clip_eps: ε; vf_coef: c1; ent_coef: c2; value_clip: `value_loss`'s clip_range
    returns   loss (scalar), stats: those of `policy_loss` and `value_loss`, "entropy", "loss"

    The policy and the value model are separate networks here, so one total is only a
    convenience: L^CLIP and H send gradients to the policy, L^VF to the value model.
    """
    pg_loss, pg_stats = policy_loss(logp, old_logp, advantages, mask, clip_eps)
    vf_loss, vf_stats = value_loss(values, old_values, returns, mask, value_clip)
    l_clip = -pg_loss  # L^CLIP
    l_vf = vf_loss  # L^VF
    h = masked_mean(entropy, mask) if entropy is not None else logp.new_zeros(())  # H[π_θ]
    l_ppo = l_clip - vf_coef * l_vf + ent_coef * h  # L_PPO = L^CLIP − c1 L^VF + c2 H, lecture ch. 4
    loss = -l_ppo  # we minimise
    stats = {**pg_stats, **vf_stats, "entropy": h.detach(), "loss": loss.detach()}
    return loss, stats
