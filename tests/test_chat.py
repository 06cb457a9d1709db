"""`python -m minirlhf.chat` on tiny saved stages: one-prompt answers with the gold judge's
verdict, side-by-side comparison, the interactive loop, and one-line errors for bad folders."""
import io
import os
import subprocess
import sys

import pytest
import torch

from minirlhf import chat
from minirlhf.checkpoint import save_stage
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel
from minirlhf.sampler import generate
from minirlhf.world import gold_reward, world_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Two tiny random GPT stages (sft, ppo) and a reward-model stage, with the world tokenizer."""
    root = tmp_path_factory.mktemp("stages")
    tok = world_tokenizer(512)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=16)
    paths = {}
    for seed, name in enumerate(("sft", "ppo")):
        torch.manual_seed(seed)
        paths[name] = str(root / name)
        save_stage(paths[name], model=GPT(cfg), model_kind="gpt", config={"note": "test"},
                   tokenizer=tok, step=0)
    paths["rm"] = str(root / "rm")
    save_stage(paths["rm"], model=ScalarHeadModel(cfg), model_kind="scalar",
               config={"note": "test"}, tokenizer=tok, step=0)
    return paths


def test_prompt_answers_once_and_exits_0(stages):
    """`chat DIR --prompt P` as a program: exit code 0, an answer and the gold verdict on stdout,
    nothing on stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "minirlhf.chat", stages["ppo"], "--prompt",
                        WORLD_PROMPT, "--max-new-tokens", "8"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and "[gold " in p.stdout
    assert p.stderr == ""


def test_world_prompt_gets_the_gold_judges_score(stages, capsys):
    """For a built-in world prompt the printed answer is followed by the gold judge's score of
    exactly that answer (end token taken into account); another prompt gets no score."""
    [r] = chat.main([stages["sft"], "--prompt", WORLD_PROMPT, "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert out.startswith(r["response"] + "\n")
    assert r["gold"] == gold_reward(WORLD_PROMPT, r["response"], r["ended"])
    assert f"[gold {r['gold']:+.2f} " in out
    [r] = chat.main([stages["sft"], "--prompt", "Tell me a story.", "--max-new-tokens", "12"])
    assert r["gold"] is None and "gold" not in capsys.readouterr().out


def test_greedy_answer_is_the_sampler_at_temperature_0(stages):
    """--greedy gives the same answer as sampler.generate at temperature 0 on the saved model,
    on every run."""
    from minirlhf.checkpoint import load_stage
    model, tok, _ = load_stage(stages["ppo"], "gpt")
    g = generate(model, [tok.render_prompt(WORLD_PROMPT)], 10, eos_id=tok.end_id,
                 pad_id=tok.pad_id, temperature=0)
    argv = [stages["ppo"], "--prompt", WORLD_PROMPT, "--greedy", "--max-new-tokens", "10"]
    first, second = chat.main(argv), chat.main(argv)
    assert first[0]["response"] == second[0]["response"] == tok.decode(g.responses()[0])


def test_seed_fixes_sampling(stages):
    """Sampling at temperature 1: the same --seed repeats the answer, other seeds give others."""
    def ans(seed):
        return chat.main([stages["ppo"], "--prompt", WORLD_PROMPT, "--seed", str(seed),
                          "--max-new-tokens", "10"])[0]["response"]
    assert ans(0) == ans(0)
    assert len({ans(s) for s in range(4)}) > 1


def test_compare_prints_one_line_per_stage(stages, capsys):
    """--compare with two folders answers with both: two lines, labelled with the folder names."""
    results = chat.main(["--compare", stages["sft"], stages["ppo"], "--prompt", WORLD_PROMPT,
                         "--max-new-tokens", "8", "--greedy"])
    lines = capsys.readouterr().out.splitlines()
    assert [r["stage"] for r in results] == ["sft", "ppo"]
    assert len(lines) == 2
    assert lines[0].startswith("  sft | ") and lines[1].startswith("  ppo | ")
    assert all("[gold " in line for line in lines)


def test_interactive_loop_stops_at_an_empty_line_or_eof(stages, monkeypatch, capsys):
    """Prompts are read from stdin until an empty line (what follows is not answered), "quit",
    or the end of input."""
    def run(text):
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
        res = chat.main([stages["sft"], "--max-new-tokens", "4"])
        return [r["prompt"] for r in res], capsys.readouterr().out

    prompts, out = run("What is 3 plus 4?\nhello\n\nWhat is 1 plus 1?\n")
    assert prompts == ["What is 3 plus 4?", "hello"]
    assert "> What is 3 plus 4?" in out
    assert run("What is 3 plus 4?\nquit\nhello\n")[0] == ["What is 3 plus 4?"]
    assert run("What is 3 plus 4?")[0] == ["What is 3 plus 4?"]


@pytest.mark.parametrize("bad", ["missing", "reward_model", "corrupt"])
def test_bad_folder_gives_one_line_and_exit_1(stages, tmp_path, capsys, bad):
    """A missing folder, a reward-model folder (no language model) or a corrupt checkpoint:
    exit code 1 and exactly one line on stderr naming the problem."""
    if bad == "missing":
        path = str(tmp_path / "nope")
    elif bad == "reward_model":
        path = stages["rm"]
    else:
        path = str(tmp_path / "corrupt")
        os.makedirs(path)
        with open(os.path.join(path, "checkpoint.pt"), "wb") as f:
            f.write(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        chat.main([path, "--prompt", WORLD_PROMPT])
    captured = capsys.readouterr()
    assert e.value.code == 1
    assert len(captured.err.strip().splitlines()) == 1 and "error:" in captured.err
    assert path in captured.err
    assert captured.out == ""


def test_prompt_too_long_for_the_model_is_a_one_line_error(stages, capsys):
    """A prompt longer than the model's block size: exit 1, one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as e:
        chat.main([stages["sft"], "--prompt", "What is 3 plus 4? " * 40])
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1
    assert "at most 64" in err
