"""Properties of the GPT in minirlhf/model.py: causality, left-padding invariance, the KV-cache
path against the full forward pass (the reference), the scalar head, and the block-size limit.

Models are tiny (vocab 64, 16-32 channels, 1-2 layers) with weights redrawn at a larger scale than
GPT-2's init, so the logits depend strongly on the input and a leak would show well above 1e-5.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minirlhf.model as model_module
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel, attention_allowed

V = 64     # vocabulary of every test model
ATOL = 1e-5


def randomize(model, seed: int, std: float = 0.5):
    """Redraw every parameter from N(0, std): GPT-2's 0.02 init makes all logits nearly equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_config(n_layer=2, n_embd=32, n_head=2, block_size=32):
    return GPTConfig(vocab_size=V, block_size=block_size, n_layer=n_layer, n_head=n_head,
                     n_embd=n_embd)


def tiny_gpt(seed, **kw):
    torch.manual_seed(seed)
    return randomize(GPT(tiny_config(**kw)), seed)


def left_padded(seqs, pad_values):
    """Left-pad token lists with the given (arbitrary) pad ids -> tokens (B, T), mask (B, T)."""
    T = max(len(s) for s in seqs)
    tokens = torch.tensor([pad_values[i][: T - len(s)] + s for i, s in enumerate(seqs)])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], dtype=torch.bool)
    return tokens, mask


@given(seed=st.integers(0, 2**16), T=st.integers(2, 32), n_layer=st.integers(1, 2),
       data=st.data())
def test_changing_later_tokens_never_changes_earlier_logits(seed, T, n_layer, data):
    """Causality: logits at positions <= t depend only on tokens <= t."""
    model = tiny_gpt(seed, n_layer=n_layer, n_embd=16)
    t = data.draw(st.integers(0, T - 2), label="t")
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(V, (2, T), generator=g)                                  # (B, T)
    y = x.clone()
    y[:, t + 1:] = torch.randint(V, (2, T - t - 1), generator=g)
    y[:, t + 1] = (x[:, t + 1] + 1) % V  # at least one later token really changes
    with torch.no_grad():
        lx, ly = model(x), model(y)                                            # (B, T, V)
    torch.testing.assert_close(lx[:, : t + 1], ly[:, : t + 1], atol=ATOL, rtol=0)
    # the model does read its input: the changed position's own logits move
    assert (lx[:, t + 1] - ly[:, t + 1]).abs().max() > 1e-3


@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 12), min_size=2, max_size=4))
def test_left_padding_does_not_change_logits_at_real_positions(seed, lengths):
    """A sequence's logits are the same alone or left-padded in a batch, whatever the pad ids."""
    model = tiny_gpt(seed)
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(V, (n,), generator=g).tolist() for n in lengths]
    pads = [torch.randint(V, (12,), generator=g).tolist() for _ in lengths]  # garbage pad ids
    tokens, mask = left_padded(seqs, pads)                                     # (B, T)
    with torch.no_grad():
        batched = model(tokens, mask)                                          # (B, T, V)
        for i, s in enumerate(seqs):
            alone = model(torch.tensor([s]))[0]                                # (L, V)
            torch.testing.assert_close(batched[i, mask[i]], alone, atol=ATOL, rtol=0)


@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_causal_fast_path_matches_the_explicit_mask_on_right_padded_batches(seed, lengths):
    """Fast path vs reference: a right-padded batch runs SDPA with is_causal and no mask tensor
    (attention_allowed returns None); its logits at real positions equal the explicit-mask path's,
    and a left-padded batch never takes the fast path."""
    model = tiny_gpt(seed)
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.randint(V, (len(lengths), T), generator=g)                 # (B, T) garbage pads
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths], dtype=torch.bool)
    assert attention_allowed(mask) is None
    assert attention_allowed(mask, fast=False) is not None
    with torch.no_grad():
        fast = model(tokens, mask)                                             # (B, T, V)
        reference = model_module.attention_allowed
        try:
            model_module.attention_allowed = lambda m: reference(m, fast=False)
            slow = model(tokens, mask)                                         # (B, T, V)
        finally:
            model_module.attention_allowed = reference
    torch.testing.assert_close(fast[mask], slow[mask], atol=ATOL, rtol=0)
    if min(lengths) < T:  # a row with padding: left-padding it must keep the explicit mask
        assert attention_allowed(mask.flip(1)) is not None


@given(seed=st.integers(0, 2**16),
       lengths=st.lists(st.integers(1, 8), min_size=1, max_size=4),
       extra_pad=st.integers(0, 3), n_new=st.integers(1, 8), n_layer=st.integers(1, 2))
