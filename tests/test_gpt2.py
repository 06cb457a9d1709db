"""GPT-2 weights (minirlhf/gpt2.py) and the padded vocabulary (GPTConfig.pad_vocab_multiple).

Tiny random GPT-2 checkpoints are written in Hugging Face's layout (config.json + model.safetensors
by our own writer, or pytorch_model.bin) and loaded; their logits must equal a GPT-2 forward pass
written out here from the checkpoint's own tensors, in Conv1D's x @ W convention. Shapes are
non-square (C -> 3C, C -> 4C) and the weights large, so a missing transpose or a wrong tensor
cannot pass. Broken folders are refused with one-line CheckpointErrors naming the file or tensor.
With `transformers` installed, a real GPT2LMHeadModel saved by save_pretrained gives the same
logits (unpadded and left-padded). A padded embedding (64 rows) changes no logit.
"""
import json
import math
import os
import struct

import pytest
import torch
import torch.nn.functional as F

from minirlhf.checkpoint import (CheckpointError, check_compatible, load_stage,
                                 model_from_checkpoint, save_checkpoint)
from minirlhf.gpt2 import load_gpt2, read_safetensors
from minirlhf.model import GPT, GPTConfig, position_ids
from minirlhf.sampler import generate
from minirlhf.tokenizer import Tokenizer, gpt2_byte_decoder, save_ranks

SIZES = dict(n_layer=2, n_head=2, n_embd=24, n_positions=32, vocab_size=100)
ATOL = 1e-5


# --- a tiny GPT-2 in Hugging Face's layout -----------------------------------------------------

