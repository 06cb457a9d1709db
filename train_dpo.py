"""Direct Preference Optimization (DPO): learn from preference pairs with no reward model and no
sampling during training (lecture ch. 8; CS224N notes, "Removing the RL from RLHF").

The policy's own log-ratio β·log π_θ/π_ref plays the reward in the Bradley–Terry loss of the
reward model (train_rm.py), so preference data trains the policy directly.
"""
import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen_logp: torch.Tensor, policy_rejected_logp: torch.Tensor,
             ref_chosen_logp: torch.Tensor, ref_rejected_logp: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict]:
    """DPO loss (Rafailov et al. 2023, eq. 7), derived as in the CS224N notes:

    (1) The KL-penalised objective  max_π E_{y~π}[r(x,y)] − β·KL(π‖π_ref)  (lecture ch. 5) has
        the closed-form optimum  π*(y|x) = π_ref(y|x)·exp(r(x,y)/β) / Z(x)  (DPO paper eq. 4).
    (2) Taking logs and solving for the reward:  r(x,y) = β·log π*(y|x)/π_ref(y|x) + β·log Z(x)
        (eq. 5).
    (3) Bradley–Terry only sees reward differences, P(y_w ≻ y_l) = σ(r(y_w) − r(y_l))
        (lecture ch. 6), so β·log Z(x) cancels: the preference probability is written with the
        policy alone (eq. 6), and its negative log-likelihood is the loss (eq. 7)
            L_DPO = −E log σ(β·log π_θ(y_w)/π_ref(y_w) − β·log π_θ(y_l)/π_ref(y_l)).

    policy_chosen_logp, policy_rejected_logp: (B,) log π_θ(y|x), summed over response tokens
    ref_chosen_logp, ref_rejected_logp:       (B,) log π_ref(y|x), summed likewise (no grad)
    beta: β, the KL strength of (1); small β lets π_θ move far from π_ref
    label_smoothing: ε of "conservative DPO": a label is assumed flipped with probability ε,
        loss = −(1−ε)·log σ(β·m) − ε·log σ(−β·m)   (sigmoid loss only)
    loss_type: "sigmoid" (DPO) or "ipo" (Azar et al. 2023): (m − 1/(2β))², which pulls the
        margin to a finite value instead of pushing it to infinity on separable data
    returns loss (scalar), stats {"loss", "chosen_reward", "rejected_reward", "accuracy",
        "margin"}: batch means of the implicit rewards β·log π_θ/π_ref of (2) without β·log Z,
        the fraction of pairs with chosen reward > rejected reward, and their difference β·m.

    Here m = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)).
    """
    chosen_logratio = policy_chosen_logp - ref_chosen_logp  # (B,) log π_θ(y_w)/π_ref(y_w)
    rejected_logratio = policy_rejected_logp - ref_rejected_logp  # (B,) log π_θ(y_l)/π_ref(y_l)
    margin = chosen_logratio - rejected_logratio  # (B,) m
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)  # L_DPO, eq. 7 / CS224N
                  - label_smoothing * F.logsigmoid(-beta * margin))  # (B,)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
        losses = (margin - 1 / (2 * beta)) ** 2  # (B,) IPO, Azar et al. 2023
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    loss = losses.mean()
    with torch.no_grad():
        chosen_reward = beta * chosen_logratio  # (B,) r̂(y_w) = β log π_θ/π_ref, step (2) / eq. 5
        rejected_reward = beta * rejected_logratio  # (B,) r̂(y_l)
        stats = {
            "loss": loss.detach(),
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "accuracy": (chosen_reward > rejected_reward).float().mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
        }
    return loss, stats


def dpo_loss_single_ratio(policy_chosen_logp: torch.Tensor, policy_rejected_logp: torch.Tensor,
                          ref_chosen_logp: torch.Tensor, ref_rejected_logp: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """The second form of L_DPO in the CS224N notes, with one ratio inside the log:

        L_DPO = −E log σ(β·log [π_θ(y_w)·π_ref(y_l)] / [π_θ(y_l)·π_ref(y_w)])

    Same inputs as `dpo_loss` (all (B,)); returns the scalar loss only. It equals
    `dpo_loss(..., loss_type="sigmoid")` (tested), and is kept to show the two forms agree.
    """
    log_numerator = policy_chosen_logp + ref_rejected_logp  # (B,) log π_θ(y_w)·π_ref(y_l)
    log_denominator = policy_rejected_logp + ref_chosen_logp  # (B,) log π_θ(y_l)·π_ref(y_w)
    return -F.logsigmoid(beta * (log_numerator - log_denominator)).mean()  # CS224N notes, form 2
