"""Real preference data: Anthropic HH dialogues and TL;DR-style prompt/chosen/rejected lines.

HH lines hold two whole dialogues; the readers cut them at the last "\\n\\nAssistant:" into the
prompt (earlier turns included) and the final answers, refuse malformed pairs naming file:line,
and tell the forms apart line by line. The GPT-2 template uses an HH prompt as it is, so the
rendered pair decodes back to the original dialogue. End to end: `train_sft.py --init gpt2:DIR`
on an HH file trains a tiny GPT-2 (a local rank file stands in for tiktoken's download), and its
stage folder reloads with the same tokenizer, offline.
"""
import json
import os

import pytest
import torch
from hypothesis import given, strategies as st

import train_sft
from minirlhf.checkpoint import load_stage
from minirlhf.data import (ASSISTANT, HUMAN, DataError, read_prefs, read_prompts, read_sft,
                           split_dialogue, split_hh_pair)
from minirlhf.gpt2 import CONV1D
from minirlhf.model import GPT, GPTConfig
from minirlhf.tokenizer import Tokenizer, save_ranks
from minirlhf.training import read_metrics


def dialogue(*turns: str) -> str:
    """Alternating human/assistant turns in HH's text form."""
    return "".join(f"{HUMAN if i % 2 == 0 else ASSISTANT} {t}" for i, t in enumerate(turns))


