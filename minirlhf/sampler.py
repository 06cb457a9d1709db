"""Generation: batched prompts of different lengths -> sampled responses, their mask and log-probs.

    gen = generate(model, [tok.render_prompt(p) for p in prompts], max_new_tokens=32,
                   eos_id=tok.end_id, pad_id=tok.pad_id, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    gen.tokens          # (B, P + N)  left-padded prompts, then responses (right-padded)
    gen.response_mask   # (B, P + N)  1 on generated tokens up to and including the end token
    gen.logprobs        # (B, P + N)  log π(token) of each generated token, 0 elsewhere

Layout: every prompt is left-padded to the same width P, so every response starts at column P
and the (B, N) response block can be sliced out directly. This is the layout PPO trains on.

Two paths with one sampling rule: `use_cache=True` runs the prompt once (prefill) and then one
token per step against a KV cache; `use_cache=False` re-runs the whole sequence every step. The
slow one is the reference the fast one is tested against (tests/test_sampler.py).

Log-probs are those of the distribution softmax(logits / temperature) *before* top-k / top-p
filtering: at temperature 1 with no filtering — how PPO samples — they are exactly the policy's
log π(a|s). Left out: beam search, repetition penalties, speculative decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    tokens: torch.Tensor          # (B, P + N) long
    attn_mask: torch.Tensor       # (B, P + N) bool, real tokens (prompt and response)
    response_mask: torch.Tensor   # (B, P + N) bool, generated tokens up to and incl. the end
    logprobs: torch.Tensor        # (B, P + N) float, log-prob of each generated token
    prompt_len: int               # P: the column where responses start
    ended: torch.Tensor           # (B,) bool, whether the row produced the end token

    def responses(self) -> list[list[int]]:
        """Generated ids per row, without the end token and padding."""
        out = []
        for row, mask, ended in zip(self.tokens, self.response_mask, self.ended):
            ids = row[mask].tolist()
            out.append(ids[:-1] if ended else ids)
        return out


def left_pad(prompts: list[list[int]], pad_id: int, device=None):
    """list of token lists -> tokens (B, P) and attn_mask (B, P), padding on the left."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("empty prompt: every prompt needs at least one token")
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = True
    return tokens.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None):
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. (B, V) -> (B, V)

    top-p keeps the smallest set of most likely tokens whose probability mass reaches p.
    """
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)               # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p      # already reached p without this token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from probs (B, V) -> (B,), by inverting the cumulative distribution:
    the first token whose running mass exceeds u·total, u ~ U[0, 1). A token of probability 0
    adds no mass, so it is never the first to exceed; each row uses one uniform number.

    The same distribution as `torch.multinomial(probs, 1)` (tests/test_sampler.py checks both
    against the probabilities), ~30x faster on CPU for the sampler's (512, 517) batches:
    multinomial took 30% of the time of writing preference pairs. A row with NaN, inf or no
    mass (logits that went NaN) is refused, as multinomial refuses it."""
    cdf = probs.cumsum(-1)                                                         # (B, V)
    total = cdf[:, -1:]                                                            # (B, 1)
    if not bool(((total > 0) & torch.isfinite(total)).all()):
        raise ValueError("sampling probabilities contain NaN or inf, or a row has no mass")
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device,
                   dtype=cdf.dtype) * total                                        # (B, 1)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)                      # (B,)


def _pick(logits, temperature, top_k, top_p, generator):
    """One sampling step. logits (B, V) -> next token (B,), its log-prob (B,)."""
    if temperature == 0:
        nxt = logits.argmax(-1)                                                    # (B,)
        logp = logits.log_softmax(-1).gather(-1, nxt[:, None]).squeeze(-1)
        return nxt, logp
    scaled = logits / temperature
    logp_all = scaled.log_softmax(-1)                                              # (B, V)
    probs = filter_logits(scaled, top_k, top_p).softmax(-1)                        # (B, V)
    nxt = categorical(probs, generator)                                            # (B,)
    return nxt, logp_all.gather(-1, nxt[:, None]).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             drop_finished: bool = True) -> Generation:
    """Sample up to `max_new_tokens` per prompt; a row stops at its first `eos_id`.

    `temperature=0` is greedy decoding. The generator (on the model's device) makes sampling
    reproducible. Finished rows keep receiving `pad_id`, masked out of attention and outputs;
    the cached path also stops running the model on them (it drops them from the cache once a
    quarter of its rows have ended: 2.3x faster on two cores for 512 built-in-world responses
    whose longest is ~4x the mean), without changing a sampled token. `drop_finished=False`
    keeps running them (benchmarks/sampler.py --policy times both).
    """
    device = next(model.parameters()).device
    prompt_tokens, prompt_mask = left_pad(prompts, pad_id, device)                 # (B, P)
    B, P = prompt_tokens.shape
    if P + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's block_size {model.config.block_size}")
    tokens = torch.full((B, P + max_new_tokens), pad_id, dtype=torch.long, device=device)
    attn_mask = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
    logprobs = torch.zeros(B, P + max_new_tokens, device=device)
    tokens[:, :P], attn_mask[:, :P] = prompt_tokens, prompt_mask
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)

    cache = model.new_cache(B, P + max_new_tokens) if use_cache else None
    rows = torch.arange(B, device=device)  # the rows the cache holds (finished ones get dropped)
    t = P - 1  # max_new_tokens=0: no step runs, the result is the prompts alone
    for t in range(P, P + max_new_tokens):
        if cache is None:
            logits = model(tokens[:, :t], attn_mask[:, :t])[:, -1]                 # (B, V)
        elif t == P:
            logits = model(tokens[:, :P], attn_mask[:, :P], cache=cache)[:, -1]   # prefill
        else:
            going = ~done[rows]                          # (A,) which cached rows go on
            if drop_finished and 4 * int((~going).sum()) >= len(rows):
                rows = rows[going]  # a quarter of the cached rows ended: drop them (a quarter
                cache.keep(going.nonzero().squeeze(1))  # at a time, so copying stays cheap)
            out = model(tokens[rows, t - 1:t], attn_mask[rows, t - 1:t], cache=cache)[:, -1]
            # finished rows get uniform dummy logits: every row still draws from the generator
            # as before, so dropping rows changes no sample (the reference path drops nothing)
            logits = out.new_zeros(B, out.shape[-1]).index_copy_(0, rows, out)    # (B, V)
        nxt, logp = _pick(logits.float(), temperature, top_k, top_p, generator)
        live = ~done
        tokens[:, t] = torch.where(live, nxt, pad_id)
        attn_mask[:, t] = live
        logprobs[:, t] = torch.where(live, logp, 0.0)
        ended |= live & (nxt == eos_id)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    width = t + 1  # drop the columns no row reached
    tokens, attn_mask, logprobs = tokens[:, :width], attn_mask[:, :width], logprobs[:, :width]
    response_mask = attn_mask.clone()
    response_mask[:, :P] = False
    return Generation(tokens, attn_mask, response_mask, logprobs, P, ended)
