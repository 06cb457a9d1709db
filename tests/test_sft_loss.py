"""Properties of the SFT loss (lecture ch. 1) and of the masking convention it is built on."""
import math

import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from minirlhf.masking import masked_mean, masked_sum, token_entropy, token_logprobs
from train_sft import sft_loss


def random_batch(seed, B=3, T=6, V=5, dtype=torch.float32):
    """Random logits (B, T, V), tokens (B, T) and a prompt/response/padding mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T)
    for b in range(B):
        start = int(torch.randint(1, T, (1,), generator=g))  # the prompt is at least 1 token
        end = int(torch.randint(start + 1, T + 1, (1,), generator=g))  # >= 1 response token
        mask[b, start:end] = 1
    return logits, tokens, mask


def test_equals_hand_computed_cross_entropy():
    """A 1×4 example worked by hand: the loss is the mean of −log softmax over the two targets."""
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0], [0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[0, 1, 2, 0]])
    mask = torch.tensor([[0, 0, 1, 1]])  # targets tokens[2] = 2 (from logits[1]), tokens[3] = 0
    # position 1 predicts token 2 from logits [0, 1, 0]; position 2 predicts token 0 from [1, 1, 3]
    l1 = -math.log(math.exp(0) / (math.exp(0) + math.exp(1) + math.exp(0)))
    l2 = -math.log(math.exp(1) / (math.exp(1) + math.exp(1) + math.exp(3)))
    loss, stats = sft_loss(logits, tokens, mask)
    assert math.isclose(loss.item(), (l1 + l2) / 2, rel_tol=1e-6)
    assert int(stats["n_tokens"]) == 2
    assert float(stats["accuracy"]) == 0.0  # argmax is 1 at position 1 and 2 at position 2


def test_matches_cross_entropy_with_ignore_index():
    """The loss equals PyTorch's F.cross_entropy with the masked targets set to ignore_index."""
    logits, tokens, mask = random_batch(0)
    targets = tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss, _ = sft_loss(logits, tokens, mask)
    torch.testing.assert_close(loss, expected)


@given(seed=st.integers(0, 10_000), fill_seed=st.integers(0, 10_000))
def test_ignored_positions_do_not_matter(seed, fill_seed):
    """Changing ignored targets (prompt, padding, even -100) and the logits predicting them
    leaves the loss and the gradient at every real position unchanged; the gradient there is 0."""
    logits, tokens, mask = random_batch(seed)
    g = torch.Generator().manual_seed(fill_seed)
    ignored = mask == 0
    new_tokens = torch.where(ignored, torch.randint(-100, 5, tokens.shape, generator=g), tokens)
    new_tokens[:, 0] = torch.randint(0, 5, (tokens.shape[0],), generator=g)  # never a target
    ignored_pred = F.pad(ignored[:, 1:], (0, 1), value=True)  # logits[:, t] predicts t + 1
    new_logits = torch.where(ignored_pred[..., None], 1e3 * torch.randn(logits.shape, generator=g),
                             logits)

    a, b = logits.clone().requires_grad_(), new_logits.clone().requires_grad_()
    loss_a, _ = sft_loss(a, tokens, mask)
    loss_b, _ = sft_loss(b, new_tokens, mask)
    loss_a.backward()
    loss_b.backward()
    assert loss_a.item() == loss_b.item()
    assert torch.equal(a.grad, b.grad)
    assert torch.all(b.grad[ignored_pred] == 0)


def test_per_token_loss_is_negative_log_probability():
    """stats["per_token_loss"][b, t] = −log softmax(logits[b, t])[tokens[b, t + 1]] (softmax taken
    directly, then log) on real targets, and 0 on ignored ones."""
    logits, tokens, mask = random_batch(1)
    _, stats = sft_loss(logits, tokens, mask)
    probs = logits[:, :-1].softmax(-1)
    p_target = probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    expected = torch.where(mask[:, 1:].bool(), -p_target.log(), 0.0)
    torch.testing.assert_close(stats["per_token_loss"], expected)


