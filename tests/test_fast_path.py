"""The fast paths against the obvious ones (docs/design.md, "Conventions"): fused AdamW, bf16
autocast and torch.compile each compute what the plain float32 path computes, within their
rounding.

Tests that need a GPU skip cleanly without one; the rest run on CPU: the fused-AdamW property is
checked on CPU too (PyTorch has a fused CPU kernel), bf16 autocast on CPU (its attention in
float32) against float32, and `--precision fp32` is the plain path bit for bit. The KV-cache
sampler against the re-run-everything one is tested in test_sampler.py and test_model.py.
"""
import pytest
import torch
import torch.nn.functional as F

import minirlhf.device as device_module
from minirlhf.device import autocast, maybe_compile, native_bf16, set_precision, uses_bf16
from minirlhf.masking import token_logprobs
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel
from minirlhf.training import make_optimizer

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
CONFIG = GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(device, seed=0):
    torch.manual_seed(seed)
    return GPT(CONFIG).to(device)


def batch(device, B=4, T=24, seed=0):
    """Random tokens with ragged left padding, as the sampler and PPO feed the model."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, CONFIG.vocab_size, (B, T), generator=g)
    attn_mask = torch.ones(B, T, dtype=torch.bool)
    for i in range(B):
        attn_mask[i, :2 * i] = False                                               # left padding
    return tokens.to(device), attn_mask.to(device)


def adamw(model, fused):
    """make_optimizer's parameter groups and hyper-parameters, with `fused` chosen here."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.95), fused=fused)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_takes_the_same_steps_as_unfused(device):
    """Given the same gradients, fused AdamW moves every parameter where the for-loop AdamW
    does: after 5 steps (float32) they agree to 1e-6."""
    plain_model, fused_model = tiny_gpt(device), tiny_gpt(device)
    plain_opt = adamw(plain_model, fused=False)
    fused_opt = make_optimizer(fused_model, lr=1e-3, weight_decay=0.1)  # what scripts use
    assert fused_opt.defaults["fused"], "make_optimizer should fuse AdamW"
    tokens, attn_mask = batch(device)
    for step in range(5):
        logits = plain_model(tokens, attn_mask)                                    # (B, T, V)
        loss = -token_logprobs(logits[:, :-1], tokens[:, 1:])[attn_mask[:, 1:]].mean()
        loss.backward()
        for p, q in zip(plain_model.parameters(), fused_model.parameters()):
            q.grad = p.grad.clone()  # the same gradient for both optimizers
        plain_opt.step()
        fused_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        fused_opt.zero_grad(set_to_none=True)
    moved = max((p - q).abs().max().item() for p, q in
                zip(tiny_gpt(device).parameters(), plain_model.parameters()))
    assert moved > 1e-3, "the optimizer did not move the parameters; the test proves nothing"
    for (name, p), q in zip(plain_model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def precision():
    """set_precision for one test; the process-wide setting is restored afterwards."""
    before = device_module._precision
    yield set_precision
    set_precision(before)


def test_fp32_precision_on_cpu_is_the_plain_path(precision):
    """With --precision fp32, autocast(cpu) is float32 and maybe_compile(cpu) returns the very
    same module, so CPU runs are the plain path bit for bit."""
    precision("fp32")
    model = tiny_gpt("cpu").eval()
    tokens, attn_mask = batch("cpu")
    cpu = torch.device("cpu")
    assert maybe_compile(model, cpu, enabled=True) is model
    with torch.no_grad():
        plain = model(tokens, attn_mask)
        with autocast(cpu):
            fast = model(tokens, attn_mask)
    assert fast.dtype == torch.float32
    assert torch.equal(plain, fast)


def test_precision_setting_decides_bf16(precision):
    """auto uses bf16 exactly where the hardware multiplies it natively (CUDA, AMX or AVX512-BF16
    CPUs); fp32 never does, bf16 always does; anything else is refused."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    precision("auto")
    assert uses_bf16(cpu) == native_bf16(cpu) and uses_bf16(cuda)
    precision("fp32")
    assert not uses_bf16(cpu) and not uses_bf16(cuda)
    precision("bf16")
    assert uses_bf16(cpu) and uses_bf16(cuda)
    with pytest.raises(ValueError, match="--precision"):
        precision("fp16")


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(False, False, False), (True, False, True),
                                                      (False, True, True), (True, True, True)])
def test_native_bf16_on_cpu_follows_the_instruction_set(monkeypatch, amx, avx512_bf16, expected):
    """A CPU counts as native bf16 when it has AMX tiles or AVX512-BF16 dot products, and not
    otherwise (AVX2-only CPUs, where bf16 measured slower than float32); CUDA always does."""
    # raising=False: older torch lacks these probes (device.py then falls back to float32)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    native_bf16.cache_clear()
    try:
        assert native_bf16(torch.device("cpu")) is expected
        assert native_bf16(torch.device("cuda")) is True
    finally:
        native_bf16.cache_clear()  # the next test asks the real CPU again


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_forward_is_close_to_float32(device, precision):
    """Under bf16 autocast the policy's token log-probs and the scalar model's scores stay within
    bf16 rounding of float32 (loose tolerance: bf16 keeps 8 bits of mantissa)."""
    precision("bf16")
    device = torch.device(device)
    model = tiny_gpt(device).eval()
    scalar = ScalarHeadModel.from_gpt(model).eval()
    tokens, attn_mask = batch(device)
    real = attn_mask[:, 1:]
    with torch.no_grad():
        logp32 = token_logprobs(model(tokens, attn_mask)[:, :-1].float(), tokens[:, 1:])
        score32 = scalar.score(tokens, attn_mask)
        with autocast(device):
            logits16 = model(tokens, attn_mask)                                    # (B, T, V)
            score16 = scalar.score(tokens, attn_mask)
        logp16 = token_logprobs(logits16[:, :-1].float(), tokens[:, 1:])
    assert logits16.dtype == torch.bfloat16, "autocast did not run the model in bf16"
    torch.testing.assert_close(logp16[real], logp32[real], atol=5e-2, rtol=0)
    torch.testing.assert_close(score16.float(), score32, atol=5e-2, rtol=5e-2)


def test_bf16_autocast_gradients_point_where_float32_ones_do(precision):
    """A training step's gradients under CPU bf16 autocast agree with float32 ones: every
    parameter's gradient has cosine similarity > 0.99 and a norm within 5%."""
    precision("bf16")
    cpu = torch.device("cpu")
    tokens, attn_mask = batch(cpu, B=8, T=24)
    grads = []
    for fast in (False, True):
        model = tiny_gpt(cpu)
        with autocast(cpu) if fast else torch.autocast("cpu", enabled=False):
            logits = model(tokens, attn_mask)                                      # (B, T, V)
        loss = -token_logprobs(logits[:, :-1].float(), tokens[:, 1:])[attn_mask[:, 1:]].mean()
        loss.backward()
        grads.append({n: p.grad.flatten() for n, p in model.named_parameters()})
    for name, g32 in grads[0].items():
        g16 = grads[1][name]
        cos = F.cosine_similarity(g16, g32, dim=0).item()
        assert cos > 0.99, f"{name}: cosine {cos:.4f}"
        assert abs(g16.norm() / g32.norm() - 1) < 0.05, name


def test_cpu_bf16_attention_runs_in_float32(precision, monkeypatch):
    """On CPU the bf16 attention kernels are far slower than the float32 ones, so under bf16
    autocast the model hands attention float32 queries, keys and values (minirlhf/model.py) and
    its output continues in bf16."""
    precision("bf16")
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = tiny_gpt("cpu")
    tokens, attn_mask = batch("cpu")
    with autocast(torch.device("cpu")):
        logits = model(tokens, attn_mask)
    assert logits.dtype == torch.bfloat16
    assert seen == [(torch.float32,) * 3 + (False,)] * CONFIG.n_layer


@needs_cuda
def test_compiled_model_matches_eager_forward_and_gradients():
    """torch.compile (maybe_compile on CUDA) gives the eager model's logits and gradients in
    float32, within kernel-fusion rounding."""
    device = torch.device("cuda")
    eager = tiny_gpt(device)
    compiled_owner = tiny_gpt(device)
    compiled = maybe_compile(compiled_owner, device, enabled=True)
    assert compiled is not compiled_owner
    tokens, attn_mask = batch(device)
    losses = []
    for m in (eager, compiled):
        logits = m(tokens, attn_mask)                                              # (B, T, V)
        loss = -token_logprobs(logits[:, :-1], tokens[:, 1:])[attn_mask[:, 1:]].mean()
        loss.backward()
        losses.append(logits.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(eager.named_parameters(), compiled_owner.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name, width", [("fp32", 11), ("bf16", 16)])
def test_pad_batch_rounds_lengths_under_bf16_only(precision, name, width):
    """Under bf16 pad_batch rounds the batch length up to a multiple of 8 (fewer distinct shapes
    for oneDNN's per-shape bf16 kernels); the extra columns are padding in every mask. In
    float32 the batch is exactly as long as its longest sequence."""
    from minirlhf.training import pad_batch
    precision(name)
    seqs = [[5] * 11, [6] * 4]
    tokens, attn_mask, loss_mask = pad_batch(seqs, [2, 1], pad_id=0, device=torch.device("cpu"))
    assert tokens.shape == (2, width)
    assert attn_mask.sum(1).tolist() == [11, 4] and loss_mask.sum(1).tolist() == [9, 3]
    assert (tokens[:, 11:] == 0).all()


def tiny_ppo_rollout(**cfg_kw):
    """A one-layer world GPT's PPO rollout (2 responses per prompt, verifier reward) and its
    advantages: (policy, value model, dist, cfg, rollout, advantages, returns, value mask)."""
    import copy

    import train_ppo
    from minirlhf.distributed import Dist
    from minirlhf.graders import make_reward
    from minirlhf.world import World, world_tokenizer
    tok = world_tokenizer(512)
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2,
                           n_embd=32))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    value = ScalarHeadModel.from_gpt(policy)
    dist = Dist(0, 1, torch.device("cpu"))
    cfg = train_ppo.PPOConfig(samples_per_prompt=2, max_new_tokens=16, reward="verifier",
                              **cfg_kw)
    prompts = [p.text for p in World(0).train_prompts]
    ro = train_ppo.rollout(policy, policy, ref, make_reward("verifier"), value, tok, prompts,
                           cfg, 0, dist)
    return (policy, value, dist, cfg, ro) + train_ppo.compute_advantages(ro, 0.2, cfg, dist)


@pytest.mark.parametrize("ent_coef", [0.0, 0.01])
def test_ppo_update_without_the_entropy_in_the_graph_takes_the_same_steps(ent_coef):
    """With c2 = 0 the update keeps the entropy out of the autograd graph (a statistic only): the
    same weights, value model and statistics as the reference path that backpropagates through
    it, bit for bit; with c2 ≠ 0 it stays in the graph, and the bonus moves the weights."""
    import copy

    import train_ppo
    policy, value, dist, cfg, ro, advantages, returns, value_mask = tiny_ppo_rollout(
        prompts_per_iter=4, minibatch_size=4, ent_coef=ent_coef)

    def update(entropy_grad):
        p, v = copy.deepcopy(policy), copy.deepcopy(value)
        stats = train_ppo.ppo_update(p, v, make_optimizer(p, 1e-3, 0.0),
                                     make_optimizer(v, 1e-3, 0.0), ro, advantages, returns,
                                     value_mask, 0.2, cfg, 0, dist, entropy_grad=entropy_grad)
        return p.state_dict(), v.state_dict(), stats
    fast, reference = update(None), update(True)
    same = all(torch.equal(a[k], b[k]) for a, b in zip(fast[:2], reference[:2]) for k in a)
    assert fast[2] == reference[2]
    if ent_coef == 0:
        assert same
    else:  # the default keeps the bonus's gradient: leaving it out gives other weights
        assert same and not all(torch.equal(a, b) for a, b in zip(
            update(False)[0].values(), fast[0].values()))


def tiny_rollouts(temperature=1.0):
    """A PPO rollout of a tiny world GPT, with log π_θold from the sampler and from the fresh
    forward (the reference path), from the same seed."""
    import copy

    import train_ppo
    from minirlhf.distributed import Dist
    from minirlhf.graders import make_reward
    from minirlhf.world import World, world_tokenizer
    tok = world_tokenizer(512)
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2,
                           n_embd=32))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    cfg = train_ppo.PPOConfig(prompts_per_iter=8, samples_per_prompt=2, max_new_tokens=16,
                              reward="verifier", temperature=temperature)
    prompts = [p.text for p in World(0).train_prompts]
    value = ScalarHeadModel.from_gpt(policy)
    return [train_ppo.rollout(policy, policy, ref, make_reward("verifier"), value, tok, prompts,
                              cfg, 0, Dist(0, 1, torch.device("cpu")), from_sampler)
            for from_sampler in (True, False)]


