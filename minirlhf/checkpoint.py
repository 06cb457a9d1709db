"""Checkpoints: one file per stage holding everything a run needs to continue or be reused.

    save_checkpoint(path, model=policy, model_kind="gpt", config=cfg, tokenizer=tok,
                    step=step, optimizer=opt, rng=rng_state(gen))
    ck = load_checkpoint(path)                          # a plain dict of tensors and numbers
    model = model_from_checkpoint(ck)                   # GPT or ScalarHeadModel, weights loaded

Safety rules (docs/design.md, "Reliability"):
- Writes are atomic: the bytes go to a temporary file in the same folder, are flushed to disk,
  then renamed over the old file. A run killed mid-write leaves the previous checkpoint intact;
  a write that fails (a full disk, a read-only folder) removes its temporary file and stops the
  run with one line naming the file and the cause.
- Every byte is covered: after torch.save's bytes comes a trailer with their SHA-256, checked
  before anything is unpickled, so a flipped byte anywhere is refused (torch.load ignores the
  trailer). A checkpoint records the script that wrote it; --resume refuses another script's.
- Loads use `torch.load(weights_only=True)`: only tensors, numbers, strings, lists and dicts are
  ever unpickled, so a checkpoint cannot run code. A truncated, foreign, damaged, newer or
  mismatched file gives one clear `CheckpointError` naming the file, and so do weights that
  hold NaN or inf.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random

import numpy as np
import torch

from .errors import CheckpointError, replacing
from .gpt2 import load_gpt2_stage
from .model import GPT, GPTConfig, ScalarHeadModel

FORMAT = "minirlhf-checkpoint-v1"  # the tag every minirlhf checkpoint carries
VERSION = 2  # 2: + the writing script and a SHA-256 trailer; no version field: version 1
REQUIRED = ("model_kind", "model_config", "model", "tokenizer", "step")
STAGES = {"SFTConfig": "train_sft.py", "RMConfig": "train_rm.py", "PPOConfig": "train_ppo.py",
          "DPOConfig": "train_dpo.py"}  # which script writes a checkpoint of each config


TRAILER = b"\nminirlhf-sha256:"  # + 64 hex digits + newline, after torch.save's bytes


def file_digest(path: str, end: int | None = None) -> str:
    """SHA-256 of a file's first `end` bytes (all of them by default), read in 16 MiB blocks."""
    h, left = hashlib.sha256(), end if end is not None else os.path.getsize(path)
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(left, 1 << 24))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def verify_file(path: str) -> bool:
    """Check the trailer `atomic_torch_save` appends: the SHA-256 of every byte before it.
    True if it matches, False if the file has no trailer (a version-1 file); a trailer that
    does not match is a damaged file: CheckpointError."""
    size = os.path.getsize(path)
    n = len(TRAILER) + 65
    with open(path, "rb") as f:
        f.seek(max(0, size - n))
        tail = f.read()
    if not tail.startswith(TRAILER):
        return False
    if tail != TRAILER + file_digest(path, size - n).encode() + b"\n":
        raise CheckpointError(f"{path}: damaged checkpoint: its bytes do not match the SHA-256 "
                              f"written with them (a changed or corrupted byte)")
    return True