def hf_tensors(sizes=SIZES, seed=0, std=0.3) -> dict[str, torch.Tensor]:
    """Random GPT-2 weights under HF's names and shapes (Conv1D weights are (in, out))."""
    g = torch.Generator().manual_seed(seed)
    C, V, P = sizes["n_embd"], sizes["vocab_size"], sizes["n_positions"]
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(sizes["n_layer"]):
        shapes.update({f"h.{i}.{k}": s for k, s in {
            "ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
            "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
            "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
            "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}.items()})
    return {k: torch.randn(s, generator=g) * std + (1.0 if "ln" in k and "weight" in k else 0.0)
            for k, s in shapes.items()}


def write_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """The safetensors format by hand: u64 header length, JSON header, raw little-endian bytes."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_hf_folder(folder, tensors, sizes=SIZES, fmt="safetensors", **config_extra):
    os.makedirs(folder, exist_ok=True)
    config = {"model_type": "gpt2", "layer_norm_epsilon": 1e-5,
              "activation_function": "gelu_new", **sizes, **config_extra}
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    if fmt == "safetensors":
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    else:
        torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    return str(folder)


def reference_logits(w: dict, tokens: torch.Tensor, n_head: int) -> torch.Tensor:
    """GPT-2's forward pass written out from HF-layout tensors: Conv1D computes x @ W + b."""
    B, T = tokens.shape
    C = w["wte.weight"].shape[1]
    ln = lambda x, k: F.layer_norm(x, (C,), w[f"{k}.weight"], w[f"{k}.bias"], eps=1e-5)
    x = w["wte.weight"][tokens] + w["wpe.weight"][torch.arange(T)]                 # (B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    i = 0
    while f"h.{i}.ln_1.weight" in w:
        p = f"h.{i}."
        qkv = ln(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2)
                   for t in qkv.split(C, dim=2))                                    # (B, nh, T, hs)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // n_head)                   # (B, nh, T, T)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)                              # (B, T, C)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = ln(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]   # (B, T, 4C)
        h = F.gelu(h, approximate="tanh")                                           # GPT-2's GELU
        x = x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
        i += 1
    return ln(x, "ln_f") @ w["wte.weight"].T                                        # (B, T, V)


def random_tokens(B=3, T=20, V=SIZES["vocab_size"], seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --- loading --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, prefix, buffers", [("safetensors", "", True),
                                                  ("safetensors", "transformer.", False),
                                                  ("bin", "transformer.", True),
                                                  ("bin", "", False)])
def test_loaded_gpt2_equals_the_written_out_forward(tmp_path, fmt, prefix, buffers):
    """Either file format, with or without the "transformer." prefix and the attn.bias /
    masked_bias buffers: the logits equal GPT-2's forward on the same tensors; the vocabulary
    is padded to a multiple of 64 with zero rows that no logit comes from."""
    w = hf_tensors()
    stored = {prefix + k: v for k, v in w.items()}
    if buffers:
        for i in range(SIZES["n_layer"]):
            stored[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
            stored[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        stored["lm_head.weight"] = w["wte.weight"].clone()  # tied, as save_pretrained may keep it
    model = load_gpt2(write_hf_folder(tmp_path / "gpt2", stored, fmt=fmt))
    tokens = random_tokens()
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (3, 20, SIZES["vocab_size"])
    assert model.config.padded_vocab_size == 128
    assert torch.equal(model.transformer.wte.weight[100:], torch.zeros(28, 24))
    assert torch.allclose(logits, reference_logits(w, tokens, SIZES["n_head"]), atol=ATOL)


def test_own_safetensors_writer_and_reader_agree_with_the_package(tmp_path):
    """Our reader reads what the safetensors package writes (several dtypes, an empty tensor),
    and the package reads what our test writer writes: both speak the real format."""
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).half(),
               "c": torch.randn(2, 2, generator=g).bfloat16(), "d": torch.arange(4),
               "e": torch.zeros(0, 3)}
    st.save_file(tensors, str(tmp_path / "pkg.safetensors"))
    ours = read_safetensors(str(tmp_path / "pkg.safetensors"))
    assert set(ours) == set(tensors)
    assert all(ours[k].dtype == v.dtype and torch.equal(ours[k], v) for k, v in tensors.items())
    write_safetensors(tmp_path / "own.safetensors", tensors)
    theirs = st.load_file(str(tmp_path / "own.safetensors"))
    assert all(torch.equal(theirs[k], v) for k, v in tensors.items())


def broken(tmp_path, what):
    """A GPT-2 folder broken in one way; returns (folder, words the error must say)."""
    w = hf_tensors()
    folder = str(tmp_path / "gpt2")
    if what == "no config":
        write_hf_folder(folder, w)
        os.remove(os.path.join(folder, "config.json"))
        return folder, ["config.json", "not found"]
    if what == "config not JSON":
        write_hf_folder(folder, w)
        open(os.path.join(folder, "config.json"), "w").write("{n_layer: 2")
        return folder, ["config.json", "not a readable JSON"]
    if what == "config without n_embd":
        write_hf_folder(folder, w)
        cfg = json.load(open(os.path.join(folder, "config.json")))
        del cfg["n_embd"]
        json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
        return folder, ["missing key 'n_embd'"]
    if what == "another model":
        return write_hf_folder(folder, w, model_type="llama"), ["model_type", "llama"]
    if what == "relu":
        return write_hf_folder(folder, w, activation_function="relu"), ["activation_function"]
    if what == "no weights":
        write_hf_folder(folder, w)
        os.remove(os.path.join(folder, "model.safetensors"))
        return folder, ["no model.safetensors or pytorch_model.bin"]
    if what == "truncated safetensors":
        write_hf_folder(folder, w)
        path = os.path.join(folder, "model.safetensors")
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) - 100])
        return folder, ["model.safetensors", "truncated"]
    if what == "garbage safetensors":
        write_hf_folder(folder, w)
        open(os.path.join(folder, "model.safetensors"), "wb").write(b"\x10" * 64)
        return folder, ["model.safetensors", "not a safetensors file"]
    if what == "garbage bin":
        write_hf_folder(folder, w, fmt="bin")
        open(os.path.join(folder, "pytorch_model.bin"), "wb").write(b"PK\x03\x04 not a zip")
        return folder, ["pytorch_model.bin", "not a readable PyTorch state dict"]
    if what == "missing tensor":
        del w["h.1.mlp.c_fc.bias"]
        return write_hf_folder(folder, w), ["h.1.mlp.c_fc.bias is missing"]
    if what == "extra tensor":
        w["h.2.ln_1.weight"] = torch.ones(24)
        return write_hf_folder(folder, w), ["unexpected tensor h.2.ln_1.weight"]
    if what == "wrong shape":
        w["wpe.weight"] = torch.zeros(33, 24)
        return write_hf_folder(folder, w), ["wpe.weight has shape (33, 24)", "(32, 24)"]
    if what == "Linear layout":  # someone transposed c_attn already: refused, not double-transposed
        w["h.0.attn.c_attn.weight"] = w["h.0.attn.c_attn.weight"].T.contiguous()
        return write_hf_folder(folder, w), ["h.0.attn.c_attn.weight has shape (72, 24)"]
    if what == "untied head":
        w["lm_head.weight"] = w["wte.weight"] + 1
        return write_hf_folder(folder, w), ["lm_head.weight differs from wte.weight"]
    raise AssertionError(what)