def test_in_float32_old_logprobs_come_from_the_sampler_and_match_a_fresh_forward(precision):
    """In a float32 run the rollout takes log π_θold from the sampling pass instead of running
    the policy again; on the response tokens it agrees with the fresh forward (the reference
    path) to 1e-5, and everything else in the rollout is identical."""
    precision("fp32")
    fast, reference = tiny_rollouts()
    assert torch.equal(fast.gen.tokens, reference.gen.tokens)
    diff = (fast.old_logp - reference.old_logp)[fast.mask].abs()
    assert 0 < diff.max() <= 1e-5  # not the same tensor: the sampler's own numbers
    for name in ("ref_logp", "old_values", "proxy", "score"):
        assert torch.equal(getattr(fast, name), getattr(reference, name)), name


@pytest.mark.parametrize("name, temperature", [("bf16", 1.0), ("fp32", 0.7)])
def test_under_bf16_or_another_temperature_old_logprobs_come_from_a_fresh_forward(
        precision, name, temperature):
    """Under bf16 autocast the float32 sampler's log-probs are not what the bf16 forward
    computes, and at temperature ≠ 1 they are of π/T: there the rollout runs the forward, exactly
    as the reference path does."""
    precision(name)
    fast, reference = tiny_rollouts(temperature)
    assert torch.equal(fast.old_logp, reference.old_logp)


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_live_columns_cover_every_real_token(precision, name):
    """`live_columns` keeps every column holding a real token and drops only columns that are
    padding in every row; under bf16 its width is a multiple of 8 (or the whole batch)."""
    from minirlhf.training import live_columns
    precision(name)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        B, T = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 6), (2, 40)))
        starts = torch.randint(0, T, (B,), generator=g)
        stops = starts + 1 + (torch.rand(B, generator=g) * (T - starts)).long()
        cols = torch.arange(T)
        attn_mask = (cols >= starts[:, None]) & (cols < stops[:, None])           # (B, T)
        span = live_columns(attn_mask, "cpu")
        kept = torch.zeros(T, dtype=torch.bool)
        kept[span] = True
        assert not attn_mask[:, ~kept].any()
        width = span.stop - span.start
        assert (width % 8 == 0 or width == T) if name == "bf16" else (
            attn_mask[:, span.start].any() and attn_mask[:, span.stop - 1].any())


