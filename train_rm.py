"""Reward modelling: learn a scalar reward r_φ(x, y) from pairwise preferences (lecture ch. 6).

The reward model is trained with the Bradley–Terry loss −log σ(r_w − r_l) on (prompt, chosen,
rejected) triples; it is the judge PPO later optimises against.
"""
import torch
import torch.nn.functional as F


def preference_probability(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: P(a ≻ b) = exp(r_a) / (exp(r_a) + exp(r_b)) = σ(r_a − r_b) (lecture ch. 6).

    r_a, r_b: (B,) -> (B,).
    """
    return torch.sigmoid(r_a - r_b)  # σ(Δ), lecture ch. 6


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry negative log-likelihood L_RM = −(1/B) Σ log σ(r_w − r_l) (lecture ch. 6).

    r_chosen:   (B,) reward of the preferred response y_w
    r_rejected: (B,) reward of the other response y_l
    returns     loss (scalar), stats {"loss", "accuracy", "margin", "chosen_reward",
                "rejected_reward"} (batch means; accuracy counts r_w > r_l strictly)

    Written with logsigmoid, −log σ(Δ) = softplus(−Δ), which is finite for any Δ; the lecture's
    `-torch.log(torch.sigmoid(Δ))` gives log(0) = −inf once Δ < −104 in float32.
    """
    delta = r_chosen - r_rejected  # (B,) Δ = r_w − r_l
    loss = -F.logsigmoid(delta).mean()  # L_RM = −mean log σ(Δ), lecture ch. 6
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "accuracy": (delta > 0).float().mean(),
            "margin": delta.mean(),
            "chosen_reward": r_chosen.mean(),
            "rejected_reward": r_rejected.mean(),
        }
    return loss, stats
