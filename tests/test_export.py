"""Export to a Hugging Face GPT-2 folder: the files load back, through minirlhf's own GPT-2
loader and (when installed) through transformers, with the same logits and the same tokens."""
import importlib.util
import json
import os

import pytest
import torch

from minirlhf import export
from minirlhf.checkpoint import load_stage, save_stage
from minirlhf.gpt2 import read_safetensors, write_safetensors
from minirlhf.model import GPT, GPTConfig
from minirlhf.tokenizer import Tokenizer, bpe_merges
from minirlhf.world import world_tokenizer

TEXTS = ["What is the capital of Norway?", "Sure! 7 is larger than 3. <|end|> spelled out",
         "héllo wörld 12345 \n\n  spaces"]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A small random GPT with the world's tokenizer, saved as a stage folder."""
    tok = world_tokenizer(512)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2,
                          n_embd=32, pad_vocab_multiple=64))
    out = str(tmp_path_factory.mktemp("stage"))
    save_stage(out, model=model, model_kind="gpt", config=None, tokenizer=tok, step=0)
    return out, model, tok


def test_safetensors_round_trip(tmp_path):
    """write_safetensors then read_safetensors returns every tensor bit for bit, any dtype."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, generator=g).to(torch.bfloat16), "empty": torch.zeros(0)}
    path = str(tmp_path / "m.safetensors")
    write_safetensors(tensors, path)
    back = read_safetensors(path)
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    assert int.from_bytes(open(path, "rb").read(8), "little") % 8 == 0  # padded header


def test_merges_rebuild_the_tokenizer():
    """The merge list recovered from the ranks, applied in order, encodes like tiktoken does."""
    tok = world_tokenizer(512)
    ranks = tok.enc._mergeable_ranks
    merges = bpe_merges(ranks)
    assert len(merges) == len(ranks) - 256
    assert all(ranks[a + b] == 256 + i for i, (a, b) in enumerate(merges))


def test_export_loads_back_with_the_same_logits_and_tokens(stage, tmp_path):
    """The exported folder, read by minirlhf's GPT-2 loader (`gpt2:DIR`), gives the stage's
    logits exactly and a tokenizer with the same token table and encodings."""
    folder, model, tok = stage
    out = str(tmp_path / "hf")
    paths = export.main([folder, "--hf", out])
    assert {os.path.basename(p) for p in paths} == {
        "config.json", "model.safetensors", "vocab.json", "merges.txt",
        "tokenizer_config.json", "special_tokens_map.json"}
    back, back_tok, _ = load_stage(f"gpt2:{out}", "gpt")
    assert back_tok.fingerprint() == tok.fingerprint() and back_tok.kind == "world"
    for text in TEXTS:
        assert back_tok.encode(text) == tok.encode(text)
    ids = torch.tensor([tok.render("What is the capital of Norway?", "Oslo.")[0]])
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["vocab_size"] == tok.vocab_size and config["n_positions"] == 32
    assert config["eos_token_id"] == tok.end_id


def test_export_refuses_a_reward_model_and_a_used_folder(stage, tmp_path, capsys):
    """A used output folder and a stage that is not a language model each give one line."""
    folder, model, tok = stage
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        export.main([folder, "--hf", str(used)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "--overwrite" in err
    assert (used / "x").read_text() == "keep me"
    from minirlhf.model import ScalarHeadModel
    rm = str(tmp_path / "rm")
    save_stage(rm, model=ScalarHeadModel(model.config), model_kind="scalar", config=None,
               tokenizer=tok, step=0)
    with pytest.raises(SystemExit):
        export.main([rm, "--hf", str(tmp_path / "rm_hf")])
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
def test_transformers_loads_the_export_with_the_same_logits(stage, tmp_path):
    """GPT2LMHeadModel.from_pretrained(OUT) gives our logits (max |Δ| ≤ 1e-4), and the
    tokenizer transformers builds from the files encodes plain text and templates a chat like
    ours. (Unlike ours, transformers reads text that spells a special token as that token.)"""
    import transformers
    folder, model, tok = stage
    out = str(tmp_path / "hf")
    export.main([folder, "--hf", out])
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor([tok.render("What is the capital of Norway?", "Oslo.")[0]])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in (TEXTS[0], TEXTS[2]):  # (transformers reads a spelled "<|end|>" as the token)
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    chat = [{"role": "user", "content": "What is 2 plus 3?"}]
    ids = hf_tok.apply_chat_template(chat, tokenize=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]  # a BatchEncoding in transformers 5
    assert ids == tok.render_prompt("What is 2 plus 3?")
