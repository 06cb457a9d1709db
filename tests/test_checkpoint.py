"""Properties of minirlhf/checkpoint.py: models, optimizer and random state survive a save/load
exactly; truncated, foreign and malicious files are refused with a CheckpointError naming the
file; mismatched models and tokenizers are refused; writes are atomic.
"""
import collections
import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
import torch

from minirlhf.checkpoint import (CheckpointError, check_compatible, load_checkpoint,
                                 model_from_checkpoint, rng_state, save_checkpoint,
                                 set_rng_state)
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel
from minirlhf.tokenizer import Tokenizer

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)


@dataclass
class RunConfig:
    lr: float = 1e-3   # a stand-in for a script's config
    seed: int = 0      # saved beside the weights


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("a tiny corpus for a tiny tokenizer " * 10, 256 + 8)


def randomized(model, seed):
    """Weights unlike a fresh init, so loading the wrong thing cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def save(path, model, kind, tok, **kw):
    save_checkpoint(str(path), model=model, model_kind=kind, config=RunConfig(), tokenizer=tok,
                    step=7, **kw)


@pytest.mark.parametrize("kind, make", [("gpt", GPT), ("scalar", ScalarHeadModel)])
def test_saved_model_rebuilds_with_identical_outputs(tmp_path, tok, kind, make):
    """save -> load -> model_from_checkpoint gives the same model kind with bit-identical outputs;
    asking for the other kind is refused."""
    model = randomized(make(CFG), seed=1)
    path = tmp_path / "ck.pt"
    save(path, model, kind, tok)
    ck = load_checkpoint(str(path))
    back = model_from_checkpoint(ck, str(path)).eval()
    assert type(back) is make
    assert ck["step"] == 7 and ck["config"] == {"lr": 1e-3, "seed": 0}
    x = torch.randint(64, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    other = "scalar" if kind == "gpt" else "gpt"
    with pytest.raises(CheckpointError, match="expected"):
        model_from_checkpoint(ck, str(path), kind=other)


def test_optimizer_state_round_trips(tmp_path, tok):
    """AdamW resumed from a checkpoint takes exactly the step the uninterrupted run takes."""
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(64, (4, 16), generator=torch.Generator().manual_seed(0))

    def step(m, o):
        loss = m(x).logsumexp(-1).mean()
        o.zero_grad()
        loss.backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    path = tmp_path / "ck.pt"
    save(path, model, "gpt", tok, optimizer=opt)
    ck = load_checkpoint(str(path))
    resumed = model_from_checkpoint(ck)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(ck["optimizer"])
    step(model, opt)
    step(resumed, opt2)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_rng_state_round_trips_through_a_checkpoint(tmp_path, tok):
    """After set_rng_state(saved state), torch, numpy, python and the generator draw again exactly
    what they drew right after the state was taken."""
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    path = tmp_path / "ck.pt"
    save(path, GPT(CFG), "gpt", tok, rng=rng_state(gen))

    def draws(g):
        return (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(),
                torch.rand(3, generator=g).tolist())

    first = draws(gen)
    assert draws(gen) != first  # the streams move on...
    fresh = torch.Generator()
    set_rng_state(load_checkpoint(str(path))["rng"], fresh)
    assert draws(fresh) == first  # ...and rewind


@pytest.mark.parametrize("keep", [0.5, 0.9, -1])
def test_truncated_file_is_refused_with_its_path(tmp_path, tok, keep):
    """A checkpoint cut short (a crash mid-copy) is a CheckpointError naming the file."""
    path = tmp_path / "ck.pt"
    save(path, GPT(CFG), "gpt", tok)
    data = path.read_bytes()
    cut = data[:keep] if isinstance(keep, int) else data[: int(len(data) * keep)]
    path.write_bytes(cut)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(str(path))


class Sneaky(collections.OrderedDict):
    """A dict subclass: unpickling it means importing this test module's class."""