def atomic_torch_save(obj, path: str) -> None:
    """torch.save `obj` to `path` atomically, with the SHA-256 trailer (`replacing`). A failed
    write (a full disk, a read-only folder, Ctrl-C) leaves no temporary file, and the file at
    `path`, the last good checkpoint, as it was; disk errors become one-line CheckpointErrors."""
    with replacing(path, CheckpointError, "; the last good checkpoint is kept") as tmp:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
        digest = file_digest(tmp)  # every byte torch.save wrote: verify_file checks it on load
        with open(tmp, "ab") as f:
            f.write(TRAILER + digest.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, obj) -> None:
    """Atomic JSON write (`replacing`): the whole new file or the old one, never half."""
    with replacing(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every random state a run draws from, in weights_only-safe types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, *, model, model_kind: str, config, tokenizer, step: int,
                    optimizer=None, rng: dict | None = None, extra: dict | None = None) -> None:
    """model_kind: "gpt" or "scalar"; config: the run's dataclass; tokenizer: a Tokenizer."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "stage": STAGES.get(type(config).__name__),  # the script that wrote it (None: a tool)
        "model_kind": model_kind,
        "model_config": dataclasses.asdict(model.config),
        "model": state,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "tokenizer": tokenizer.reference(),
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": rng,
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    checked = verify_file(path)  # the SHA-256 trailer, before anything is unpickled
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, corrupt or not "
                              f"saved by minirlhf): {reason}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a minirlhf checkpoint (format field missing)")
    version = ck.get("version", 1)
    if version not in (1, VERSION):
        raise CheckpointError(f"{path}: checkpoint format version {version!r}; this minirlhf "
                              f"reads versions 1 and {VERSION} (a newer minirlhf wrote it?)")
    missing = [k for k in REQUIRED if k not in ck]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint: field {missing[0]!r} is missing")
    if version >= 2 and not checked:
        raise CheckpointError(f"{path}: damaged checkpoint: its SHA-256 trailer is missing")
    unknown = set(ck["model_config"]) - {f.name for f in dataclasses.fields(GPTConfig)}
    if unknown:
        raise CheckpointError(f"{path}: model_config field {sorted(unknown)[0]!r} is unknown "
                              f"to this minirlhf (written by a newer version?)")
    check_finite_weights(ck["model"], path)
    return ck


def check_finite_weights(state, path: str) -> None:
    """Refuse weights that hold NaN or inf: no stage is worth loading once one is there. (Runs
    stop before such an update, but a file can come from elsewhere.)"""
    tensors = state.items() if isinstance(state, dict) else ()
    bad = next((name for name, t in tensors if isinstance(t, torch.Tensor)
                and t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise CheckpointError(f"{path}: the weights hold NaN or inf values, first in {bad} "
                              f"(a diverged run?)")


def check_stage(ck: dict, path: str, script: str) -> None:
    """Refuse, for --resume, a checkpoint that another script wrote."""
    stage = ck.get("stage")
    if stage is not None and stage != script:
        raise CheckpointError(f"{path}: written by {stage}, not {script}: --resume continues a "
                              f"run of the same script (pick another --out)")


def check_compatible(ck: dict, path: str, *, model_config: GPTConfig | None = None,
                     tokenizer=None) -> None:
    """Refuse a checkpoint whose model shape or tokenizer differs from what the run uses."""
    if model_config is not None:
        # fields added later (pad_vocab_multiple) take their defaults in older checkpoints
        want = dataclasses.asdict(model_config)
        have = {**dataclasses.asdict(GPTConfig()), **ck["model_config"]}
        diff = [f"{k}={have.get(k)} (run wants {v})" for k, v in want.items()
                if k != "dropout" and have.get(k) != v]
        if diff:
            raise CheckpointError(f"{path}: checkpoint is for another model config: "
                                  + ", ".join(diff))
    if tokenizer is not None:
        have = ck["tokenizer"].get("fingerprint")
        if have != tokenizer.fingerprint():
            raise CheckpointError(f"{path}: checkpoint was trained with another tokenizer "
                                  f"(fingerprint {have}, this run uses {tokenizer.fingerprint()})")


def model_from_checkpoint(ck: dict, path: str = "checkpoint", kind: str | None = None):
    """Build the model a checkpoint describes and load its weights."""
    cfg = GPTConfig(**ck["model_config"])
    kind = kind or ck["model_kind"]
    if kind != ck["model_kind"]:
        raise CheckpointError(f"{path}: holds a '{ck['model_kind']}' model, expected '{kind}'")
    model = GPT(cfg) if kind == "gpt" else ScalarHeadModel(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model config: "
                              f"{str(e).splitlines()[0][:160]}") from None
    return model


# --- a stage's folder: OUT/checkpoint.pt + OUT/tokenizer.tiktoken -------------------------------
CHECKPOINT = "checkpoint.pt"
TOKENIZER = "tokenizer.tiktoken"


def save_stage(out: str, *, model, model_kind: str, config, tokenizer, step: int,
               optimizer=None, rng=None, extra=None) -> str:
    """Write OUT/tokenizer.tiktoken (GPT-2's table too: the folder works offline) and
    OUT/config.json, then OUT/checkpoint.pt — the checkpoint is written last, so a folder whose
    checkpoint loads always has its tokenizer."""
    from .tokenizer import Tokenizer, TokenizerError  # local: the tokenizer is optional here
    tok_path = os.path.join(out, TOKENIZER)
    try:
        same = Tokenizer.load(tok_path).fingerprint() == tokenizer.fingerprint()
    except TokenizerError:
        same = False
    if not same:
        tokenizer.save(tok_path)
    if dataclasses.is_dataclass(config):  # the run's flags, readable beside the checkpoint
        from .config import config_to_dict
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "config.json"), config_to_dict(config))
    path = os.path.join(out, CHECKPOINT)
    save_checkpoint(path, model=model, model_kind=model_kind, config=config, tokenizer=tokenizer,
                    step=step, optimizer=optimizer, rng=rng, extra=extra)
    return path


def load_tokenizer_for(ck: dict, folder: str):
    """The tokenizer a checkpoint was trained with (its fingerprint is checked)."""
    from .tokenizer import Tokenizer, TokenizerError
    ref = ck["tokenizer"]
    try:
        if ref["kind"] == "world":
            tok = Tokenizer.load(os.path.join(folder, TOKENIZER))
        elif os.path.isfile(os.path.join(folder, TOKENIZER)):  # GPT-2's table, saved beside
            tok = Tokenizer.gpt2(os.path.join(folder, TOKENIZER))
        else:
            tok = Tokenizer.gpt2(None if ref["source"] == "gpt2" else ref["source"])
    except TokenizerError as e:
        raise CheckpointError(f"{folder}: the checkpoint's tokenizer cannot be loaded: "
                              f"{e}") from None
    if tok.fingerprint() != ref["fingerprint"]:
        raise CheckpointError(f"{folder}: {TOKENIZER} does not match the checkpoint "
                              f"(fingerprint {tok.fingerprint()} vs {ref['fingerprint']})")
    return tok


def load_stage(path: str, kind: str | None = None, device="cpu"):
    """A stage folder (or its checkpoint.pt) -> (model on device, tokenizer, checkpoint dict).

    `gpt2:DIR` loads OpenAI's GPT-2 from a Hugging Face folder instead (minirlhf/gpt2.py), so every
    script that takes a stage (--init, --sft) can start from GPT-2."""
    if path.startswith("gpt2:"):
        model, tok, info = load_gpt2_stage(path[len("gpt2:"):], kind, device)
        check_finite_weights(model.state_dict(), path)
        return model, tok, info
    folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
    ck_path = os.path.join(folder, CHECKPOINT) if os.path.isdir(path) else path
    ck = load_checkpoint(ck_path)
    model = model_from_checkpoint(ck, ck_path, kind).to(device)
    return model, load_tokenizer_for(ck, folder), ck