BROKEN = ["no config", "config not JSON", "config without n_embd", "another model", "relu",
          "no weights", "truncated safetensors", "garbage safetensors", "garbage bin",
          "missing tensor", "extra tensor", "wrong shape", "Linear layout", "untied head"]


@pytest.mark.parametrize("what", BROKEN)
def test_broken_folders_are_refused_in_one_line(tmp_path, what):
    """Each way a folder can be broken gives one CheckpointError line naming the file or tensor."""
    folder, words = broken(tmp_path, what)
    with pytest.raises(CheckpointError) as info:
        load_gpt2(folder)
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg


def test_gpt2_spec_in_load_stage(tmp_path):
    """load_stage("gpt2:DIR") returns the model, the tokenizer of DIR's rank file and a step-0
    header; a reward model, a missing folder or a tokenizer larger than the embedding is refused."""
    gpt2_ranks = {bytes([b]): b for b in range(256)}  # ids up to 255, <|endoftext|> is 50256
    folder = write_hf_folder(tmp_path / "big", hf_tensors(dict(SIZES, vocab_size=50257)),
                             sizes=dict(SIZES, vocab_size=50257))
    save_ranks(gpt2_ranks, os.path.join(folder, "gpt2.tiktoken"))
    model, tok, info = load_stage(f"gpt2:{folder}", "gpt")
    assert isinstance(model, GPT) and model.config.padded_vocab_size == 50304
    assert tok.kind == "gpt2" and tok.end_id == 50256 and info["step"] == 0
    assert info["tokenizer"]["fingerprint"] == tok.fingerprint()
    small = write_hf_folder(tmp_path / "small", hf_tensors())
    save_ranks(gpt2_ranks, os.path.join(small, "gpt2.tiktoken"))
    for spec, kind, words in [(f"gpt2:{folder}", "scalar", "not a reward model"),
                              (f"gpt2:{tmp_path}/nowhere", "gpt", "no such folder"),
                              (f"gpt2:{small}", "gpt", "the tokenizer has 50257 ids")]:
        with pytest.raises(CheckpointError, match=words):
            load_stage(spec, kind)