class RunsCode:
    """Unpickling this calls open(marker, "w"): the classic pickle code-execution trick."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_foreign_and_malicious_files_are_refused(tmp_path):
    """Random bytes, a pickled dict subclass, a pickle that would run code, and a plain tensor dict
    without our format tag are all CheckpointErrors, and the code never runs."""
    marker = tmp_path / "pwned"
    cases = {
        "random.pt": lambda p: p.write_bytes(os.urandom(4096)),
        "subclass.pt": lambda p: torch.save(Sneaky(w=torch.ones(2)), p),
        "code.pt": lambda p: torch.save({"format": "x", "payload": RunsCode(str(marker))}, p),
        "plain.pt": lambda p: torch.save({"weights": torch.ones(2)}, p),
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(str(path))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_check_compatible_refuses_other_models_and_tokenizers(tmp_path, tok):
    """A checkpoint of another size or another tokenizer is refused, naming what differs; the
    matching model and tokenizer pass (dropout may differ: it is not part of the weights)."""
    path = tmp_path / "ck.pt"
    save(path, GPT(CFG), "gpt", tok)
    ck = load_checkpoint(str(path))
    check_compatible(ck, str(path), model_config=CFG, tokenizer=tok)
    check_compatible(ck, str(path), model_config=GPTConfig(**{**vars(CFG), "dropout": 0.1}))
    bigger = GPTConfig(**{**vars(CFG), "n_embd": 32})
    with pytest.raises(CheckpointError, match=r"n_embd=16 \(run wants 32\)"):
        check_compatible(ck, str(path), model_config=bigger)
    other_tok = Tokenizer.train("some other text entirely " * 10, 256 + 8)
    with pytest.raises(CheckpointError, match="another tokenizer"):
        check_compatible(ck, str(path), tokenizer=other_tok)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, tok):
    """A checkpoint whose config was edited to disagree with its weights is a CheckpointError."""
    path = tmp_path / "ck.pt"
    save(path, GPT(CFG), "gpt", tok)
    ck = load_checkpoint(str(path))
    ck["model_config"]["n_embd"] = 32
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_checkpoint(ck, str(path))


def test_writes_are_atomic(tmp_path, tok, monkeypatch):
    """A save leaves only the checkpoint in its folder; a save that dies mid-write leaves the
    previous checkpoint intact and loadable, no temporary file behind, and one line naming the
    file and the cause."""
    path = tmp_path / "ck.pt"
    first = randomized(GPT(CFG), seed=1)
    save(path, first, "gpt", tok)
    save(path, first, "gpt", tok)  # overwriting is a save too
    assert os.listdir(tmp_path) == ["ck.pt"]
    before = path.read_bytes()

    def dies_mid_write(obj, f, *a, **kw):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(CheckpointError, match=f"^{path}: could not write it \\(No space left on "
                                              f"device\\); the last good checkpoint is kept$"):
        save(path, randomized(GPT(CFG), seed=2), "gpt", tok)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.pt"]
    back = model_from_checkpoint(load_checkpoint(str(path)))
    assert torch.equal(back.lm_head.weight, first.lm_head.weight)


# ------------------------------------------------------------------ integrity and provenance

@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A checkpoint with weights, an optimizer state and a config, as a stage writes it."""
    import dataclasses as dc
    from minirlhf.checkpoint import save_checkpoint
    from minirlhf.model import GPT, GPTConfig
    from minirlhf.world import world_tokenizer
    import train_sft
    tok = world_tokenizer(512)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1,
                          n_embd=8))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    path = str(tmp_path_factory.mktemp("ck") / "checkpoint.pt")
    save_checkpoint(path, model=model, model_kind="gpt", config=dc.replace(
        train_sft.SFTConfig()), tokenizer=tok, step=7, optimizer=opt)
    return path


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_flipped_byte_is_refused(small_checkpoint, data):
    """Flip one bit of any byte of the file (weights, optimizer state, config, zip headers, the
    trailer itself): the load is refused with a CheckpointError, never accepted or crashing."""
    from minirlhf.checkpoint import CheckpointError, load_checkpoint
    raw = open(small_checkpoint, "rb").read()
    i = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(raw)
    damaged[i] ^= 1 << bit
    path = small_checkpoint + f".flip{i}"
    open(path, "wb").write(damaged)
    try:
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    finally:
        os.remove(path)


def test_a_truncated_file_is_refused_and_the_intact_one_loads(small_checkpoint, tmp_path):
    from minirlhf.checkpoint import CheckpointError, load_checkpoint
    raw = open(small_checkpoint, "rb").read()
    assert load_checkpoint(small_checkpoint)["step"] == 7
    for n in (0, 10, len(raw) // 2, len(raw) - 80, len(raw) - 1):
        path = tmp_path / f"cut{n}.pt"
        path.write_bytes(raw[:n])
        with pytest.raises(CheckpointError):
            load_checkpoint(str(path))


@pytest.mark.parametrize("change, words", [
    (lambda ck: ck.update(version=99), "version 99"),
    (lambda ck: ck.pop("model"), "'model' is missing"),
    (lambda ck: ck["model_config"].update(rope_theta=1e4), "'rope_theta' is unknown"),
])
def test_newer_or_incomplete_checkpoints_are_refused_in_one_line(small_checkpoint, tmp_path,
                                                                 change, words):
    """A well-formed file (its trailer right) whose contents this version cannot use."""
    from minirlhf.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint
    ck = load_checkpoint(small_checkpoint)
    change(ck)
    path = str(tmp_path / "changed.pt")
    atomic_torch_save(ck, path)
    with pytest.raises(CheckpointError, match=words) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_version_one_files_without_a_trailer_still_load(small_checkpoint, tmp_path):
    """Checkpoints written before the trailer (no version field) load as they did."""
    from minirlhf.checkpoint import CheckpointError, load_checkpoint
    ck = load_checkpoint(small_checkpoint)
    del ck["version"]
    path = str(tmp_path / "v1.pt")
    torch.save(ck, path)
    assert load_checkpoint(path)["step"] == 7
    ck["version"] = 2  # a version-2 file must carry its trailer
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="trailer is missing"):
        load_checkpoint(path)


def test_resume_refuses_another_scripts_checkpoint(small_checkpoint, tmp_path):
    """The checkpoint names the script that wrote it; --resume with another script refuses it."""
    import shutil
    import train_dpo
    from minirlhf.checkpoint import CheckpointError, load_checkpoint
    from minirlhf.training import checkpoint_to_resume
    assert load_checkpoint(small_checkpoint)["stage"] == "train_sft.py"
    out = tmp_path / "dpo"
    out.mkdir()
    shutil.copy(small_checkpoint, out / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="written by train_sft.py, not train_dpo.py"):
        checkpoint_to_resume(train_dpo.DPOConfig(out=str(out), resume=True))
