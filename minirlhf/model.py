"""A small GPT-2, written out: the policy, the reference, and (with a scalar head) the reward and
value models of the lecture's four-model RLHF loop (ch. 7).

    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128))
    logits = model(tokens)                                   # (B, T, V)
    logits, hidden = model(tokens, attn_mask, return_hidden=True)

The architecture is GPT-2's (learned position embeddings, pre-LayerNorm blocks, causal
self-attention, GELU MLP, tied input/output embeddings), so GPT-2 checkpoints can be loaded.

Batches of prompts with different lengths are *left-padded*: `attn_mask` (B, T) is 1 on real
tokens and 0 on padding; position ids count real tokens only, so a prompt gets the same positions
whether it is padded or not, and no real token attends to padding. Decoding appends to a
preallocated `KVCache` instead of re-running the prefix.

`GPTConfig(pad_vocab_multiple=64)` rounds the embedding table up to a multiple of 64 rows (GPT-2:
50257 -> 50304), which suits GPU matrix kernels; the logits are sliced back to the real V, so
sampling and log-probs do not change. `minirlhf/gpt2.py` loads OpenAI's GPT-2 weights into this
class (GELU with the tanh approximation and LayerNorm eps 1e-5 are GPT-2's).

Left out on purpose: dropout is 0 by default (RLHF needs identical log-probs on every pass), no
weight-tying options, no mixture-of-experts or rotary embeddings — GPT-2 is the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 512   # number of token ids the embedding holds
    block_size: int = 64    # longest sequence (prompt + response) the model reads
    n_layer: int = 4        # transformer blocks
    n_head: int = 4         # attention heads per block
    n_embd: int = 128       # channels C of the residual stream
    dropout: float = 0.0    # 0 keeps log-probs deterministic, which PPO's ratio relies on
    bias: bool = True       # GPT-2 uses biases in Linear and LayerNorm
    pad_vocab_multiple: int = 1  # embedding rows rounded up to a multiple of this (GPU: 64)

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding table: vocab_size rounded up to pad_vocab_multiple (50257 -> 50304
        with 64). The extra rows are never looked up, and their logits are cut off."""
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, nh, T_max, hs).

    `mask` (B, T_max) remembers which cached positions hold real tokens, and `pos` (B,) the
    position id the next token of each row gets. `length` is how many columns are filled.
    Attention reads only the first `length` columns, each written before it is read, so the
    keys and values start uninitialised and `keep` copies only the filled columns.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a LongTensor of row indices), in this order: the sampler
        drops finished rows so that later steps compute nothing for them."""
        n = self.length
        k = self.k.new_empty(self.k.shape[0], len(rows), *self.k.shape[2:])  # (L, A, nh, Tmax, hs)
        v = self.v.new_empty(k.shape)                                        # (L, A, nh, Tmax, hs)
        k[:, :, :, :n] = self.k[:, rows, :, :n]
        v[:, :, :, :n] = self.v[:, rows, :, :n]
        self.k, self.v = k, v
        self.mask, self.pos = self.mask[rows], self.pos[rows]


def decode_attention(q, k, v, allowed):
    """softmax(q·kᵀ/√hs, masked)·v for one query per row over the cache's S keys: the function
    `F.scaled_dot_product_attention` computes, written out because on a CPU its fused kernel is
    slower for hundreds of rows (sampling 256 rows × 64 tokens, 2 cores, interleaved: 0.73 s ->
    0.66 s; the same at 64 and 128 rows); with a few rows the fused kernel is faster.

    q: (B, nh, 1, hs), k and v: (B, nh, S, hs), allowed: (B, 1, 1, S) -> (B, nh, 1, hs)."""
    att = (q.contiguous() @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5            # (B, nh, 1, S)
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    return att @ v                                                                # (B, nh, 1, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x, allowed, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)                                  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)          # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)          # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)          # (B, nh, T, hs)
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k = cache.k[layer, :, :, :start + T]                                 # (B, nh, S, hs)
            v = cache.v[layer, :, :, :start + T]                                 # (B, nh, S, hs)
        # allowed: (B, 1, T, S) boolean, True where query t may attend to key s
        # allowed None: right-padded rows, plain causal attention (see attention_allowed)
        dropout = self.dropout if self.training else 0.0
        if cache is not None and T == 1 and B >= 32 and q.device.type == "cpu":  # decoding
            y = decode_attention(q.float(), k.float(), v.float(), allowed).to(q.dtype)
        elif q.dtype == torch.bfloat16 and q.device.type == "cpu":
            # bf16 autocast on CPU (minirlhf/device.py): attention itself runs in float32, whose
            # CPU kernels are ~10x faster than the bf16 ones (backward above all); the matmuls
            # around it are where bf16 pays
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                   attn_mask=allowed, is_causal=allowed is None,
                                                   dropout_p=dropout)
            y = y.to(torch.bfloat16)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                               is_causal=allowed is None, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                          # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's GELU


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, allowed, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), allowed, cache, layer)   # pre-LayerNorm residual blocks
        x = x + self.mlp(self.ln_2(x))
        return x


def attention_allowed(attn_mask: torch.Tensor, fast: bool = True) -> torch.Tensor | None:
    """(B, T) real-token mask -> (B, 1, T, T) boolean: causal AND key is real.

    Every query may also see itself, so a padding row is never fully masked (SDPA would return
    NaN there); padding outputs are ignored downstream anyway.

    Fast path (`fast`): when every row is right-padded (real tokens first, as in training
    batches), returns None and attention runs with `is_causal=True` and no mask tensor, which
    lets SDPA pick its flash kernel on a GPU. Real tokens get the same outputs — causality
    already hides the padding after them; only the ignored padding positions differ (they see
    earlier tokens instead of only themselves). tests/test_model.py checks the two agree.
    """
    B, T = attn_mask.shape
    if fast and T > 0:
        m = attn_mask.bool()
        if bool(m[:, 0].all() & ~(m[:, 1:] & ~m[:, :-1]).any()):  # no real token after padding
            return None
    causal = torch.ones(T, T, dtype=torch.bool, device=attn_mask.device).tril()  # (T, T)
    allowed = causal[None] & attn_mask.bool()[:, None, :]                          # (B, T, T)
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=attn_mask.device)[None]
    return allowed[:, None]                                                        # (B, 1, T, T)


def position_ids(attn_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only: left padding does not shift a prompt. (B, T)"""
    return (attn_mask.long().cumsum(-1) - 1).clamp(min=0)


