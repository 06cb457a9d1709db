"""OpenAI's GPT-2 weights in our `GPT`: read a Hugging Face GPT-2 folder, check it, copy it in.

    model = load_gpt2("gpt2")                    # a folder with config.json + model.safetensors
    model, tok, info = load_gpt2_stage("gpt2")   # + its tokenizer, as checkpoint.load_stage returns
    python train_sft.py --init gpt2:gpt2 --data hh.jsonl    # every script's stage flag: gpt2:DIR

Get a folder with `huggingface-cli download gpt2 --local-dir gpt2` (or gpt2-medium, gpt2-large,
gpt2-xl, distilgpt2). They fit `minirlhf/model.py` exactly: the same blocks under the same
names, GELU with the tanh approximation, LayerNorm eps 1e-5, tied embeddings. Three differences:
- HF GPT-2 keeps its projections as `Conv1D`, weight (in, out); `nn.Linear` holds (out, in), so
  the c_attn, c_proj and c_fc weights are transposed.
- `attn.bias` and `attn.masked_bias` are buffers (the causal mask), not weights: skipped. Names
  may or may not start with "transformer." (OpenAI's upload vs `save_pretrained`).
- The embedding is padded from 50257 to 50304 rows (`pad_vocab_multiple=64`); the new rows are 0
  and never produced.
Anything else (a missing, extra or wrong-shaped tensor, another architecture, a config option
our model does not have) is refused with a one-line `CheckpointError` naming it.

`model.safetensors` is read by `read_safetensors` below, so the `safetensors` package is not
needed: an 8-byte little-endian header length, a JSON header {name: dtype, shape, data_offsets},
then the raw bytes. `pytorch_model.bin` is loaded with torch.load(weights_only=True).

The tokenizer of `gpt2:DIR`: a `*.tiktoken` rank file in DIR, else DIR/vocab.json (part of the
HF download, so this works offline), else tiktoken's "gpt2" encoding by name.

Left out: sharded checkpoints (GPT-2 needs none), other model families; fp16/bf16 weights are
upcast to fp32 (the scripts use bf16 autocast on CUDA).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os

import torch

from .errors import CheckpointError
from .model import GPT, GPTConfig

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFERS = (".attn.bias", ".attn.masked_bias")  # h.N.attn.bias, not h.N.attn.c_attn.bias


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """{name: tensor} from a .safetensors file (the tensors share one buffer of its bytes)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + n > len(data):
        raise CheckpointError(f"{path}: not a safetensors file (its header runs past the end: "
                              f"truncated or another format)")
    try:
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
    except (ValueError, AttributeError):
        raise CheckpointError(f"{path}: not a safetensors file (the header is not a JSON "
                              f"object)") from None
    body, tensors = 8 + n, {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name}: bad header entry (a known dtype, a "
                                  f"shape and two data_offsets are needed)") from None
        count = math.prod(shape)
        if end - start != count * dtype.itemsize or not 0 <= start <= end <= len(data) - body:
            raise CheckpointError(f"{path}: tensor {name}: its bytes do not fit its shape or "
                                  f"the file (truncated?)")
        flat = (torch.frombuffer(data, dtype=dtype, count=count, offset=body + start) if count
                else torch.empty(0, dtype=dtype))
        tensors[name] = flat.view(shape)
    return tensors


def write_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """The inverse of `read_safetensors`: an 8-byte header length, the JSON header, the bytes.
    Written to a temporary file and renamed, like every file the project writes."""
    dtype_name = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype_name[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header to a multiple of 8 bytes
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for data in chunks:
            f.write(data)
    os.replace(tmp, path)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The inverse of `load_gpt2`'s copy: our weights under Hugging Face GPT-2's names, with the
    Conv1D weights transposed back to (in, out) and the embedding's padding rows dropped."""
    cfg = model.config
    out = {}
    for name, w in model.transformer.state_dict().items():
        if name.endswith(CONV1D):
            w = w.t()                                          # nn.Linear (out, in) -> Conv1D
        if name == "wte.weight":
            w = w[:cfg.vocab_size]                             # our padding rows are not GPT-2's
        out["transformer." + name] = w.detach().float().contiguous().clone()
    return out


def hf_config(cfg: GPTConfig, bos_id: int, eos_id: int) -> dict:
    """config.json of a Hugging Face GPT-2 with our model's sizes (dropout off, as ours)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "initializer_range": 0.02, "bos_token_id": bos_id, "eos_token_id": eos_id,
            "tie_word_embeddings": True, "torch_dtype": "float32"}


def read_hf_weights(folder: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, path) from DIR/model.safetensors, else DIR/pytorch_model.bin."""
    st, pt = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        return read_safetensors(st), st
    if not os.path.isfile(pt):
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin (a Hugging "
                              f"Face GPT-2 folder holds config.json and one of them)")
    try:
        sd = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{pt}: not a readable PyTorch state dict: {reason}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{pt}: not a state dict (a dict of named tensors)")
    return sd, pt


def gpt2_config(folder: str) -> GPTConfig:
    """Our GPTConfig from DIR/config.json, refusing options our model does not implement."""
    path = os.path.join(folder, "config.json")
    try:
        hf = json.load(open(path, encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a Hugging Face GPT-2 folder has "
                              f"config.json)") from None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(hf, dict) or hf.get("model_type", "gpt2") != "gpt2":
        got = hf.get("model_type") if isinstance(hf, dict) else "not an object"
        raise CheckpointError(f"{path}: model_type is {got!r}; only GPT-2 checkpoints load")
    try:
        sizes = {k: int(hf[k]) for k in ("n_layer", "n_head", "n_embd", "n_positions",
                                         "vocab_size")}
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: n_layer, n_head, n_embd, n_positions and vocab_size "
                              f"must be integers") from None
    C = sizes["n_embd"]
    unsupported = {  # option: (its value, the only value our model implements)
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), 1e-5),
        "activation_function": (hf.get("activation_function", "gelu_new"), "gelu_new"),
        "n_inner": (hf.get("n_inner") or 4 * C, 4 * C),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False),
                                            False),
    }
    for key, (have, want) in unsupported.items():
        if have != want and not (key == "activation_function" and have == "gelu_pytorch_tanh"):
            raise CheckpointError(f"{path}: {key} is {have!r}; minirlhf's GPT-2 has {want!r}")
    if min(sizes.values()) <= 0 or C % sizes["n_head"]:
        raise CheckpointError(f"{path}: sizes must be positive and n_embd divisible by n_head")
    return GPTConfig(vocab_size=sizes["vocab_size"], block_size=sizes["n_positions"],
                     n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=C,
                     pad_vocab_multiple=64)