def test_vocab_json_gives_the_rank_file_tokenizer(tmp_path):
    """A Hugging Face vocab.json (GPT-2's byte-as-character spelling) loads to the same token
    table as the tiktoken rank file, so an HF download needs no network for its tokenizer."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b" w": 256, b"He": 257, b"\n\n": 258, b" \xc3\xa9": 259})
    char_of = {b: c for c, b in gpt2_byte_decoder().items()}
    vocab = {"".join(char_of[b] for b in tok): i for tok, i in ranks.items()}
    json.dump({**vocab, "<|endoftext|>": 50256}, open(tmp_path / "vocab.json", "w"))
    save_ranks(ranks, str(tmp_path / "gpt2.tiktoken"))
    from_json = Tokenizer.gpt2(str(tmp_path / "vocab.json"))
    assert from_json.enc._mergeable_ranks == ranks
    assert from_json.fingerprint() == Tokenizer.gpt2(str(tmp_path / "gpt2.tiktoken")).fingerprint()
    assert from_json.decode(from_json.encode("He w\n\n é")) == "He w\n\n é"


def test_byte_decoder_is_gpt2s():
    """Our byte<->character table is GPT-2's bytes_to_unicode (as transformers ships it)."""
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    assert {c: b for b, c in convert.bytes_to_unicode().items()} == gpt2_byte_decoder()


def test_transformers_gpt2_gives_the_same_logits(tmp_path):
    """A random GPT2LMHeadModel saved with save_pretrained loads with equal logits (fp32), also
    for left-padded batches (HF given the same real-token position ids)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100,
        attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # larger than GPT-2's init, so logits differ a lot
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = load_gpt2(str(tmp_path / "hf")).eval()
    tokens = random_tokens(V=100)
    mask = torch.ones_like(tokens)
    mask[0, :7], mask[2, :3] = 0, 0                                # left padding
    with torch.no_grad():
        assert torch.allclose(ours(tokens), hf(tokens).logits, atol=ATOL)
        want = hf(tokens, attention_mask=mask, position_ids=position_ids(mask)).logits
        got = ours(tokens, mask)
    real = mask.bool()
    assert torch.allclose(got[real], want[real], atol=ATOL)


# --- the padded vocabulary ------------------------------------------------------------------------

def test_padded_vocabulary_changes_no_logit_and_no_sample():
    """The same real weights with 64-row padding (random padding rows): logits equal in fp32,
    the same sampled tokens and log-probs, and no gradient ever reaches the padding rows."""
    cfg = GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=24)
    torch.manual_seed(0)
    plain = GPT(cfg).eval()
    padded = GPT(GPTConfig(**{**cfg.__dict__, "pad_vocab_multiple": 64})).eval()
    with torch.no_grad():
        padded.transformer.wte.weight.normal_(std=5.0)       # the padding rows may hold anything
        for p, q in zip(padded.parameters(), plain.parameters()):
            p[:q.shape[0]].copy_(q)
    assert padded.transformer.wte.weight.shape == (128, 24)
    tokens = random_tokens(V=100)
    assert torch.allclose(padded(tokens), plain(tokens), atol=1e-6, rtol=0)
    runs = [generate(m, [[1, 2, 3], [4]], 8, eos_id=0, pad_id=0,
                     generator=torch.Generator().manual_seed(0)) for m in (plain, padded)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.allclose(runs[0].logprobs, runs[1].logprobs, atol=1e-5)
    padded.train()
    F.cross_entropy(padded(tokens).flatten(0, 1), tokens.flatten()).backward()
    grad = padded.transformer.wte.weight.grad
    assert grad[100:].abs().max() == 0 and grad[:100].abs().max() > 0


def test_configs_saved_before_padding_still_load(tmp_path):
    """A checkpoint whose model_config predates pad_vocab_multiple loads, and is compatible with
    the same config today (the missing field takes its default, 1)."""
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    path = str(tmp_path / "old.pt")
    save_checkpoint(path, model=model, model_kind="gpt", config={}, tokenizer=Tokenizer.train(
        "a b c", 260), step=1)
    ck = torch.load(path, weights_only=True)
    del ck["model_config"]["pad_vocab_multiple"]                   # as saved by older versions
    check_compatible(ck, path, model_config=cfg)
    back = model_from_checkpoint(ck, path, "gpt")
    assert back.config.pad_vocab_multiple == 1
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    with pytest.raises(CheckpointError, match="pad_vocab_multiple=1"):
        check_compatible(ck, path, model_config=GPTConfig(**{**cfg.__dict__,
                                                            "pad_vocab_multiple": 64}))
