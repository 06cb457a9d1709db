"""Reinforcement-learning math shared by the RL scripts: returns, advantages, KL estimators and
the KL-coefficient controllers. Pure functions of tensors; nothing here touches a model.

- returns and GAE: lecture ch. 2 (G_t, V, advantage A = Q - V) and ch. 7 (A = r - V(x)),
- the leave-one-out group baseline: ch. 3 ("baseline subtraction"), and GRPO's group-normalised
  advantages (DeepSeekMath),
- the KL-penalised reward r_φ − β·KL, per token (`kl_penalised_rewards`) or per response with
  the γ = 0 advantage A = R − V(x) (`bandit_advantages`): ch. 5, ch. 7 step 2,
- per-token KL estimators k1, k2, k3: ch. 5,
- adaptive β: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".

Shapes: B batch (sequences), T time (per-token positions), N samples, k samples per prompt.
Per-token tensors are (B, T) with a 0/1 `mask` (B, T) marking the response tokens, as in
`minirlhf.masking`. A masked position is not a step of the episode: it gets 0 and neither its
reward nor its value reaches any real position. These functions hold no gradient logic of their
own; call them under `torch.no_grad()` when the inputs come from a model.

Left out on purpose: whitening lives in `masking.masked_whiten`; truncated episodes (a value
bootstrapped after the last real token) are not modelled: every response ends its episode.
"""
import torch


# ----------------------------------------------------------------------------- returns and GAE

def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + γ·G_{t+1} over the real tokens of each row (lecture ch. 2).

    rewards, mask: (B, T) -> returns (B, T), 0 at masked positions. The return after the last
    real token is 0 (the episode ends there); a masked position between real ones is skipped.
    """
    real = mask.bool()
    B, T = rewards.shape
    returns = torch.zeros_like(rewards)  # (B, T)
    next_return = rewards.new_zeros(B)  # (B,) G_{t+1} of the next real step
    for t in reversed(range(T)):
        g = rewards[:, t] + gamma * next_return  # G_t = r_t + γ G_{t+1}, lecture ch. 2
        returns[:, t] = torch.where(real[:, t], g, 0.0)
        next_return = torch.where(real[:, t], g, next_return)
    return returns


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), the advantage of lecture ch. 2-3.

    rewards, values, mask: (B, T) -> (advantages (B, T), returns (B, T)), both 0 where masked.
        δ_t = r_t + γ·V(s_{t+1}) − V(s_t)        (TD error; V after the last real token is 0)
        A_t = δ_t + γλ·A_{t+1}                    (= Σ_k (γλ)^k δ_{t+k})
        returns_t = A_t + V(s_t)                  (the value model's regression target)
    λ = 1 gives A_t = G_t − V(s_t) (Monte Carlo, unbiased, high variance); λ = 0 gives the TD
    error δ_t (low variance, biased by V). With γ = λ = 1 and a single reward at the end this is
    the lecture's A = r − V (ch. 7) at every token.
    """
    real = mask.bool()
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = rewards.new_zeros(B)  # (B,) V(s_{t+1}) of the next real step; 0 past the end
    next_adv = rewards.new_zeros(B)  # (B,) A_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # δ_t, TD error
        adv = delta + gamma * lam * next_adv  # A_t = δ_t + γλ A_{t+1}
        advantages[:, t] = torch.where(real[:, t], adv, 0.0)
        # a masked position is not a step: carry the next real step's quantities past it
        next_value = torch.where(real[:, t], values[:, t], next_value)
        next_adv = torch.where(real[:, t], adv, next_adv)
    returns = torch.where(real, advantages + values, 0.0)  # (B, T) target for V
    return advantages, returns


def discounted_returns_reference(rewards: torch.Tensor, mask: torch.Tensor,
                                 gamma: float) -> torch.Tensor:
    """Slow, obvious reference for `discounted_returns`: G_t = Σ_k γ^k r_{t+k} over real steps.

    Plain Python, one row and one step at a time; used by the tests.
    """
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        for i, t in enumerate(steps):
            out[b, t] = sum(gamma ** k * float(rewards[b, s]) for k, s in enumerate(steps[i:]))
    return out