def write_lines(tmp_path, rows, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def refused(reader, path, lineno, *words):
    with pytest.raises(DataError) as info:
        reader(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{lineno}: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def gpt2_tokenizer(tmp_path) -> Tokenizer:
    """A GPT-2-mode tokenizer from a tiny local rank file: the bytes and one merge ("\\n\\n")."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"\n\n"] = 256
    path = str(tmp_path / "gpt2.tiktoken")
    save_ranks(ranks, path)
    return Tokenizer.gpt2(path)


# --- HH: parsing --------------------------------------------------------------------------------

def test_single_turn_pair(tmp_path):
    """One human turn: the prompt is that turn up to "Assistant:", the answers lose their space."""
    path = write_lines(tmp_path, [{"chosen": dialogue("Hi there?", "Hello! How can I help?"),
                                   "rejected": dialogue("Hi there?", "Go away.")}])
    assert read_prefs(path) == [{"prompt": "\n\nHuman: Hi there?\n\nAssistant:",
                                 "chosen": "Hello! How can I help?", "rejected": "Go away."}]


def test_multi_turn_pair_keeps_earlier_turns_in_the_prompt(tmp_path):
    """Earlier turns, assistant's included, stay in the prompt; answers that share their first
    words are still cut at the marker, not at the longest common prefix of the texts."""
    history = ("How do I bake bread?", "You need flour, water and yeast.", "How long?")
    path = write_lines(tmp_path, [{"chosen": dialogue(*history, "About 40 minutes at 220 C."),
                                   "rejected": dialogue(*history, "About a week.")}])
    [row] = read_prefs(path)
    assert row["prompt"] == dialogue(*history) + ASSISTANT
    assert row["prompt"].count(HUMAN) == 2 and row["prompt"].count(ASSISTANT) == 2
    assert (row["chosen"], row["rejected"]) == ("About 40 minutes at 220 C.", "About a week.")


turn = st.text(alphabet="ab :?\nHumanAssistté", min_size=1, max_size=12).filter(
    lambda t: t.strip() and HUMAN not in t and ASSISTANT not in t and not t.startswith(" "))


@given(history=st.lists(turn, max_size=4).map(lambda h: h[:len(h) // 2 * 2]),
       question=turn, chosen=turn, rejected=turn)
def test_split_puts_the_dialogue_back_together(history, question, chosen, rejected):
    """For any dialogue: prompt + " " + answer is the dialogue again, the prompt ends with the
    last "\\n\\nAssistant:" and holds every earlier turn, and the pair split agrees with each."""
    whole = dialogue(*history, question, chosen)
    prompt, answer = split_dialogue(whole)
    assert prompt + " " + answer == whole and answer == chosen
    assert prompt.endswith(ASSISTANT) and prompt.count(HUMAN) == len(history) // 2 + 1
    assert split_hh_pair(whole, dialogue(*history, question, rejected)) == (prompt, chosen,
                                                                             rejected)


BAD_HH = [  # (line, words in the error)
    ({"chosen": "Hello there", "rejected": dialogue("a", "b")},
     ["missing field 'prompt'", "'chosen' is not an Anthropic HH dialogue", "\\n\\nAssistant:"]),
    ({"chosen": dialogue("a", "b"), "rejected": "\n\nHuman: a"},
     ["'rejected' is not an Anthropic HH dialogue"]),
    ({"chosen": dialogue("a", "b"), "rejected": dialogue("other question", "c")},
     ["differ before their last"]),
    ({"chosen": dialogue("a", "b", "c"), "rejected": dialogue("a", "d")},
     ["ends with a '\\n\\nHuman:' turn"]),
    ({"chosen": dialogue("a", "b"), "rejected": "\n\nHuman: a\n\nAssistant:   "},
     ["final assistant turn of 'rejected' is empty"]),
    ({"chosen": dialogue("a", "b"), "rejected": dialogue("a", "b")}, ["the same text"]),
    ({"chosen": 7, "rejected": dialogue("a", "b")}, ["'chosen' must be a string"]),
]


@pytest.mark.parametrize("bad, words", BAD_HH, ids=lambda v: str(v)[:40])
def test_bad_hh_lines_name_file_and_line(tmp_path, bad, words):
    """A malformed HH line (after a good one and a blank line) is refused as path:3."""
    good = {"chosen": dialogue("q", "yes"), "rejected": dialogue("q", "no")}
    path = str(tmp_path / "hh.jsonl")
    open(path, "w").write(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    refused(read_prefs, path, 3, *words)


def test_forms_are_told_apart_line_by_line(tmp_path):
    """A 'prompt' field means the TRL form (its chosen may even hold markers); without one, the
    line is HH. SFT reads HH's chosen as the demonstration, prompt files its prompt."""
    hh = {"chosen": dialogue("2+2?", "4."), "rejected": dialogue("2+2?", "5."), "id": 9}
    trl = {"prompt": "Say hi.", "chosen": "Hi!" + ASSISTANT, "rejected": "No."}
    path = write_lines(tmp_path, [hh, trl])
    hh_prompt = "\n\nHuman: 2+2?\n\nAssistant:"
    assert read_prefs(path) == [{"prompt": hh_prompt, "chosen": "4.", "rejected": "5."},
                                {"prompt": "Say hi.", "chosen": "Hi!" + ASSISTANT,
                                 "rejected": "No."}]
    sft = write_lines(tmp_path, [{"chosen": hh["chosen"]}, {"prompt": "a", "completion": "b"}],
                      "sft.jsonl")
    assert read_sft(sft) == [{"prompt": hh_prompt, "completion": "4."},
                             {"prompt": "a", "completion": "b"}]
    assert read_prompts(path) == [{"prompt": hh_prompt}, {"prompt": "Say hi."}]
    refused(read_sft, write_lines(tmp_path, [{"chosen": "plain text"}], "bad.jsonl"), 1,
            "'chosen' is not an Anthropic HH dialogue")


# --- rendering with the GPT-2 template ----------------------------------------------------------

def test_gpt2_template_keeps_hh_prompts_and_tldr_whitespace(tmp_path):
    """An HH prompt is not wrapped twice: the rendered pair decodes to the original dialogue. A
    TL;DR response that starts with a space or a newline keeps it exactly; other prompts and
    responses get the template and one space, as before."""
    tok = gpt2_tokenizer(tmp_path)
    whole = dialogue("Hi", "Hello.", "Bye?", "Bye!")
    prompt, answer = split_dialogue(whole)
    ids, n_prompt = tok.render(prompt, answer)
    assert tok.render_prompt(prompt) == tok.encode(prompt) == ids[:n_prompt]
    assert tok.decode(ids[:-1]) == whole and ids[-1] == tok.end_id
    for tldr in (" a short summary", "\nfirst line"):
        ids, n_prompt = tok.render("POST: long text\nTL;DR:", tldr)
        assert tok.decode(ids[n_prompt:-1]) == tldr
        assert tok.decode(ids[:n_prompt]) == "\n\nHuman: POST: long text\nTL;DR:\n\nAssistant:"
    ids, n_prompt = tok.render("Hi", "Hello.")
    assert tok.decode(ids[n_prompt:-1]) == " Hello."
    path = write_lines(tmp_path, [{"prompt": "POST: x\nTL;DR:", "chosen": " yes",
                                   "rejected": "\nno"}])
    assert read_prefs(path, tok, max_len=64)[0]["rejected"] == "\nno"


# --- end to end: train_sft.py --init gpt2:DIR on HH data ------------------------------------------

def write_tiny_gpt2(folder, tok: Tokenizer) -> str:
    """A tiny random GPT-2 in HF layout (pytorch_model.bin) whose vocabulary fits `tok`, with
    the tokenizer's rank file beside it, as `gpt2:DIR` expects."""
    os.makedirs(folder)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    ours = GPT(cfg).transformer.state_dict()
    hf = {k: v.t().contiguous() if k.endswith(CONV1D) else v for k, v in ours.items()}
    torch.save(hf, os.path.join(folder, "pytorch_model.bin"))
    json.dump({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 96,
               "vocab_size": tok.vocab_size}, open(os.path.join(folder, "config.json"), "w"))
    tok.save(os.path.join(folder, "gpt2.tiktoken"))
    return str(folder)


def test_sft_starts_from_gpt2_on_hh_data(tmp_path):
    """`train_sft.py --init gpt2:DIR --data hh.jsonl` lowers the loss and writes a stage whose
    checkpoint reloads with GPT-2's tokenizer (saved beside it, so DIR is no longer needed) and
    the padded vocabulary. (--sft of the other scripts goes through the same load_stage.)"""
    tok = gpt2_tokenizer(tmp_path)
    gpt2_dir = write_tiny_gpt2(tmp_path / "gpt2", tok)
    rows = [{"chosen": dialogue(q, "Yes."), "rejected": dialogue(q, "No.")}
            for q in ("Hi?", "2+2?", "Red?", "Bye?")] * 3
    rows[0] = {"chosen": dialogue("Hi", "Hi!", "Ok?", "Yes."),          # one multi-turn line
               "rejected": dialogue("Hi", "Hi!", "Ok?", "No.")}
    hh = write_lines(tmp_path, rows, "hh.jsonl")
    sft = str(tmp_path / "sft")
    train_sft.main(["--init", f"gpt2:{gpt2_dir}", "--data", hh, "--out", sft, "--max-steps",
                    "4", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--log-every", "2",
                    "--eval-every", "4", "--ckpt-every", "2", "--device", "cpu"])
    model, back, ck = load_stage(sft, "gpt")
    assert ck["step"] == 4 and back.kind == "gpt2"
    assert back.fingerprint() == tok.fingerprint()
    assert os.path.isfile(os.path.join(sft, "tokenizer.tiktoken"))
    assert model.config.vocab_size == tok.vocab_size and model.config.padded_vocab_size == 50304
    losses = [r["loss"] for r in read_metrics(os.path.join(sft, "metrics.jsonl"))
              if r["split"] == "train"]
    assert len(losses) == 2 and losses[1] < losses[0]
    os.remove(os.path.join(gpt2_dir, "gpt2.tiktoken"))  # the stage needs only its own folder
    assert load_stage(sft, "gpt")[1].fingerprint() == tok.fingerprint()
