"""Properties of minirlhf/sampler.py: the KV-cache path against the re-run-everything path, batching
against one prompt at a time, seeding, greedy/top-k/top-p/temperature, log-probs against a fresh
forward pass, and the end-token bookkeeping PPO relies on.

Equivalence tests use a handful of fixed seeds rather than hypothesis: greedy decoding compares
argmaxes, and a near-tie (two logits within float error) would make a random search flaky. The
top-p rule, a pure function of a distribution, is checked with hypothesis.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minirlhf.model import GPT, GPTConfig
from minirlhf.sampler import categorical, filter_logits, generate

V = 48
PAD = 0
NEVER = -1  # an end id no sampler can produce: every row runs to max_new_tokens
SEEDS = [0, 1, 2, 3]


def tiny_gpt(seed):
    """A 2-layer GPT with weights redrawn at std 0.35, so next-token distributions are spread out
    (GPT-2's 0.02 init gives near-uniform ones) and argmax near-ties are rare."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, block_size=40, n_layer=2, n_head=2, n_embd=32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.35)
    return model.eval()


def ragged_prompts(seed, n=4, max_len=9):
    g = torch.Generator().manual_seed(1000 + seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(1, V, (k,), generator=g).tolist() for k in lengths]


def run(model, prompts, n=12, seed=0, eos_id=NEVER, **kw):
    return generate(model, prompts, n, eos_id=eos_id, pad_id=PAD,
                    generator=torch.Generator().manual_seed(seed), **kw)


def fresh_logits(model, gen):
    """The full forward pass over the finished sequences: logits[:, t] predict tokens[:, t + 1]."""
    with torch.no_grad():
        return model(gen.tokens, gen.attn_mask)                                 # (B, T, V)


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_with_and_without_cache_is_identical(seed):
    """Greedy decoding through the KV cache produces exactly the reference path's tokens."""
    model, prompts = tiny_gpt(seed), ragged_prompts(seed)
    fast = run(model, prompts, temperature=0, use_cache=True)
    slow = run(model, prompts, temperature=0, use_cache=False)
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.response_mask, slow.response_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_equals_a_plain_argmax_loop(seed):
    """temperature=0 picks the argmax of a fresh forward pass over the sequence so far."""
    model, prompt = tiny_gpt(seed), ragged_prompts(seed, n=1)[0]
    gen = run(model, [prompt], temperature=0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert gen.responses()[0] == seq[len(prompt):]


@pytest.mark.parametrize("seed", SEEDS)
def test_batch_of_ragged_prompts_equals_each_prompt_alone(seed):
    """Left-padding a batch changes nothing: each row's greedy response and log-probs are those
    of its prompt generated alone."""
    model, prompts = tiny_gpt(seed), ragged_prompts(seed)
    batch = run(model, prompts, temperature=0)
    P = batch.prompt_len
    for i, prompt in enumerate(prompts):
        alone = run(model, [prompt], temperature=0)
        assert batch.responses()[i] == alone.responses()[0]
        torch.testing.assert_close(batch.logprobs[i, P:], alone.logprobs[0, len(prompt):],
                                   atol=1e-5, rtol=0)


def test_same_seed_same_sample_different_seed_different_sample():
    """Sampling is a function of the generator's seed: equal seeds repeat it, others do not."""
    model, prompts = tiny_gpt(0), ragged_prompts(0)
    a, b = run(model, prompts, seed=7), run(model, prompts, seed=7)
    c = run(model, prompts, seed=8)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)  # 4 rows x 12 tokens: a collision is ~impossible


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kw", [dict(), dict(top_k=5), dict(top_p=0.8), dict(temperature=0.7)])
def test_sampling_with_and_without_cache_draws_the_same_tokens(seed, kw):
    """With the same generator seed, the cached and the reference path sample the same tokens."""
    model, prompts = tiny_gpt(seed), ragged_prompts(seed)
    fast = run(model, prompts, seed=seed, use_cache=True, **kw)
    slow = run(model, prompts, seed=seed, use_cache=False, **kw)
    assert torch.equal(fast.tokens, slow.tokens)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kw", [dict(), dict(top_k=5), dict(temperature=0.7)])
def test_dropping_finished_rows_changes_no_token(seed, kw):
    """The cached path stops computing rows that have ended (it drops them from the KV cache);
    with an end token most rows hit early, it still draws exactly the reference path's tokens and
    log-probs, and the model really was run on fewer rows after the first ones ended."""
    model, prompts = tiny_gpt(seed), ragged_prompts(seed, n=12)
    N = 16
    free = run(model, prompts, n=N, seed=seed, **kw)
    P = free.prompt_len
    def first_steps(tok):  # the step at which each row first samples tok (N if never)
        hit = free.tokens[:, P:] == tok
        return torch.where(hit.any(1), hit.float().argmax(1), N)
    # the end token: a token many rows sample after step 0, at different steps
    eos = max(range(1, V), key=lambda tok: len(set(first_steps(tok).tolist()) - {0, N}))
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    fast = run(model, prompts, n=N, seed=seed, eos_id=eos, use_cache=True, **kw)
    hook.remove()
    slow = run(model, prompts, n=N, seed=seed, eos_id=eos, use_cache=False, **kw)
    assert 0 < int(fast.ended.sum())
    assert torch.equal(fast.tokens, slow.tokens)
    assert torch.equal(fast.response_mask, slow.response_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
    assert batch_sizes[0] == len(prompts) and min(batch_sizes) < len(prompts)


@pytest.mark.parametrize("seed", SEEDS)
def test_cache_columns_not_yet_written_are_never_read(seed, monkeypatch):
    """The KV cache starts uninitialised and `keep` copies only the filled columns: with every
    uninitialised key and value set to NaN (fresh caches, and the new tensors `keep` copies
    into), the cached path still draws the reference path's tokens with finite log-probs."""
    from minirlhf.model import KVCache
    model, prompts = tiny_gpt(seed), ragged_prompts(seed, n=12)
    free = run(model, prompts, n=16, seed=seed)
    eos = int(free.tokens[:, free.prompt_len + 2:].flatten().mode().values)  # a common token
    def size(shape):  # empty(2, 3) and empty((2, 3)) alike
        return shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    drops, keep = [], KVCache.keep
    monkeypatch.setattr(torch, "empty",
                        lambda *shape, **kw: torch.full(size(shape), float("nan"), **kw))
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *shape, **kw: self.new_full(size(shape), float("nan"), **kw))
    monkeypatch.setattr(KVCache, "keep", lambda self, rows: (drops.append(1), keep(self, rows)))
    fast = run(model, prompts, n=16, seed=seed, eos_id=eos, use_cache=True)
    monkeypatch.undo()
    slow = run(model, prompts, n=16, seed=seed, eos_id=eos, use_cache=False)
    assert drops, "no row was dropped from the cache: the test did not exercise keep"
    assert torch.isfinite(fast.logprobs).all()
    assert torch.equal(fast.tokens, slow.tokens)


@pytest.mark.parametrize("seed", SEEDS)
def test_tiny_temperature_and_top_k_1_equal_greedy(seed):
    """As temperature -> 0 sampling becomes argmax; top_k=1 at temperature 1 is argmax too, and
    reports the untempered greedy log-probs."""
    model, prompts = tiny_gpt(seed), ragged_prompts(seed)
    greedy = run(model, prompts, temperature=0)
    cold = run(model, prompts, temperature=1e-4, seed=seed)
    top1 = run(model, prompts, temperature=1.0, top_k=1, seed=seed)
    assert torch.equal(cold.tokens, greedy.tokens)
    assert torch.equal(top1.tokens, greedy.tokens)
    torch.testing.assert_close(top1.logprobs, greedy.logprobs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_samples_only_among_the_k_most_likely(seed):
    """Every token sampled with top_k=3 is among the 3 largest logits of a fresh forward pass."""
    model, prompts = tiny_gpt(seed), ragged_prompts(seed)
    gen = run(model, prompts, n=20, seed=seed, top_k=3)
    top3 = fresh_logits(model, gen)[:, :-1].topk(3, dim=-1).indices           # (B, T-1, 3)
    chosen = gen.tokens[:, 1:, None]                                           # (B, T-1, 1)
    inside = (top3 == chosen).any(-1)                                          # (B, T-1)
    assert inside[gen.response_mask[:, 1:]].all()


@given(data=st.data(), V_=st.integers(1, 30), B=st.integers(1, 3), p=st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(data, V_, B, p):
    """For every row, the kept tokens are the most likely ones, their mass reaches p, and dropping
    the least likely kept token falls below p (so no smaller top set would do)."""
    rows = data.draw(st.lists(st.lists(st.floats(-8, 8), min_size=V_, max_size=V_),
                              min_size=B, max_size=B), label="logits")
    logits = torch.tensor(rows)                                                # (B, V)
    out = filter_logits(logits, top_p=p)                                       # (B, V)
    for row, filtered in zip(logits, out):
        kept = torch.isfinite(filtered)
        probs = row.double().softmax(-1)
        assert kept.any()
        assert torch.equal(filtered[kept], row[kept])  # kept logits are untouched
        mass, least = probs[kept].sum(), probs[kept].min()
        assert mass >= p - 1e-5
        assert mass - least < p + 1e-5
        if (~kept).any():
            assert least >= probs[~kept].max()


@given(logits=st.lists(st.floats(-6, 6), min_size=2, max_size=12), n_zero=st.integers(0, 6),
       seed=st.integers(0, 2**31 - 1))
def test_categorical_draws_follow_the_probabilities(logits, n_zero, seed):
    """The inverse-CDF draw reproduces its distribution: over 40,000 draws every token's frequency
    is within 5 standard errors of its probability, as torch.multinomial's is on the same row,
    and a token of probability 0 (top-k / top-p filtered, here the first n_zero tokens, at least
    one kept) is never drawn."""
    probs = torch.tensor(logits, dtype=torch.float32).softmax(-1)              # (V,)
    n_zero = min(n_zero, len(logits) - 1)
    probs[:n_zero] = 0.0
    probs = probs / probs.sum()
    N = 40_000
    g = torch.Generator().manual_seed(seed)
    ours = categorical(probs.expand(N, -1).contiguous(), g)                      # (N,)
    ref = torch.multinomial(probs, N, replacement=True, generator=g)            # (N,)
    se = (probs * (1 - probs) / N).sqrt()
    for draws in (ours, ref):
        freq = torch.bincount(draws, minlength=len(probs)).float() / N
        # 5 standard errors, plus 3 draws for tokens so rare that one draw already exceeds that
        assert (freq - probs).abs().le(5 * se + 3 / N).all(), (freq, probs)
    assert not ours[:, None].eq(torch.arange(n_zero)).any(), "drew a token of probability 0"


def test_categorical_edges_of_the_uniform_draw(monkeypatch):
    """u = 0 picks the first token with mass; u just below 1 the last token with mass (never a
    zero-probability token after it, even when the running sum rounds short of 1); exactly one
    uniform number is drawn per row; and a row of NaN, inf or zeros is refused, not sampled."""
    probs = torch.tensor([[0.0, 0.3, 0.7, 0.0]] * 2)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    categorical(probs, g1)
    torch.rand(2, 1, generator=g2)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
    real_rand = torch.rand
    for u, expect in ((0.0, 1), (1.0 - 2**-24, 2)):
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **kw: real_rand(*a, **kw) * 0 + u)
        assert categorical(probs).tolist() == [expect, expect]
        assert categorical(probs * 0.999999).tolist() == [expect, expect]  # sum short of 1
    monkeypatch.undo()
    for bad in (float("nan"), float("inf"), 0.0):  # NaN logits, overflow, a row with no mass
        rows = probs.clone()
        rows[1] = bad
        with pytest.raises(ValueError, match="NaN or inf, or a row has no mass"):
            categorical(rows)


@given(rows=st.lists(st.lists(st.floats(-8, 8), min_size=6, max_size=6, unique=True),
                     min_size=1, max_size=3), k=st.integers(1, 8))
def test_top_k_keeps_exactly_the_k_largest(rows, k):
    """With distinct logits, top-k keeps min(k, V) tokens: the largest ones, unchanged."""
    logits = torch.tensor(rows, dtype=torch.float64)                           # (B, V)
    out = filter_logits(logits, top_k=k)
    for row, filtered in zip(logits, out):
        kept = torch.isfinite(filtered)
        assert int(kept.sum()) == min(k, len(row))
        top = row.topk(min(k, len(row))).indices
        assert set(kept.nonzero().flatten().tolist()) == set(top.tolist())


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("use_cache", [True, False])
def test_logprobs_equal_log_softmax_of_a_fresh_forward_pass(temperature, use_cache):
    """gen.logprobs are log softmax(logits / T) at the sampled tokens, recomputed from scratch, on
    every generated position, and 0 everywhere else; top-k filtering does not change them."""
    model, prompts = tiny_gpt(5), ragged_prompts(5)
    for kw in (dict(), dict(top_k=4)):
        gen = run(model, prompts, n=16, seed=5, temperature=temperature, use_cache=use_cache, **kw)
        logp_all = (fresh_logits(model, gen)[:, :-1] / temperature).log_softmax(-1)  # (B, T-1, V)
        logp = logp_all.gather(-1, gen.tokens[:, 1:, None]).squeeze(-1)            # (B, T-1)
        resp = gen.response_mask[:, 1:]
        torch.testing.assert_close(gen.logprobs[:, 1:][resp], logp[resp], atol=1e-5, rtol=0)
        assert (gen.logprobs[~gen.response_mask] == 0).all()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("seed", [0, 1])  # seed 0: one of 4 rows never ends; seed 1: all end
def test_nothing_is_generated_after_the_end_token(use_cache, batch, seed):
    """A row stops at its first end token: response_mask is 1 exactly from the prompt up to and
    including it, later columns are padding with log-prob 0, `ended` says which rows stopped,
    responses() drops the end token, and the tokens before it are unchanged by stopping."""
    model, prompts = tiny_gpt(seed), ragged_prompts(seed, n=batch)
    N = 12
    free = run(model, prompts, n=N, seed=seed, use_cache=use_cache)    # never stops
    P = free.prompt_len
    eos = int(free.tokens[0, P + 4])  # a token row 0 does sample: it ends by step 4
    gen = run(model, prompts, n=N, seed=seed, eos_id=eos, use_cache=use_cache)

    assert bool(gen.ended[0])
    stops = []
    for i in range(batch):
        sampled = free.tokens[i, P:].tolist()                          # N tokens
        k = sampled.index(eos) if eos in sampled else None
        n_kept = N if k is None else k + 1
        stops.append(n_kept)
        width = gen.tokens.shape[1]
        expect_mask = torch.zeros(width, dtype=torch.bool)
        expect_mask[P:P + n_kept] = True
        assert torch.equal(gen.response_mask[i], expect_mask)
        assert gen.tokens[i, P:P + n_kept].tolist() == sampled[:n_kept]
        assert (gen.tokens[i, P + n_kept:] == PAD).all()
        assert (gen.logprobs[i, P + n_kept:] == 0).all()
        torch.testing.assert_close(gen.logprobs[i, P:P + n_kept],
                                   free.logprobs[i, P:P + n_kept], atol=1e-6, rtol=0)
        assert bool(gen.ended[i]) == (k is not None)
        assert gen.responses()[i] == (sampled[:k] if k is not None else sampled)
        assert eos not in gen.responses()[i]
    # columns no row reached are dropped
    assert gen.tokens.shape[1] == P + max(stops)


def test_zero_new_tokens_returns_the_prompts():
    """max_new_tokens=0 returns the padded prompts and empty responses."""
    model, prompts = tiny_gpt(0), ragged_prompts(0)
    gen = run(model, prompts, n=0)
    assert gen.tokens.shape[1] == gen.prompt_len == max(len(p) for p in prompts)
    assert gen.responses() == [[] for _ in prompts]
    assert not gen.response_mask.any()


def test_prompt_plus_new_tokens_beyond_block_size_raises():
    """Asking for more tokens than the model's context holds is a ValueError, up front."""
    model = tiny_gpt(0)
    with pytest.raises(ValueError, match="block_size"):
        run(model, [[1] * 30], n=11)  # 30 + 11 > 40


@given(rows=st.integers(1, 40), keys=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_decode_attention_equals_fused_attention(rows, keys, seed):
    """The written-out attention of a decoding step (one query per row, minirlhf/model.py) is the
    function F.scaled_dot_product_attention computes, with any keys masked out (the newest key,
    the row's own token, is always allowed, as in the cache)."""
    import torch.nn.functional as F
    from minirlhf.model import decode_attention
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, 2, 1, 8, generator=g) * 3
    k, v = (torch.randn(rows, 2, keys, 8, generator=g) * 3 for _ in range(2))
    allowed = torch.rand(rows, 1, 1, keys, generator=g) < 0.6
    allowed[..., -1] = True
    torch.testing.assert_close(decode_attention(q, k, v, allowed),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_many_rows_with_and_without_cache_draw_the_same_tokens(seed):
    """From 32 rows on a decoding step takes the written-out attention: with 40 ragged prompts
    and an end token, the cached path still draws the reference path's tokens and log-probs."""
    model, prompts = tiny_gpt(seed), ragged_prompts(seed, n=40)
    eos = int(run(model, prompts, n=16, seed=seed).tokens[:, -8:].flatten().mode().values)
    fast = run(model, prompts, n=16, seed=seed, eos_id=eos, use_cache=True)
    slow = run(model, prompts, n=16, seed=seed, eos_id=eos, use_cache=False)
    assert torch.equal(fast.tokens, slow.tokens)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)