def gae_reference(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                  lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow, obvious reference for `gae`: A_t = Σ_k (γλ)^k δ_{t+k} over real steps.

    Plain Python, one row and one step at a time; used by the tests.
    """
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        v = [float(values[b, t]) for t in steps] + [0.0]  # value after the last step is 0
        deltas = [float(rewards[b, t]) + gamma * v[i + 1] - v[i] for i, t in enumerate(steps)]
        for i, t in enumerate(steps):
            advantages[b, t] = sum((gamma * lam) ** k * d for k, d in enumerate(deltas[i:]))
    returns = torch.where(mask.bool(), advantages + values, 0.0)
    return advantages, returns


# ----------------------------------------------------------------------------- baselines

def group_baseline_advantages(R: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out (RLOO) advantages: A_i = R_i − mean of the other k−1 samples of its prompt.

    R: (N,) rewards ordered prompt-major (samples 0..k-1 answer prompt 0, k..2k-1 prompt 1, ...)
    -> A: (N,). The baseline of sample i does not use R_i, so E[∇log π(y_i)·b_i] = 0 and the
    gradient stays unbiased (lecture ch. 3, "baseline subtraction"); it equals k/(k−1)·(R_i − mean).
    """
    k = group_size
    if k < 2 or R.numel() % k:
        raise ValueError(f"group_size must be >= 2 and divide {R.numel()}, got {k}")
    groups = R.reshape(-1, k)  # (N/k, k)
    others_mean = (groups.sum(-1, keepdim=True) - groups) / (k - 1)  # (N/k, k) baseline b_i
    return (groups - others_mean).reshape(-1)  # (N,)


def group_normalized_advantages(R: torch.Tensor, group_size: int, use_std: bool = True,
                                eps: float = 1e-8) -> torch.Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, DeepSeekMath, eq. 3 with outcome
    rewards): A_i = (R_i − mean of its group) / (std of its group + eps).

    R: (N,) rewards ordered prompt-major, k = group_size per prompt -> A: (N,). The std is the
    population std of the group's k rewards (ddof 0), so a group's advantages have mean 0 and,
    unless all its rewards are equal, std 1 (up to eps). A group whose rewards are all equal
    carries no signal: its advantages are exactly 0, never NaN. use_std=False gives the plain
    centred form R_i − mean, which is RLOO's leave-one-out advantage times (k − 1)/k.
    """
    k = group_size
    if k < 2 or R.numel() % k:
        raise ValueError(f"group_size must be >= 2 and divide {R.numel()}, got {k}")
    groups = R.reshape(-1, k)  # (N/k, k)
    centred = groups - groups.mean(-1, keepdim=True)  # (N/k, k) R_i − mean
    if use_std:
        centred = centred / (groups.std(-1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1)  # (N,)


# ------------------------------------------------------------------- the KL-penalised reward
# RLHF maximises J = E[r_φ(x, y)] − β·KL(π_θ‖π_ref) (lecture ch. 5). The reward model scores a
# whole response; the KL is a sum over its tokens. Two ways to hand this to the advantage
# estimator follow: per token (for GAE), or as one reward per response (γ = 0, ch. 7).

def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
             estimator: str = "k1") -> torch.Tensor:
    """Per-token KL sample on response tokens, else 0: log π_θ(y_t) − log π_ref(y_t) (k1, below),
    or the k3 estimate (`estimator="k3"`, as GRPO's KL term).

    logp, ref_logp, mask: (B, T) -> (B, T). Its row sum is the response's KL estimate KL(y).
    """
    kl = KL_ESTIMATORS[estimator](logp, ref_logp)  # (B, T), lecture ch. 5
    return torch.where(mask.bool(), kl, 0.0)


def kl_penalised_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
                         mask: torch.Tensor, beta: float, estimator: str = "k1") -> torch.Tensor:
    """Per-token rewards of the KL-penalised objective (lecture ch. 5; ch. 7 step 2).

    score:    (B,) r_φ(x, y), the reward model's score of each whole response
    logp:     (B, T) log π_θ(y_t | x, y_<t) of the sampled tokens
    ref_logp: (B, T) log π_ref(y_t | x, y_<t) of the same tokens
    mask:     (B, T) 1 on response tokens
    beta:     β, the KL coefficient
    estimator: the per-token KL sample, "k1" (the lecture's log-ratio) or "k3"
    returns   rewards (B, T): r_t = −β·(log π_θ(y_t) − log π_ref(y_t)) on every response token,
              plus r_φ(x, y) on the last one; 0 where masked.

    Summed over a response the rewards are r_φ(x, y) − β·KL(y): the objective's sample. Spread
    over tokens, GAE can credit each token with the KL it added.
    """
    rewards = -beta * token_kl(logp, ref_logp, mask, estimator)  # (B, T) −β·KL_t per token
    last = mask.long().cumsum(-1).argmax(-1)  # (B,) column of the last response token
    rewards[torch.arange(len(last)), last] += score  # r_φ arrives at the end, lecture ch. 7
    return rewards


def kl_penalised_return(score: torch.Tensor, kl: torch.Tensor, beta: float) -> torch.Tensor:
    """One reward per response, R = r_φ(x, y) − β·KL(y) (lecture ch. 5).

    score: (B,) r_φ(x, y); kl: (B, T) per-token KL samples, 0 off the response (`token_kl`)
    -> R (B,). It equals the row sum of `kl_penalised_rewards`.
    """
    return score - beta * kl.sum(-1)  # (B,)


def bandit_advantages(score: torch.Tensor, kl: torch.Tensor, values_at_prompt: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The lecture's γ = 0 simplification (ch. 7): the whole response is one action.

    score:            (B,) r_φ(x, y)
    kl:               (B, T) per-token KL samples, 0 off the response (`token_kl`)
    values_at_prompt: (B,) V_ψ(x), the value model's estimate at the prompt's last token
    beta:             β
    returns           (A, R), each (B,): R = r_φ(x, y) − β·KL(y) and A = R − V_ψ(x). R is the
                      value model's regression target at the prompt.

    With γ = λ = 1, GAE on `kl_penalised_rewards` gives at the first response token
    R − V(s_0): this form is that advantage, with V(x) as the only baseline.
    """
    R = kl_penalised_return(score, kl, beta)  # (B,) R = r_φ − β·KL
    return R - values_at_prompt, R  # A = R − V(x), lecture ch. 7


# ----------------------------------------------------------------------------- KL estimators
# Per-token estimators of KL(π‖π_ref) = E_{a~π}[log π(a) − log π_ref(a)] (lecture ch. 5) from
# tokens *sampled from π*, after Schulman, "Approximating KL Divergence" (2020). With
# ratio = π_ref(a)/π(a): k1 = −log ratio, k2 = ½(log ratio)², k3 = (ratio − 1) − log ratio.
# logp, ref_logp: (B, T) log-probs of the sampled tokens -> (B, T).

def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π(a) − log π_ref(a): unbiased for KL(π‖π_ref), can be negative per token.

    The lecture's penalty β·log(π/π_ref) (ch. 5, ch. 7) uses this estimator. (B, T) -> (B, T).
    """
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½·(log π_ref(a)/π(a))²: ≥ 0, biased (exact only to second order when π ≈ π_ref).

    (B, T) -> (B, T).
    """
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (ratio − 1) − log ratio, ratio = π_ref(a)/π(a): ≥ 0 and unbiased for KL(π‖π_ref).

    Unbiased because E_{a~π}[ratio − 1] = Σ_a π_ref(a) − 1 = 0; non-negative because
    x − 1 ≥ log x. expm1 keeps it ≥ 0 in floating point too (exp(x) − 1 − x rounds below 0 for
    tiny x). Overflows to +inf when log ratio > ~88 in float32. (B, T) -> (B, T).
    """
    log_ratio = ref_logp - logp  # log π_ref/π
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
            estimator: str = "k3") -> torch.Tensor:
    """The KL to the reference as a loss term instead of a reward, as GRPO has it (Shao et al.
    2024, DeepSeekMath, eq. 3-4): the token mean of the k3 estimate
        D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1
    over the response tokens, to be added to the loss as β·D_KL.

    logp:     (B, T) log π_θ of the sampled tokens, with gradient
    ref_logp: (B, T) log π_ref of the same tokens (no gradient)
    mask:     (B, T) 1 on response tokens
    returns   scalar. With k3 its gradient per token is (1 − π_ref/π_θ)·∇log π_θ: zero where
              π_θ = π_ref, pulling log π_θ down where it exceeds log π_ref and up where it is
              below. With k1 (log π_θ − log π_ref) the gradient is ∇log π_θ alone, whose
              expectation under π_θ is 0: k1 as a loss term does not pull toward π_ref.
    """
    kl = KL_ESTIMATORS[estimator](logp, ref_logp)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)


# ----------------------------------------------------------------------------- KL controllers

class AdaptiveKLController:
    """Adapts the KL coefficient β towards a target KL (Ziegler et al. 2019, section 2.2):

        e = clip(KL / target − 1, −0.2, 0.2),     β ← β · (1 + e · n_steps / horizon)

    KL above target -> β grows (pull harder towards π_ref); below -> β shrinks.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float):
        self.kl_coef = kl_coef  # β, the current coefficient
        self.target = target  # the KL (nats per sequence) we aim for
        self.horizon = horizon  # samples over which a full ±20% correction is applied

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)  # proportional error, clipped
        self.kl_coef *= 1.0 + error * n_steps / self.horizon
        return self.kl_coef

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = state["kl_coef"]
        self.target = state["target"]
        self.horizon = state["horizon"]


class FixedKLController:
    """A constant KL coefficient β with the same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.kl_coef = kl_coef  # β

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.kl_coef

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = state["kl_coef"]
