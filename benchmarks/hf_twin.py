"""Hugging Face twins of our models and tokenizer, for benchmarks that compare against
`transformers` / `trl` on the *same* weights and the *same* token ids.

    from hf_twin import hf_available, hf_lm, hf_scalar, hf_tokenizer
    lm = hf_lm(gpt)                 # GPT2LMHeadModel holding gpt's weights
    rm = hf_scalar(reward_model)    # GPT2ForSequenceClassification (num_labels=1), same trunk
    hf_tok = hf_tokenizer(tok)      # PreTrainedTokenizerFast with our BPE ranks and specials

Our GPT uses GPT-2's parameter names, so the copy is name for name, except that GPT-2's
`Conv1D` stores weights as (in, out) where our `nn.Linear` stores (out, in): those four matrices
per block are transposed. Both use the tanh GELU ("gelu_new" in transformers) and LayerNorm
eps 1e-5, so the twins compute the same function up to float rounding (`max_logit_diff` checks).
One difference: our scalar head has a bias, GPT-2's classification head has none; the bias is
dropped (a constant shift of every score, which changes no speed and no ranking).

Neither `transformers` nor `trl` is a project dependency: `hf_available()` says whether they
can be imported, and the benchmarks report what they skipped when not.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile

import torch

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_available(*names: str) -> list[str]:
    """The packages among `names` that cannot be imported (empty list: all present)."""
    def missing(name):
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # e.g. sys.modules[name] = None
            return True
    return [n for n in names if missing(n)]


def offline():
    """Never touch the Hugging Face Hub: every twin is built here, nothing is downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def gpt2_config(config, pad_id: int | None = None, eos_id: int | None = None, **extra):
    """A GPT2Config of our GPTConfig's shape, dropout off like ours."""
    from transformers import GPT2Config
    rows = getattr(config, "padded_vocab_size", config.vocab_size)  # pad_vocab_multiple rows too
    return GPT2Config(vocab_size=rows, n_positions=config.block_size,
                      n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                      activation_function="gelu_new", layer_norm_epsilon=1e-5,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                      pad_token_id=pad_id, bos_token_id=eos_id, eos_token_id=eos_id, **extra)


@torch.no_grad()
def _copy_trunk(ours_trunk, hf_trunk):
    """Copy our Trunk's tensors into a GPT2Model, name for name; every HF tensor must be hit."""
    hf_params = dict(hf_trunk.named_parameters())
    copied = set()
    for name, p in ours_trunk.named_parameters():
        target = hf_params[name]
        src = p.t() if name.endswith(TRANSPOSED) else p   # nn.Linear (out, in) -> Conv1D (in, out)
        if target.shape != src.shape:
            raise ValueError(f"{name}: ours {tuple(src.shape)}, transformers "
                             f"{tuple(target.shape)}")
        target.copy_(src)
        copied.add(name)
    missing = set(hf_params) - copied
    if missing:
        raise ValueError(f"transformers parameters not copied: {sorted(missing)}")


def hf_lm(gpt, pad_id: int | None = None, eos_id: int | None = None):
    """A GPT2LMHeadModel with the weights of our GPT (tied embeddings on both sides)."""
    from transformers import GPT2LMHeadModel
    p = gpt.lm_head.weight
    model = GPT2LMHeadModel(gpt2_config(gpt.config, pad_id, eos_id)).to(p.device)
    _copy_trunk(gpt.transformer, model.transformer)
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise ValueError("transformers did not tie lm_head to wte")
    return model.eval()


def hf_scalar(scalar_model, pad_id: int, eos_id: int | None = None):
    """A GPT2ForSequenceClassification (one label) with our ScalarHeadModel's trunk and head
    weight. It reads the score at the last non-pad token, as `ScalarHeadModel.score` does."""
    from transformers import GPT2ForSequenceClassification
    p = scalar_model.head.weight
    config = gpt2_config(scalar_model.config, pad_id, eos_id, num_labels=1)
    model = GPT2ForSequenceClassification(config).to(p.device)
    _copy_trunk(scalar_model.transformer, model.transformer)
    with torch.no_grad():
        model.score.weight.copy_(p)   # (1, C); our head's bias has no place here (see above)
    return model.eval()


def hf_tokenizer(tok):
    """Our world tokenizer as a PreTrainedTokenizerFast: the same BPE ranks, GPT-2's regex and
    our five special tokens at the same ids, so both sides see the same token ids (checked by
    `same_ids`). Built with transformers' own tiktoken converter from a temporary rank file."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "world.tiktoken")
        tok.save(path)
        specials = sorted(tok.enc._special_tokens, key=tok.enc._special_tokens.get)
        backend = TikTokenConverter(vocab_file=path, pattern=tok.enc._pat_str,
                                    extra_special_tokens=specials).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>",
                                   eos_token="<|end|>", pad_token="<|pad|>")


def prompt_text(prompt: str) -> str:
    """Our chat template written as text with special-token spellings: the HF tokenizer turns
    them into the control tokens, so `hf_tok(prompt_text(p))` == `tok.render_prompt(p)`."""
    return f"<|bos|><|user|>{prompt}<|assistant|>"


def same_ids(tok, hf_tok, prompts: list[str], responses: list[str]) -> bool:
    """Whether both tokenizers give the same ids for the prompt and for prompt + response."""
    for p, r in zip(prompts, responses):
        ours, _ = tok.render(p, r, end=False)
        theirs = hf_tok(prompt_text(p) + r, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            return False
    return True


@torch.no_grad()
def max_logit_diff(gpt, hf_model, tokens, attn_mask) -> float:
    """Largest |ours − transformers| over the logits of real tokens: ~1e-5 in float32 when
    the weights were copied right. tokens, attn_mask: (B, T), left-padded."""
    ours = gpt(tokens, attn_mask).float()                                          # (B, T, V)
    pos = (attn_mask.long().cumsum(-1) - 1).clamp(min=0)                           # (B, T)
    theirs = hf_model(input_ids=tokens, attention_mask=attn_mask.long(),
                      position_ids=pos).logits.float()                             # (B, T, V)
    real = attn_mask.bool()
    return float((ours - theirs).abs()[real].max())
