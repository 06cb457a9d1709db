"""The one masking convention of minirlhf, defined once.

Every loss in this project is an average over *real* tokens only. A `mask` is a 0/1 tensor
(bool or float) of the same shape as the values: 1 marks a token the loss is taken on (a response
token, the end token included), 0 marks a token it ignores (prompt, padding). Every function here
reads the mask as "== 1 or not": masked entries are *selected out* with `torch.where`, never
multiplied by 0, so a NaN or inf sitting at a masked position cannot leak into the result.

Shapes: B batch, T time (tokens), V vocabulary.

Token layout used everywhere: the model reads `tokens (B, T)` and returns `logits (B, T, V)`,
where `logits[:, t]` predicts `tokens[:, t + 1]`. Losses compare `logits[:, :-1]` with the shifted
targets `tokens[:, 1:]` under `mask[:, 1:]` (lecture ch. 1, "target tokens shifted left by one").

Left out on purpose: weighted (non-binary) masks, and per-sequence normalisation; the losses
say where they average over tokens and why.
"""
import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of `x` over the entries where `mask` is 1.

    x, mask: same shape, e.g. (B, T). dim: None for a scalar, or the dimension(s) to reduce.
    """
    kept = torch.where(mask.bool(), x, torch.zeros_like(x))  # (B, T), masked entries are 0
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of `x` over the entries where `mask` is 1; 0 where no entry is real.

    x, mask: same shape, e.g. (B, T). dim: None -> scalar, mean over every real token of the
    batch (a "token mean"); dim=-1 -> (B,), one mean per sequence.
    """
    n = masked_sum(torch.ones_like(x), mask, dim)  # number of real entries
    return masked_sum(x, mask, dim) / n.clamp(min=1)  # an all-zero mask gives 0, not 0/0


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of `x` over the real entries (a scalar). x, mask: same shape, e.g. (B, T).

    unbiased=True applies Bessel's correction n/(n-1) (needs at least two real entries).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8, mean_var: tuple | None = None) -> torch.Tensor:
    """Normalise `x` to mean 0 and variance 1 using statistics of the real entries only.

    x, mask: (B, T) -> (B, T); masked entries come back as 0. With shift_mean=False only the
    scale changes (the mean is added back), which keeps the sign of, e.g., a reward.
    Used on PPO advantages: a padded position must not move the mean or the variance.
    mean_var: (mean, variance) to use instead of x's own, e.g. those of the rollouts of every
    process under torchrun (`minirlhf.distributed.masked_mean_var`).
    """
    mean, var = mean_var if mean_var is not None else (masked_mean(x, mask), masked_var(x, mask))
    white = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        white = white + mean
    return torch.where(mask.bool(), white, torch.zeros_like(white))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under softmax(logits), per position: (B, T, V), (B, T) -> (B, T).

    Computed as log_softmax then gather, which subtracts the logsumexp and so stays finite for
    logits of any size (softmax-then-log would give log(0) = -inf). Under CUDA autocast
    log_softmax runs in float32 even when the logits are bf16.
    """
    logp_all = logits.log_softmax(dim=-1)  # (B, T, V)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy H(π(·|s_t)) = -Σ_v p_v log p_v of each next-token distribution (lecture ch. 4).

    logits: (B, T, V) finite -> (B, T), in nats.
    """
    logp_all = logits.log_softmax(dim=-1)  # (B, T, V)
    return -(logp_all.exp() * logp_all).sum(-1)  # (B, T)
