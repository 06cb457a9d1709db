"""`python -m minirlhf.chat` on tiny saved stages: one-prompt answers with the gold judge's
verdict, side-by-side comparison, the interactive loop, and one-line errors for bad folders."""
import io
import json
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


def test_temperature_nan_is_a_one_line_error(stages, capsys):
    """--temperature nan (or inf) ends in one line naming the flag, exit 2, not a traceback from
    the sampler."""
    for value in ("nan", "inf"):
        with pytest.raises(SystemExit) as e:
            chat.main([stages["sft"], "--prompt", WORLD_PROMPT, "--temperature", value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "--temperature" in err, err


def expected_reward(path, prompt, response):
    """The reward model's score of one response, computed here without chat.py."""
    from minirlhf.checkpoint import load_stage
    rm, tok, _ = load_stage(path, "scalar")
    ids = torch.tensor([tok.render(prompt, response)[0]])
    with torch.no_grad():
        return rm.eval().score(ids, torch.ones_like(ids, dtype=torch.bool)).item()


def test_score_prints_the_reward_and_the_gold_score(stages, capsys):
    """`chat score RM --prompt P --response R` prints the reward model's reward of R and, for a
    built-in world prompt, the gold judge's score beside it; another prompt gets no gold."""
    [row] = chat.main(["score", stages["rm"], "--prompt", WORLD_PROMPT, "--response", "Paris."])
    reward = expected_reward(stages["rm"], WORLD_PROMPT, "Paris.")
    assert row["reward"] == pytest.approx(reward, abs=1e-5)
    assert row["gold"] == gold_reward(WORLD_PROMPT, "Paris.")
    assert capsys.readouterr().out == (f"reward {row['reward']:+.3f} | gold {row['gold']:+.2f} "
                                       f"{'correct' if row['correct'] else 'wrong'}\n")
    [row] = chat.main(["score", stages["rm"], "--prompt", "Tell me a story.", "--response", "No."])
    assert row["gold"] is None and capsys.readouterr().out == f"reward {row['reward']:+.3f}\n"


def test_score_reads_responses_and_pairs_from_a_file_or_stdin(stages, tmp_path, capsys,
                                                              monkeypatch):
    """--data FILE (or piped JSONL) scores each line: a response gets its reward, a pair both
    rewards and whether the reward model prefers the chosen one; each printed line names
    FILE:LINE, and a last line counts the pairs it gets right."""
    lines = [{"prompt": WORLD_PROMPT, "response": "Paris."},
             {"prompt": WORLD_PROMPT, "chosen": "Paris.", "rejected": "It is Rome."},
             {"prompt": "Tell me a story.", "chosen": "Once upon a time.", "rejected": "No."}]
    path = tmp_path / "score.jsonl"
    text = "\n".join(json.dumps(x) for x in lines[:1]) + "\n\n" + "\n".join(
        json.dumps(x) for x in lines[1:]) + "\n"  # a blank line 2: the pairs are lines 3 and 4
    path.write_text(text)
    rows = chat.main(["score", stages["rm"], "--pairs", str(path)])
    out = capsys.readouterr().out.splitlines()
    assert [r["line"] for r in rows] == [1, 3, 4] and len(out) == 4
    for r, line, source in zip(rows, out, lines):
        assert line.startswith(f"{path}:{r['line']}  ")
        for key in ("response", "chosen", "rejected"):
            if key in source:
                name = "reward" if key == "response" else f"reward_{key}"
                assert r[name] == pytest.approx(
                    expected_reward(stages["rm"], source["prompt"], source[key]), abs=1e-5)
    for r, line in zip(rows[1:], out[1:]):
        assert r["prefers_chosen"] == (r["reward_chosen"] > r["reward_rejected"])
        assert ("prefers chosen" if r["prefers_chosen"] else "prefers rejected") in line
    assert rows[1]["gold_chosen"] == gold_reward(WORLD_PROMPT, "Paris.")
    assert rows[2]["gold_chosen"] is None and "gold" not in out[2]
    right = sum(r["prefers_chosen"] for r in rows[1:])
    assert out[-1] == (f"2 pairs: the reward model prefers the chosen response in {right} "
                       f"({right / 2:.1%})")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    piped = chat.main(["score", stages["rm"]])
    assert piped == rows
    assert capsys.readouterr().out.splitlines()[0].startswith("<stdin>:1  reward ")


@pytest.mark.parametrize("case", ["bad line", "missing file", "policy folder", "too long",
                                  "prompt without response"])
def test_score_errors_are_one_line(stages, tmp_path, capsys, case):
    """A bad line (named FILE:LINE), a missing file, a folder without a reward model, a response
    past the block size, a --prompt without --response: one line, no traceback."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" +
                    json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    argv, words, code = {
        "bad line": (["--data", str(path)], f"{path}:2: missing field 'rejected'", 1),
        "missing file": (["--data", str(tmp_path / "nope.jsonl")], "nope.jsonl: file not found",
                         1),
        "policy folder": (["--prompt", "a", "--response", "b"], "expected 'scalar'", 1),
        "too long": (["--prompt", "a", "--response", "b " * 100], "reads at most 64", 1),
        "prompt without response": (["--prompt", "a"], "--prompt and --response go together", 2),
    }[case]
    folder = stages["sft" if case == "policy folder" else "rm"]
    with pytest.raises(SystemExit) as e:
        chat.main(["score", folder, *argv])
    captured = capsys.readouterr()
    assert e.value.code == code and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("python -m minirlhf.chat score: error: ")
    assert words in captured.err and captured.out == ""


def test_chat_with_a_reward_model_points_to_score(stages, capsys):
    """`chat RM` (a reward model has no language model) is refused in one line that names the
    score subcommand."""
    with pytest.raises(SystemExit):
        chat.main([stages["rm"], "--prompt", WORLD_PROMPT])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"python -m minirlhf.chat score {stages['rm']}" in err