def test_ppo_update_on_the_live_columns_takes_the_reference_steps(precision, monkeypatch):
    """Each minibatch runs forward on its own span of real tokens (`live_columns`); the reference
    path runs the rollout's full width. Both give the same weights to 1e-5 and the same
    statistics, and some minibatch really was narrower than the rollout."""
    import copy

    import train_ppo
    from minirlhf.training import live_columns
    precision("fp32")
    policy, value, dist, cfg, ro, advantages, returns, value_mask = tiny_ppo_rollout(
        prompts_per_iter=8, minibatch_size=2)
    widths = []

    def update(columns):
        monkeypatch.setattr(train_ppo, "live_columns", columns)
        p, v = copy.deepcopy(policy), copy.deepcopy(value)
        stats = train_ppo.ppo_update(p, v, make_optimizer(p, 1e-3, 0.0),
                                     make_optimizer(v, 1e-3, 0.0), ro, advantages, returns,
                                     value_mask, 0.2, cfg, 0, dist)
        return {**p.state_dict(), **{"v." + k: t for k, t in v.state_dict().items()}}, stats

    def live(attn_mask, device):
        widths.append(live_columns(attn_mask, device))
        return widths[-1]
    fast, fast_stats = update(live)
    reference, reference_stats = update(lambda attn_mask, device: slice(0, attn_mask.shape[1]))
    assert min(s.stop - s.start for s in widths) < ro.gen.tokens.shape[1]
    for k in fast:
        torch.testing.assert_close(fast[k], reference[k], atol=1e-5, rtol=0)
    assert fast_stats.keys() == reference_stats.keys()
    for k in fast_stats:
        assert fast_stats[k] == pytest.approx(reference_stats[k], abs=1e-5, nan_ok=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_by_length_gives_the_whole_batch_values_on_real_tokens(precision, seed):
    """`by_length` runs a forward on groups of rows of similar length, each over its own
    columns: on every real target its per-token values (log-probs, V(s_t)) and its per-row
    scores (r_φ at the last token) are those of one pass over the whole padded batch."""
    import train_ppo
    from minirlhf.sampler import generate
    from minirlhf.training import by_length
    precision("fp32")
    torch.manual_seed(seed)
    policy = GPT(GPTConfig(vocab_size=40, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()
    scalar = ScalarHeadModel.from_gpt(policy).eval()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 40, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 9, (13,), generator=g)]
    gen = generate(policy, prompts, 30, eos_id=3, pad_id=0, generator=g)  # rows end at 3
    lengths = gen.attn_mask.sum(1)
    assert lengths.max() > lengths.min() + 4, "rows of one length: nothing to group"
    mask = gen.attn_mask[:, 1:] & gen.attn_mask[:, :-1]  # real targets read from real tokens
    cpu = torch.device("cpu")
    with torch.no_grad():
        for fn in (lambda x, m: train_ppo.per_token_logprobs(policy, x, m, cpu),
                   lambda x, m: train_ppo.state_values(scalar, x, m, cpu)):
            grouped, whole = by_length(fn, gen.tokens, gen.attn_mask, cpu), fn(gen.tokens,
                                                                            gen.attn_mask)
            torch.testing.assert_close(grouped[mask], whole[mask], atol=1e-5, rtol=0)
        torch.testing.assert_close(by_length(scalar.score, gen.tokens, gen.attn_mask, cpu),
                                   scalar.score(gen.tokens, gen.attn_mask), atol=1e-5, rtol=0)