def test_kv_cache_decoding_matches_full_forward(seed, lengths, extra_pad, n_new, n_layer):
    """Prefill then one token at a time through the KV cache gives the full pass's logits at every
    real position, with ragged left-padded prompts and rows that stop (padding) mid-decode."""
    model = tiny_gpt(seed, n_layer=n_layer)
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(V, (n,), generator=g).tolist() for n in lengths]
    pads = [torch.randint(V, (20,), generator=g).tolist() for _ in lengths]
    prompt, prompt_mask = left_padded(seqs, pads)                              # (B, P)
    B = len(seqs)
    prompt = torch.cat([torch.randint(V, (B, extra_pad), generator=g), prompt], 1)
    prompt_mask = torch.cat([torch.zeros(B, extra_pad, dtype=torch.bool), prompt_mask], 1)
    P = prompt.shape[1]
    new = torch.randint(V, (B, n_new), generator=g)                            # (B, N)
    new_mask = torch.rand(B, n_new, generator=g) < 0.8  # some rows are "finished" (padding)
    tokens = torch.cat([prompt, new], 1)                                       # (B, P + N)
    mask = torch.cat([prompt_mask, new_mask], 1)                               # (B, P + N)

    with torch.no_grad():
        ref = model(tokens, mask)                                              # (B, P + N, V)
        cache = model.new_cache(B, P + n_new)
        prefill = model(prompt, prompt_mask, cache=cache)                      # (B, P, V)
        torch.testing.assert_close(prefill[prompt_mask], ref[:, :P][prompt_mask],
                                   atol=ATOL, rtol=0)
        for j in range(n_new):
            step = model(new[:, j:j + 1], new_mask[:, j:j + 1], cache=cache)[:, 0]  # (B, V)
            real = new_mask[:, j]
            torch.testing.assert_close(step[real], ref[real, P + j], atol=ATOL, rtol=0)
    assert cache.length == P + n_new


def test_kv_cache_overflow_raises():
    """Appending past the cache's preallocated length is an error, not a silent overwrite."""
    model = tiny_gpt(0)
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="KV cache"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_from_gpt_copies_the_trunk():
    """ScalarHeadModel.from_gpt starts with the LM's trunk weights (same hidden states), as a copy
    that later LM updates do not touch."""
    gpt = tiny_gpt(1)
    rm = ScalarHeadModel.from_gpt(gpt)
    for name, p in gpt.transformer.state_dict().items():
        assert torch.equal(p, rm.transformer.state_dict()[name]), name
    x = torch.randint(V, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, hidden = gpt(x, return_hidden=True)                                 # (B, T, C)
        torch.testing.assert_close(rm.transformer(x), hidden, atol=0, rtol=0)
        gpt.transformer.wte.weight.add_(1.0)
        assert not torch.equal(gpt.transformer.wte.weight, rm.transformer.wte.weight)


@given(seed=st.integers(0, 2**16), n_prompt=st.integers(1, 8), n_resp=st.integers(1, 8),
       n_pad=st.integers(1, 6))
@settings(max_examples=25)
def test_score_reads_the_last_real_token(seed, n_prompt, n_resp, n_pad):
    """A prompt+response scores the same alone, left-padded, or right-padded in a batch, and the
    score is the per-token value at its last real token."""
    torch.manual_seed(seed)
    rm = randomize(ScalarHeadModel(tiny_config()), seed)
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(V, (n_prompt + n_resp,), generator=g)                 # (L,)
    L = len(seq)
    other = torch.randint(V, (L + n_pad,), generator=g)  # a longer neighbour forces padding
    pad = torch.randint(V, (n_pad,), generator=g)
    ones = torch.ones(1, L, dtype=torch.bool)
    left = torch.stack([torch.cat([pad, seq]), other])                         # (2, L + n_pad)
    left_mask = torch.ones_like(left, dtype=torch.bool)
    left_mask[0, :n_pad] = False
    right = torch.stack([torch.cat([seq, pad]), other])                        # (2, L + n_pad)
    right_mask = torch.ones_like(right, dtype=torch.bool)
    right_mask[0, L:] = False
    with torch.no_grad():
        alone = rm.score(seq[None], ones)                                      # (1,)
        torch.testing.assert_close(alone, rm(seq[None])[:, -1], atol=0, rtol=0)
        torch.testing.assert_close(rm.score(left, left_mask)[:1], alone, atol=ATOL, rtol=0)
        torch.testing.assert_close(rm.score(right, right_mask)[:1], alone, atol=ATOL, rtol=0)
        # reading the last *column* instead would give the value at a padding token
        assert (rm(right, right_mask)[0, -1] - alone[0]).abs() > 1e-4


@pytest.mark.parametrize("make", [GPT, ScalarHeadModel])
def test_longer_than_block_size_raises(make):
    """A sequence of block_size tokens runs; one more raises ValueError naming block_size."""
    model = make(tiny_config(block_size=8)).eval()
    with torch.no_grad():
        model(torch.zeros(2, 8, dtype=torch.long))
        with pytest.raises(ValueError, match="block_size"):
            model(torch.zeros(2, 9, dtype=torch.long))


@pytest.mark.parametrize("make", [GPT, ScalarHeadModel])
def test_padding_past_block_size_changes_no_real_output(make):
    """A batch may be right-padded past block_size (pad_batch rounds lengths up to a multiple of
    8 under bf16): the real tokens' outputs equal the unpadded batch's. Real tokens past
    block_size still raise."""
    torch.manual_seed(0)
    model = make(tiny_config(block_size=8)).eval()
    tokens = torch.randint(0, V, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 6:] = False                                    # the second row has 6 real tokens
    padded = torch.cat([tokens, torch.zeros(2, 4, dtype=torch.long)], 1)                # (2, 12)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    with torch.no_grad():
        out, out_padded = model(tokens, mask), model(padded, padded_mask)
        real = mask
        torch.testing.assert_close(out_padded[:, :8][real], out[real], atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="block_size"):
            model(padded, torch.ones(2, 12, dtype=torch.bool))