def test_certain_and_coin_flip_predictions():
    """Probability 1 on the target -> loss 0 (huge logits, still finite); probability 0.5 on the
    target -> loss ln 2 (the lecture's quiz); a confidently wrong prediction costs the logit gap."""
    V = 4
    tokens = torch.tensor([[0, 2, 3]])
    mask = torch.tensor([[0, 1, 1]])
    sure = torch.zeros(1, 3, V)
    sure[0, 0, 2] = sure[0, 1, 3] = 1e4
    loss, stats = sft_loss(sure, tokens, mask)
    assert loss.item() == 0.0 and float(stats["accuracy"]) == 1.0

    wrong = torch.zeros(1, 3, V)
    wrong[0, 0, 1] = wrong[0, 1, 1] = 1e4  # all mass on token 1, targets are 2 and 3
    loss, _ = sft_loss(wrong, tokens, mask)
    assert math.isclose(loss.item(), 1e4, rel_tol=1e-6)

    half = torch.full((1, 3, V), -1e4)
    half[0, :2, 0] = 0.0  # two tokens share the mass: p(target) = 0.5
    half[0, 0, 2] = half[0, 1, 3] = 0.0
    loss, _ = sft_loss(half, tokens, mask)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)


def test_token_mean_weighs_long_responses_more():
    """The average is over all response tokens of the batch, not over sequences: a 1-token and a
    3-token response give (ℓ_a + ℓ_b1 + ℓ_b2 + ℓ_b3) / 4, not (ℓ_a + mean ℓ_b) / 2."""
    logits, tokens, _ = random_batch(2, B=2, T=5)
    mask = torch.tensor([[0, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    loss, stats = sft_loss(logits, tokens, mask)
    per_token = stats["per_token_loss"]
    assert math.isclose(loss.item(), per_token.sum().item() / 4, rel_tol=1e-6)
    per_sequence_mean = (per_token[0].sum() + per_token[1].sum() / 3) / 2
    assert not math.isclose(loss.item(), per_sequence_mean.item(), rel_tol=1e-3)


def test_gradient_is_softmax_minus_onehot_over_n_tokens():
    """∂L/∂logits[b, t] = (softmax − onehot(target)) / N on real targets and 0 elsewhere, where
    N is the number of real targets in the batch."""
    logits, tokens, mask = random_batch(3, B=4, T=7, V=6)
    logits.requires_grad_()
    loss, stats = sft_loss(logits, tokens, mask)
    loss.backward()
    n = int(stats["n_tokens"])
    real = F.pad(mask[:, 1:], (0, 1))[..., None]  # (B, T, 1) logits[:, t] predicts target t+1
    onehot = F.one_hot(F.pad(tokens[:, 1:], (0, 1)), logits.shape[-1]).float()
    expected = real * (logits.detach().softmax(-1) - onehot) / n
    torch.testing.assert_close(logits.grad, expected)


def test_gradcheck_float64():
    """Autograd's gradient of the loss matches finite differences (float64)."""
    logits, tokens, mask = random_batch(4, B=2, T=4, V=3, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: sft_loss(z, tokens, mask)[0], (logits,))


def test_empty_mask_gives_zero_loss_and_zero_gradient():
    """A batch with no response token gives loss 0 and gradient 0, never 0/0 = NaN."""
    logits, tokens, _ = random_batch(5)
    logits.requires_grad_()
    loss, _ = sft_loss(logits, tokens, torch.zeros_like(tokens))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


# --------------------------------------------------------------------------- masking helpers

@given(seed=st.integers(0, 10_000))
def test_masked_mean_ignores_masked_values_even_nan(seed):
    """masked_mean/masked_sum equal the plain mean/sum of the selected entries, per row and for
    the whole batch; NaN or inf at masked positions changes nothing."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=g) < 0.6
    mask[0] = True  # at least one real entry
    poisoned = torch.where(mask, x, torch.tensor(float("nan")))
    assert math.isclose(masked_mean(poisoned, mask).item(), x[mask].mean().item(), rel_tol=1e-5)
    assert math.isclose(masked_sum(poisoned, mask.float()).item(), x[mask].sum().item(),
                        rel_tol=1e-5, abs_tol=1e-5)
    rows = masked_mean(poisoned, mask, dim=-1)
    for b in range(4):
        expected = x[b][mask[b]].mean().item() if mask[b].any() else 0.0
        assert math.isclose(rows[b].item(), expected, rel_tol=1e-5, abs_tol=1e-6)


def test_token_logprobs_and_entropy_are_stable():
    """token_logprobs stays finite (= −2e4, not −inf) for logits 2e4 apart, and token_entropy is
    ln V for uniform logits and 0 for a near one-hot distribution."""
    logits = torch.tensor([[[1e4, -1e4, 0.0]]])
    lp = token_logprobs(logits, torch.tensor([[1]]))
    assert torch.isfinite(lp).all() and math.isclose(lp.item(), -2e4, rel_tol=1e-6)
    assert math.isclose(token_entropy(torch.zeros(1, 1, 7)).item(), math.log(7), rel_tol=1e-6)
    assert token_entropy(logits).item() == 0.0