class Trunk(nn.Module):
    """Embeddings + transformer blocks + final LayerNorm: everything but the output head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, tokens, attn_mask=None, cache: KVCache | None = None):
        """tokens (B, T) -> hidden states (B, T, C).

        Without a cache: a full causal pass. With a cache: the T new tokens are appended after the
        cache's `length` columns (prefill when the cache is empty, one token per row when decoding).
        """
        B, T = tokens.shape
        if attn_mask is None:
            attn_mask = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        attn_mask = attn_mask.bool()
        if cache is None:
            # padding past block_size is allowed (its positions repeat the last real one)
            if T > self.config.block_size and int(attn_mask.sum(-1).max()) > self.config.block_size:
                raise ValueError(f"sequence of {int(attn_mask.sum(-1).max())} tokens is longer "
                                 f"than block_size {self.config.block_size}")
            pos = position_ids(attn_mask)                                          # (B, T)
            allowed = attention_allowed(attn_mask)                # (B, 1, T, T), or None
        else:
            start = cache.length
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions, asked for {start + T}")
            pos = cache.pos[:, None] + attn_mask.long().cumsum(-1) - 1             # (B, T)
            pos = pos.clamp(min=0, max=self.config.block_size - 1)
            cache.mask[:, start:start + T] = attn_mask
            keys = cache.mask[:, :start + T]                                       # (B, S)
            S = start + T
            causal = torch.ones(T, S, dtype=torch.bool, device=tokens.device).tril(start)
            allowed = causal[None] & keys[:, None, :]                              # (B, T, S)
            allowed[:, :, start:] |= torch.eye(T, dtype=torch.bool, device=tokens.device)
            allowed = allowed[:, None]                                             # (B, 1, T, S)
        x = self.drop(self.wte(tokens) + self.wpe(pos))                            # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, allowed, cache, i)
        if cache is not None:
            cache.pos = cache.pos + attn_mask.long().sum(-1)
            cache.length += T
        return self.ln_f(x)                                                        # (B, T, C)


def _init_weights(module: nn.Module, n_layer: int):
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            # GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer)
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


class GPT(nn.Module):
    """The language model: trunk + tied LM head. logits[:, t] predict tokens[:, t + 1]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Trunk(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        _init_weights(self, config.n_layer)
        self.lm_head.weight = self.transformer.wte.weight  # tied input/output embeddings

    def forward(self, tokens, attn_mask=None, cache=None, return_hidden=False):
        hidden = self.transformer(tokens, attn_mask, cache)                        # (B, T, C)
        # the padding rows (pad_vocab_multiple) are cut off: no token beyond V is ever produced
        logits = self.lm_head(hidden)[..., :self.config.vocab_size]                # (B, T, V)
        return (logits, hidden) if return_hidden else logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)


class ScalarHeadModel(nn.Module):
    """Trunk + Linear(C, 1): the reward model (a score at the last real token, lecture ch. 6)
    and the value model (a value at every token, ch. 4 and 7)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Trunk(config)
        self.head = nn.Linear(config.n_embd, 1)
        _init_weights(self, config.n_layer)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "ScalarHeadModel":
        """Initialise the trunk from a language model; the LM head is dropped, the scalar head
        is fresh (lecture ch. 6: 'the SFT model with a linear head')."""
        model = cls(gpt.config).to(gpt.lm_head.weight.device)
        model.transformer.load_state_dict(gpt.transformer.state_dict())
        return model

    def forward(self, tokens, attn_mask=None):
        """Per-token scalars (B, T)."""
        hidden = self.transformer(tokens, attn_mask)                               # (B, T, C)
        return self.head(hidden).squeeze(-1)                                       # (B, T)

    def score(self, tokens, attn_mask):
        """One score per sequence, read at its last real token (padding on either side is
        ignored). (B, T) -> (B,)"""
        values = self(tokens, attn_mask)                                           # (B, T)
        T = tokens.shape[1]
        idx = torch.arange(T, device=tokens.device).expand_as(attn_mask)
        last = torch.where(attn_mask.bool(), idx, -1).max(dim=1).values            # (B,)
        return values.gather(1, last[:, None]).squeeze(1)                          # (B,)