def load_gpt2(folder: str, device="cpu") -> GPT:
    """A Hugging Face GPT-2 folder -> our GPT with its weights (fp32, embedding padded to 64)."""
    cfg = gpt2_config(folder)
    sd, path = read_hf_weights(folder)
    sd = {k.removeprefix("transformer."): v for k, v in sd.items() if not k.endswith(BUFFERS)}
    lm_head = sd.pop("lm_head.weight", None)
    model = GPT(cfg)
    ours = model.transformer.state_dict()  # shares storage with the parameters
    missing, extra = [k for k in ours if k not in sd], [k for k in sd if k not in ours]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]} is missing{more}")
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} (not part of GPT-2 with "
                              f"{cfg.n_layer} layers)")
    with torch.no_grad():
        for name, param in ours.items():
            w = sd[name]
            want = tuple(param.shape)
            if name.endswith(CONV1D):
                want = want[::-1]                              # Conv1D stores (in, out)
            if name == "wte.weight":
                want = (cfg.vocab_size, cfg.n_embd)            # before our padding rows
            if tuple(w.shape) != want:
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(w.shape)}, "
                                      f"config.json's sizes need {want}")
            if name.endswith(CONV1D):
                w = w.t()                                      # -> nn.Linear's (out, in)
            param[:w.shape[0]].copy_(w)
            param[w.shape[0]:].zero_()                         # wte's padding rows; else empty
    if lm_head is not None and not torch.equal(lm_head.float(), sd["wte.weight"].float()):
        raise CheckpointError(f"{path}: lm_head.weight differs from wte.weight; GPT-2 ties "
                              f"them, and so does minirlhf")
    return model.to(device)


def exported_world_tokenizer(folder: str) -> bool:
    """Whether DIR's tokenizer_config.json names the world tokenizer's special tokens."""
    from .tokenizer import SPECIAL_TOKENS
    try:
        config = json.load(open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("additional_special_tokens") == SPECIAL_TOKENS


def gpt2_tokenizer(folder: str):
    """DIR/*.tiktoken, else DIR/vocab.json, else tiktoken's GPT-2 encoding by name."""
    from .tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, load_hf_vocab
    rank_files = sorted(glob.glob(os.path.join(folder, "*.tiktoken")))
    vocab = os.path.join(folder, "vocab.json")
    if len(rank_files) > 1:
        raise CheckpointError(f"gpt2:{folder}: several *.tiktoken files; keep the GPT-2 one")
    try:
        if rank_files:
            return Tokenizer.gpt2(rank_files[0])
        if exported_world_tokenizer(folder):  # written by minirlhf.export from a world stage
            return Tokenizer.from_ranks(load_hf_vocab(vocab, SPECIAL_TOKENS), source=vocab)
        return Tokenizer.gpt2(vocab if os.path.isfile(vocab) else None)
    except TokenizerError as e:
        raise CheckpointError(f"gpt2:{folder}: {e}") from None


def load_gpt2_stage(folder: str, kind: str | None = None, device="cpu"):
    """`load_stage("gpt2:DIR")`: (model, tokenizer, info) with info shaped like a checkpoint's
    header (step 0), so a script treats GPT-2 like an SFT stage folder."""
    if kind not in (None, "gpt"):
        raise CheckpointError(f"gpt2:{folder} is a language model, not a reward model: train "
                              f"one first (train_rm.py --sft gpt2:{folder})")
    if not os.path.isdir(folder):
        raise CheckpointError(f"gpt2:{folder}: no such folder (get one with: huggingface-cli "
                              f"download gpt2 --local-dir {folder})")
    tok = gpt2_tokenizer(folder)  # first: it fails fast when offline, before the weights load
    model = load_gpt2(folder, device)
    if tok.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"gpt2:{folder}: the tokenizer has {tok.vocab_size} ids, the "
                              f"model's embedding only {model.config.vocab_size}")
    info = {"model_kind": "gpt", "model_config": dataclasses.asdict(model.config), "step": 0,
            "tokenizer": tok.reference(), "source": os.path.abspath(folder)}
    return model, tok, info
