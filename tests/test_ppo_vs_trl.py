"""benchmarks/ppo_vs_trl.py without TRL: our side of the comparison runs train_ppo.py's own
phases on the benchmark's work (every response exactly --new-tokens long), and without a TRL
that has PPOTrainer the benchmark stops with one line saying how to install it."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import ppo_vs_trl  # noqa: E402
from minirlhf.model import GPTConfig  # noqa: E402
from minirlhf.world import World, world_tokenizer  # noqa: E402


def test_our_iteration_runs_the_scripts_phases_on_fixed_length_responses():
    cfg = ppo_vs_trl.BenchConfig(prompts=2, samples=2, new_tokens=5, epochs=2, minibatches=2)
    tok = world_tokenizer(512)
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2,
                          n_embd=32)
    texts = [p.text for p in World(0).train_prompts[:cfg.prompts]]
    step, clock = ppo_vs_trl.ours_runner(model_cfg, texts, tok, cfg, torch.device("cpu"), "fp32")
    step(False)
    step(True)
    step(True)
    times = clock.times
    assert set(times) == {"generate", "score", "advantages", "update", "total"}
    assert all(len(v) == 2 and min(v) > 0 for v in times.values())
    pcfg = ppo_vs_trl.ppo_config(cfg)
    assert (pcfg.epochs, pcfg.minibatch_size, pcfg.max_new_tokens) == (2, 2, 5)


def test_never_ends_keeps_the_tokenizer_but_its_end_id():
    from rlhf_step import NeverEnds
    tok = world_tokenizer(512)
    never = NeverEnds(tok)
    assert never.end_id == -1 and never.pad_id == tok.pad_id
    assert never.render_prompt("Hi?") == tok.render_prompt("Hi?")


def test_without_a_trl_that_has_ppo_it_says_how_to_install_one(monkeypatch, capsys):
    monkeypatch.setattr(ppo_vs_trl, "hf_available", lambda *names: ["trl"])
    with pytest.raises(SystemExit) as e:
        ppo_vs_trl.main(["--device", "cpu", "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "trl==1.12.0" in err[0] and "--target" in err[0]


@pytest.mark.parametrize("flags", [["--minibatches", "3"], ["--iterations", "0"]])
def test_nonsense_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as e:
        ppo_vs_trl.main(["--device", "cpu"] + flags)
    assert e.value.code == 2 and "error" in capsys.readouterr().err
