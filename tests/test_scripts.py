"""End-to-end runs of the four scripts on tiny settings: each finishes, writes its checkpoint and
metrics, and a run interrupted right after a checkpoint resumes to the same weights as a run
that was never interrupted (CPU, same seed)."""
import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

import train_dpo
import train_ppo
import train_rm
import train_sft
from minirlhf import training
from minirlhf.checkpoint import load_checkpoint, load_stage
from minirlhf.config import format_config, parse_config
from minirlhf.data import DataError, read_prefs
from minirlhf.training import read_metrics
from minirlhf.world import pair_label_prob

TINY_SFT = dict(n_layer=1, n_head=2, n_embd=32, max_steps=60, n_examples=1000, batch_size=32,
                log_every=20, eval_every=30, ckpt_every=20, n_show=1, max_new_tokens=32,
                warmup=10, device="cpu")


class Interrupted(Exception):
    """Stands in for a SIGKILL that lands right after a checkpoint write."""


def interrupt_after_saves(monkeypatch, module, name, n):
    """Make `module.name` (a save function) raise after its n-th call has finished writing."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            raise Interrupted
        return out
    monkeypatch.setattr(module, name, wrapped)


def same_weights(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft"))
    train_sft.train(train_sft.SFTConfig(out=out, **TINY_SFT))
    return out


def test_sft_writes_checkpoint_metrics_and_eval(sft_dir):
    """A tiny SFT run leaves a loadable checkpoint at its last step, metrics for every logged
    step exactly once, and an eval.json with the gold numbers; it has learned to end answers."""
    model, tok, ck = load_stage(sft_dir, "gpt")
    assert ck["step"] == TINY_SFT["max_steps"]
    rows = read_metrics(os.path.join(sft_dir, "metrics.jsonl"))
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == [20, 40, 60]
    ev = json.load(open(os.path.join(sft_dir, "eval.json")))
    assert set(ev["sampled"]) >= {"gold", "accuracy", "length", "ended"}
    assert rows[0]["loss"] > rows[-1]["loss"]
    assert ev["sampled"]["ended"] > 0.5  # the chat format is learned: answers stop


def test_sft_resume_matches_uninterrupted(tmp_path, monkeypatch, sft_dir):
    """Interrupted after the checkpoint at step 20, then --resume: the final weights equal those of
    the uninterrupted run, and metrics.jsonl has each step once."""
    out = str(tmp_path / "sft")
    cfg = train_sft.SFTConfig(out=out, **TINY_SFT)
    interrupt_after_saves(monkeypatch, training, "save_stage", 1)  # via save_run
    with pytest.raises(Interrupted):
        train_sft.train(cfg)
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 20
    monkeypatch.undo()
    train_sft.train(dataclasses.replace(cfg, resume=True))
    assert same_weights(os.path.join(out, "checkpoint.pt"), os.path.join(sft_dir, "checkpoint.pt"))
    steps = [r["step"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))
             if r["split"] == "train"]
    assert steps == [20, 40, 60]


def test_a_run_starts_with_one_line_and_writes_its_config(tmp_path, capsys, monkeypatch):
    """A run prints one line before its work, not its config: the folder, the device and
    precision, the length and where the config is. OUT/config.json holds the whole config before
    the first step; --verbose prints every field as well."""
    out = str(tmp_path / "sft")
    argv = ["--out", out, "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-steps", "2",
            "--n-examples", "64", "--batch-size", "16", "--n-show", "0", "--max-new-tokens", "8",
            "--device", "cpu", "--precision", "fp32"]
    seen = []
    real = train_sft.forward_backward

    def first_step(*args):  # what OUT holds when the first step starts
        seen.append(sorted(os.listdir(out)))
        return real(*args)
    monkeypatch.setattr(train_sft, "forward_backward", first_step)
    train_sft.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"train_sft.py: {out} | cpu, float32 | 2 steps | config: "
                        f"{out}/config.json (--verbose prints it)")
    assert lines[1].startswith("model: ")  # the next line is the run's own
    assert "config.json" in seen[0] and "checkpoint.pt" not in seen[0]
    cfg = parse_config(train_sft.SFTConfig, argv, "train_sft.py")
    assert json.load(open(os.path.join(out, "config.json"))) == dataclasses.asdict(cfg)
    train_sft.main(argv + ["--overwrite", "--verbose"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"train_sft.py: {out} | cpu, float32 | 2 steps | starting over "
                        f"(--overwrite) | config: {out}/config.json")
    dump = format_config(dataclasses.replace(cfg, overwrite=True, verbose=True))
    assert lines[1:1 + len(dump.splitlines())] == dump.splitlines()
    assert "  verbose          = True" in lines


def test_sft_keeps_the_model_of_the_lowest_validation_loss_in_best_pt(tmp_path, monkeypatch):
    """OUT/best.pt holds the model of the evaluation with the lowest validation loss (here the
    second of three), while checkpoint.pt stays the latest; eval.json names that step and its
    loss, as the validation rows of metrics.jsonl have them."""
    val_losses = iter([3.0, 1.0, 2.0])
    real_loss, real_save, saved = train_sft.validation_loss, train_sft.save_run, {}
    monkeypatch.setattr(train_sft, "validation_loss",
                        lambda *args: (real_loss(*args), next(val_losses))[1])

    def save_run(cfg, step, model, *args, **kwargs):  # the weights of every checkpoint.pt
        real_save(cfg, step, model, *args, **kwargs)
        if kwargs.get("path") is None:
            saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(train_sft, "save_run", save_run)
    out = str(tmp_path / "sft")
    train_sft.train(train_sft.SFTConfig(out=out, **{**TINY_SFT, "max_steps": 6, "eval_every": 2,
                                                    "ckpt_every": 2, "n_show": 0}))
    best, last = (load_checkpoint(os.path.join(out, n)) for n in ("best.pt", "checkpoint.pt"))
    assert best["step"] == 4 and last["step"] == 6
    assert all(torch.equal(best["model"][k], saved[4][k]) for k in saved[4])
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in saved[4])
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert (ev["best_step"], ev["best_val_loss"]) == (4, 1.0)
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [(r["step"], r["loss"]) for r in rows if r["split"] == "val"] == [(2, 3.0), (4, 1.0),
                                                                            (6, 2.0)]
    model, _, ck = load_stage(os.path.join(out, "best.pt"), "gpt")  # a stage file like any other
    assert ck["extra"] == {"best_step": 4, "best_val_loss": 1.0}


RM = dict(make_pairs=True, n_pairs=48, n_val_pairs=16, n_test_pairs=32, max_new_tokens=32,
          max_steps=8, batch_size=8, eval_every=4, patience=5, device="cpu")


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory, sft_dir):
    out = str(tmp_path_factory.mktemp("rm"))
    train_rm.train(train_rm.RMConfig(out=out, sft=sft_dir, **RM))
    return out


def test_rm_makes_pairs_and_trains(rm_dir):
    """--make-pairs writes the three preference files; training writes a scalar checkpoint and an
    eval.json with test accuracy, the Bayes limit and a calibration table."""
    for name, n in (("prefs.jsonl", 48), ("prefs_val.jsonl", 16), ("prefs_test.jsonl", 32)):
        rows = [json.loads(l) for l in open(os.path.join(rm_dir, name))]
        assert len(rows) == n and all(r["chosen"] != r["rejected"] for r in rows)
    model, _, ck = load_stage(rm_dir, "scalar")
    assert ck["extra"]["finished"]
    ev = json.load(open(os.path.join(rm_dir, "eval.json")))
    assert 0 <= ev["test_accuracy"] <= 1 and 0.5 <= ev["bayes_accuracy"] <= 1
    assert sum(r["n"] for r in ev["calibration"]) == 2 * 32  # every pair, both orders
    assert ev["labels"] == {"labeller": "human"}
    assert not [n for n in os.listdir(rm_dir) if n.endswith("_ai.jsonl")]


def test_rm_noise_free_labels_train_on_the_labellers_probability(tmp_path, monkeypatch, sft_dir,
                                                                 rm_dir):
    """--noise-free-labels hands reward_loss the world's P(chosen ≻ rejected) for every pair of
    each batch, and refuses pairs whose prompts are not the built-in world's, naming the file."""
    scored, seen = [], []
    real_score, real_loss = train_rm.score_pairs, train_rm.reward_loss

    def score_spy(score, pairs, tok, device):
        scored.append(pairs)
        return real_score(score, pairs, tok, device)

    def loss_spy(r_w, r_l, p_chosen=None):
        seen.append((scored[-1], p_chosen))
        return real_loss(r_w, r_l, p_chosen)

    monkeypatch.setattr(train_rm, "score_pairs", score_spy)
    monkeypatch.setattr(train_rm, "reward_loss", loss_spy)
    data = os.path.join(rm_dir, "prefs.jsonl")
    rows = [json.loads(l) for l in open(data)]
    cfg = train_rm.RMConfig(out=str(tmp_path / "rm"), sft=sft_dir, data=data,
                            **{**RM, "make_pairs": False, "noise_free_labels": True})
    train_rm.train(cfg)
    _, tok, _ = load_stage(sft_dir, "gpt")
    prob = {(tuple(c), tuple(r)): pair_label_prob((row["prompt"], row["chosen"], row["rejected"]))
            for (c, r), row in zip(train_rm.encode_pairs(rows, tok), rows)}
    steps = [(pairs, p) for pairs, p in seen if p is not None]  # evaluation passes no p
    assert len(steps) == RM["max_steps"]
    for pairs, p in steps:  # each pair's own labeller probability, in the batch's order
        expected = [prob[(tuple(c), tuple(r))] for c, r in pairs]
        torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float32))
    assert any(v < 0.99 for _, p in steps for v in p.tolist())  # not hard labels in disguise
    outside = tmp_path / "outside.jsonl"
    outside.write_text(json.dumps({"prompt": "Who wrote Hamlet?", "chosen": "Shakespeare.",
                                   "rejected": "Dickens."}) + "\n")
    with pytest.raises(DataError, match="outside.jsonl: record 1: --noise-free-labels needs the "
                                        "built-in world's prompts, not 'Who wrote Hamlet\\?'"):
        train_rm.train(dataclasses.replace(cfg, data=str(outside), out=str(tmp_path / "rm2")))


def judge_rewards(judge, tok, rows):
    """(r_a, r_b) of each row's (chosen, rejected), each response scored alone."""
    def reward(ids):
        tokens = torch.tensor([ids])
        return judge.score(tokens, torch.ones_like(tokens, dtype=torch.bool)).item()
    with torch.no_grad():
        return [[reward(tok.render(r["prompt"], r[k])[0]) for k in ("chosen", "rejected")]
                for r in rows]


@pytest.mark.parametrize("greedy", [False, True])
def test_rm_trains_on_a_judges_labels(tmp_path, capsys, sft_dir, rm_dir, greedy):
    """--labeller ai:DIR (RLAIF, lecture ch. 8), rm_dir's reward model as the judge: the
    training and validation pairs are relabelled and written to OUT/prefs_ai.jsonl and
    prefs_val_ai.jsonl (the same prompts and texts; each label what σ(r_a − r_b) and the rng
    of --seed give, or with --judge-greedy the higher reward), eval.json says who labelled and
    how often the judge agreed with the human labels, and the test pairs stay the human ones."""
    data = {name: os.path.join(rm_dir, f"prefs{name}.jsonl") for name in ("", "_val", "_test")}
    out = str(tmp_path / "rm_ai")
    cfg = train_rm.RMConfig(out=out, sft=sft_dir, data=data[""], val_data=data["_val"],
                            test_data=data["_test"], labeller=f"ai:{rm_dir}", judge_greedy=greedy,
                            precision="fp32", **{**RM, "make_pairs": False, "max_steps": 4,
                                                 "eval_every": 2, "eval_samples": 1})
    res = train_rm.train(cfg)
    ev = json.load(open(os.path.join(out, "eval.json")))
    labels = ev["labels"]
    assert labels == res["labels"] and set(labels) == {
        "labeller", "greedy", "n_pairs", "agreement", "expected_agreement", "human_agreement",
        "n_val_pairs", "val_agreement"}
    assert (labels["labeller"], labels["greedy"]) == (f"ai:{rm_dir}", greedy)
    assert (labels["n_pairs"], labels["n_val_pairs"]) == (48, 16)
    assert all(0 <= labels[k] <= 1 for k in ("agreement", "expected_agreement", "val_agreement"))
    assert 0.5 <= labels["human_agreement"] <= 1
    printed = capsys.readouterr().out
    assert (f"labels: ai judge {rm_dir}{' (greedy)' if greedy else ''}: agreement with the "
            f"given labels {labels['agreement']:.3f} (expected "
            f"{labels['expected_agreement']:.3f}; two human labellers agree "
            f"{labels['human_agreement']:.3f} on the same pairs) on 48 pairs") in printed
    judge, tok, _ = load_stage(rm_dir, "scalar")
    judge.eval()
    for name, given, seed in (("prefs_ai.jsonl", data[""], [0, 8]),
                              ("prefs_val_ai.jsonl", data["_val"], [0, 9])):
        rows, new = read_prefs(given), read_prefs(os.path.join(out, name))
        assert [r["prompt"] for r in new] == [r["prompt"] for r in rows]
        assert all({r["chosen"], r["rejected"]} == {o["chosen"], o["rejected"]}
                   for r, o in zip(new, rows))
        rewards = judge_rewards(judge, tok, rows)
        if greedy:
            a_chosen = [r_a >= r_b for r_a, r_b in rewards]
        else:
            u = np.random.default_rng(seed).random(len(rows))
            a_chosen = [ui < 1 / (1 + math.exp(r_b - r_a)) for ui, (r_a, r_b) in zip(u, rewards)]
        assert [r["chosen"] == o["chosen"] for r, o in zip(new, rows)] == a_chosen
        if name == "prefs_ai.jsonl":
            assert labels["agreement"] == pytest.approx(np.mean(a_chosen))
    rm, _, _ = load_stage(out, "scalar")  # test accuracy: on the human-labelled test pairs
    test = train_rm.evaluate_pairs(rm, train_rm.encode_pairs(read_prefs(data["_test"]), tok),
                                   tok, "cpu", cfg.batch_size)
    assert ev["test_accuracy"] == test["accuracy"] and ev["n_test_pairs"] == 32
    assert "bayes_accuracy" in ev


def test_rm_judges_pairs_belong_to_the_run(tmp_path, monkeypatch, sft_dir, rm_dir):
    """OUT/prefs_ai.jsonl and prefs_val_ai.jsonl are the run's own files, not input pairs: a run
    that stops at its first step takes them with it (and the folder it made), and --overwrite
    removes them before a run on human labels."""
    cfg = train_rm.RMConfig(out=str(tmp_path / "rm_ai"), sft=sft_dir, labeller=f"ai:{rm_dir}",
                            data=os.path.join(rm_dir, "prefs.jsonl"),
                            val_data=os.path.join(rm_dir, "prefs_val.jsonl"),
                            **{**RM, "make_pairs": False, "max_steps": 2, "eval_every": 2,
                               "eval_samples": 1})

    def diverged(*args):
        raise training.NonFiniteError("step 1: loss is nan")
    monkeypatch.setattr(train_rm, "optimizer_step", diverged)
    with pytest.raises(training.NonFiniteError):
        train_rm.train(cfg)
    assert not os.path.exists(cfg.out)
    monkeypatch.undo()
    train_rm.train(cfg)
    assert {"prefs_ai.jsonl", "prefs_val_ai.jsonl"} <= set(os.listdir(cfg.out))
    train_rm.train(dataclasses.replace(cfg, labeller="human", overwrite=True))
    assert not [n for n in os.listdir(cfg.out) if n.endswith("_ai.jsonl")]
    assert json.load(open(os.path.join(cfg.out, "eval.json")))["labels"] == {"labeller": "human"}


@pytest.mark.parametrize("noise_free_labels, labeller", [(False, None), (True, None),
                                                        (False, "ai")])
def test_rm_resume_matches_uninterrupted(tmp_path, monkeypatch, sft_dir, rm_dir, noise_free_labels,
                                         labeller):
    """An RM run interrupted after its first checkpoint resumes to the same final weights (on
    a judge's labels too: the resumed run draws the same ones)."""
    out = str(tmp_path / "rm")
    cfg = train_rm.RMConfig(out=out, sft=sft_dir, data=os.path.join(rm_dir, "prefs.jsonl"),
                            val_data=os.path.join(rm_dir, "prefs_val.jsonl"),
                            labeller=f"ai:{rm_dir}" if labeller else "human",
                            **{**RM, "make_pairs": False, "noise_free_labels": noise_free_labels})
    reference = str(tmp_path / "rm_ref")
    train_rm.train(dataclasses.replace(cfg, out=reference))
    interrupt_after_saves(monkeypatch, training, "save_stage", 1)  # via save_run
    with pytest.raises(Interrupted):
        train_rm.train(cfg)
    monkeypatch.undo()
    train_rm.train(dataclasses.replace(cfg, resume=True))
    assert same_weights(os.path.join(out, "checkpoint.pt"),
                        os.path.join(reference, "checkpoint.pt"))
    for name in ("prefs_ai.jsonl", "prefs_val_ai.jsonl") if labeller else ():
        assert open(os.path.join(out, name)).read() == open(os.path.join(reference, name)).read()


def test_rm_pairs_only_then_training_into_the_same_folder(tmp_path, sft_dir, capsys):
    """Preference files written by --pairs-only do not make a folder a used run: training on
    OUT/prefs.jsonl into the same OUT starts without --overwrite (and keeps the pairs); a second
    training run there is refused in one line."""
    out = str(tmp_path / "rm")
    train_rm.train(train_rm.RMConfig(out=out, sft=sft_dir, **{**RM, "pairs_only": True}))
    assert sorted(os.listdir(out)) == ["prefs.jsonl", "prefs_test.jsonl", "prefs_val.jsonl"]
    pairs = open(os.path.join(out, "prefs.jsonl")).read()
    argv = ["--sft", sft_dir, "--data", os.path.join(out, "prefs.jsonl"), "--out", out,
            "--max-steps", "4", "--batch-size", "8", "--eval-every", "2", "--device", "cpu"]
    train_rm.main(argv)
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 4
    assert open(os.path.join(out, "prefs.jsonl")).read() == pairs
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_rm.main(argv)
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"train_rm.py: error: {out} already holds a run (checkpoint.pt); pass --resume to "
        f"continue it or --overwrite to start over\n")


PPO = dict(iterations=4, prompts_per_iter=4, samples_per_prompt=2, max_new_tokens=32,
           minibatch_size=4, eval_every=2, ckpt_every=2, device="cpu")


@pytest.mark.parametrize("advantage", ["gae", "bandit", "group"])
def test_ppo_runs_each_advantage_mode(tmp_path, sft_dir, rm_dir, advantage):
    """A few PPO iterations in each advantage mode: finite diagnostics every iteration, the
    policy moves away from the reference, and eval.json has gold, KL and the proxy reward."""
    out = str(tmp_path / advantage)
    res = train_ppo.train(train_ppo.PPOConfig(out=out, sft=sft_dir, rm=rm_dir,
                                              advantage=advantage, **PPO))
    rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    def no_constants(name):  # strict JSON: NaN or Infinity in a line is a bug
        raise AssertionError(f"metrics.jsonl holds {name}")
    for line in open(os.path.join(out, "metrics.jsonl")):
        json.loads(line, parse_constant=no_constants)
    for r in rows:
        for key in ("proxy", "kl", "approx_kl", "clipfrac", "entropy", "time_update"):
            assert r[key] == r[key] and abs(r[key]) < 1e6, (key, r[key])
    assert rows[-1]["approx_kl"] > 0
    assert {"gold", "accuracy", "kl"} <= set(res["sampled"]) and "test_proxy" in res
    policy, _, _ = load_stage(out, "gpt")
    ref, _, _ = load_stage(sft_dir, "gpt")
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), ref.parameters()))


@pytest.mark.parametrize("reward,advantage", [("verifier", "gae"), ("gold", "gae"),
                                               ("verifier", "grpo"), ("rm", "grpo")])
def test_ppo_from_a_grader_and_grpo(tmp_path, sft_dir, rm_dir, reward, advantage, capsys):
    """--reward verifier|gold loads no reward model (--rm points nowhere) and starts the value
    model from the SFT trunk; --advantage grpo trains no value model (none in the checkpoint)
    and logs its k3 KL loss term. The logged reward of each rollout is the grader's own: the
    verifier's is the rollout's accuracy, gold's is gold / T."""
    out = str(tmp_path / f"{reward}_{advantage}")
    cfg = train_ppo.PPOConfig(out=out, sft=sft_dir, advantage=advantage, reward=reward,
                              rm=rm_dir if reward == "rm" else str(tmp_path / "none"), **PPO)
    res = train_ppo.train(cfg)
    rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["split"] == "train"]
    assert len(rows) == 4
    for r in rows:
        if reward == "verifier":  # R = 1{right} (the no-end penalty is added after it)
            assert r["proxy"] == pytest.approx(r["accuracy"], abs=1e-6)
        if reward == "gold":
            assert r["proxy"] == pytest.approx(r["gold"] / 0.25, abs=1e-5)
        if advantage == "grpo":
            assert r["kl_loss"] >= 0 and "value_loss" not in r
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ("value_model" in ck["extra"]) == (advantage != "grpo")
    assert ck["config"]["reward"] == reward and "test_proxy" in res
    assert f"| {reward} " in capsys.readouterr().out


def test_ppo_with_your_own_verifier_function(tmp_path, sft_dir, monkeypatch):
    """--reward verifier --verifier file.py:fn on prompts of your own: the function (prompt,
    response) -> number is the reward, logged as the rollouts' mean and written to
    samples.jsonl; a function that returns NaN stops the run with one line naming the prompt."""
    (tmp_path / "checks.py").write_text(
        "def length_reward(prompt, response):\n    return len(response) / 100\n"
        "def broken(prompt, response):\n    return float('nan')\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say a word number {i}."}) + "\n"
                               for i in range(40)))
    out = str(tmp_path / "own")
    cfg = train_ppo.PPOConfig(out=out, sft=sft_dir, reward="verifier", prompts=str(prompts),
                              verifier=f"{tmp_path / 'checks.py'}:length_reward", **PPO)
    train_ppo.train(cfg)
    samples = [json.loads(l) for l in open(os.path.join(out, "samples.jsonl"))]
    assert samples and all(r["reward"] == pytest.approx(len(r["response"]) / 100, abs=1e-6)
                           for r in samples)
    bad = dataclasses.replace(cfg, out=str(tmp_path / "bad"),
                              verifier=f"{tmp_path / 'checks.py'}:broken")
    with pytest.raises(ValueError, match="returned nan for prompt 'Say a word"):
        train_ppo.train(bad)


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_resume_matches_uninterrupted(tmp_path, monkeypatch, sft_dir, rm_dir, advantage):
    """PPO interrupted after the checkpoint at iteration 2 resumes (policy, value model, optimisers,
    KL controller) to the same final policy as an uninterrupted run; GRPO too, without a value
    model."""
    cfg = train_ppo.PPOConfig(out=str(tmp_path / "a"), sft=sft_dir, rm=rm_dir, adaptive_kl=True,
                              advantage=advantage, **PPO)
    train_ppo.train(cfg)
    cut = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    interrupt_after_saves(monkeypatch, train_ppo, "save_stage", 1)
    with pytest.raises(Interrupted):
        train_ppo.train(cut)
    monkeypatch.undo()
    train_ppo.train(dataclasses.replace(cut, resume=True))
    assert same_weights(str(tmp_path / "a" / "checkpoint.pt"),
                        str(tmp_path / "b" / "checkpoint.pt"))
    a = load_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))["extra"]
    b = load_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))["extra"]
    assert a["kl_controller"] == b["kl_controller"]
    assert ("value_model" in a) == ("value_model" in b) == (advantage == "gae")
    assert all(torch.equal(a["value_model"][k], b["value_model"][k])
               for k in a.get("value_model", {}))


DPO = dict(max_steps=6, batch_size=8, eval_every=3, ckpt_every=3, max_new_tokens=32, device="cpu")


def test_dpo_trains_and_resumes(tmp_path, monkeypatch, sft_dir, rm_dir):
    """DPO on the RM stage's pairs: the training implicit-reward margin grows from 0, eval.json has
    the test-pair accuracy and the gold numbers, and an interrupted run resumes to the same
    weights as an uninterrupted one."""
    # one batch of 8 pairs seen at every step, so the last step's margin is measured on pairs the
    # policy has trained on (a fresh batch's margin is generalisation, and may be either sign)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    lines = open(os.path.join(rm_dir, "prefs.jsonl")).readlines()[:DPO["batch_size"]]
    (data_dir / "prefs.jsonl").write_text("".join(lines))
    for name in ("prefs_val.jsonl", "prefs_test.jsonl"):
        shutil.copy(os.path.join(rm_dir, name), data_dir / name)
    data = str(data_dir / "prefs.jsonl")
    cfg = train_dpo.DPOConfig(out=str(tmp_path / "a"), sft=sft_dir, data=data, **DPO)
    res = train_dpo.train(cfg)
    assert "accuracy" in res["test_pairs"] and "kl" in res["sampled"]
    rows = [r for r in read_metrics(str(tmp_path / "a" / "metrics.jsonl")) if r["split"] == "train"]
    assert rows[-1]["margin"] > 0  # the policy moved toward the chosen responses
    cut = dataclasses.replace(cfg, out=str(tmp_path / "b"))
    interrupt_after_saves(monkeypatch, training, "save_stage", 1)  # via save_run
    with pytest.raises(Interrupted):
        train_dpo.train(cut)
    monkeypatch.undo()
    train_dpo.train(dataclasses.replace(cut, resume=True))
    assert same_weights(str(tmp_path / "a" / "checkpoint.pt"),
                        str(tmp_path / "b" / "checkpoint.pt"))


def test_dpo_logs_its_loss_and_rpo_term_apart(tmp_path, capsys, sft_dir, rm_dir):
    """Train and val rows of metrics.jsonl hold the DPO term ("dpo_loss") and the chosen
    responses' per-token NLL ("rpo_nll") beside the total, loss = dpo_loss + α·rpo_nll in both;
    the val row's terms are those of the validation pairs under the model of that step, and the
    printed line shows the parts."""
    out = str(tmp_path / "dpo")
    cfg = train_dpo.DPOConfig(out=out, sft=sft_dir, data=os.path.join(rm_dir, "prefs.jsonl"),
                              precision="fp32", **{**DPO, "max_steps": 4, "ckpt_every": 2,
                                                   "eval_every": 2})
    train_dpo.train(cfg)
    rows = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert {(r["step"], r["split"]) for r in rows} == {(s, t) for s in (2, 4)
                                                       for t in ("train", "val")}
    for r in rows:
        assert r["loss"] == pytest.approx(r["dpo_loss"] + cfg.rpo_alpha * r["rpo_nll"], rel=1e-5)
        assert 0 < r["dpo_loss"] < r["loss"] and r["rpo_nll"] > 0
    policy, tok, ck = load_stage(out, "gpt")  # the model of step 4, validated at step 4
    ref, _, _ = load_stage(sft_dir, "gpt")
    pairs = train_dpo.encode_pairs(read_prefs(os.path.join(rm_dir, "prefs_val.jsonl")), tok)
    with torch.no_grad():
        c, r = train_dpo.response_logprobs(policy, pairs, tok, "cpu")
        ref_c, ref_r = train_dpo.response_logprobs(ref, pairs, tok, "cpu")
    margin = (c - ref_c) - (r - ref_r)
    n_tokens = sum(len(w) - n for w, _, n in pairs)
    val = [r for r in rows if r["split"] == "val"][-1]
    assert val["rpo_nll"] == pytest.approx(-c.sum().item() / n_tokens, rel=1e-4)
    assert val["dpo_loss"] == pytest.approx(
        -torch.nn.functional.logsigmoid(cfg.beta * margin).mean().item(), rel=1e-4)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert f"loss {rows[-2]['loss']:.4f} = dpo {rows[-2]['dpo_loss']:.4f} + 2·nll" in printed[-1]
    assert f"val loss {val['loss']:.4f} = dpo {val['dpo_loss']:.4f} + 2·nll" in printed[-1]


def test_explain_prints_each_token(sft_dir, capsys):
    """--explain shows one line per response token (end token included) with p and −log p, and
    the mean equals L_SFT for that example."""
    rows = train_sft.explain(sft_dir, "What is 3 plus 4?", "3 plus 4 is 7.", color=False)
    out = capsys.readouterr().out
    _, tok, _ = load_stage(sft_dir, "gpt")
    ids, n_prompt = tok.render("What is 3 plus 4?", "3 plus 4 is 7.")
    assert len(rows) == len(ids) - n_prompt
    assert rows[-1]["token"] == "<|end|>"
    mean = sum(r["loss"] for r in rows) / len(rows)
    assert f"{mean:.4f}" in out
    assert all(abs(r["p"] - torch.exp(torch.tensor(-r["loss"])).item()) < 1e-6 for r in rows)


def test_explain_refuses_an_example_longer_than_the_model_reads(sft_dir, capsys):
    """--explain with a response past the block size ends in one line saying so, not a
    traceback."""
    with pytest.raises(SystemExit) as e:
        train_sft.main(["--explain", sft_dir, "What is 3 plus 4?", "seven " * 100])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1
    assert err.startswith("train_sft.py: error: prompt and response are ")
    assert err.endswith("tokens; this model reads at most 96 (its block size)\n")


def test_sft_starts_from_a_tokenizer_trained_on_your_text(tmp_path):
    """train_sft.py --tokenizer DIR builds its model on that tokenizer (and saves it beside the
    checkpoint); --tokenizer with --init is refused, since both would choose the tokenizer."""
    from minirlhf.tokenizer import Tokenizer, main as tokenizer_main
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Double {w}", "completion": w + w}) + "\n"
                            for w in ("ab", "cd", "xyz", "qq") * 10))
    tok = tokenizer_main(["train", "--data", str(data), "--vocab-size", "270",
                          "--out", str(tmp_path / "tok")])
    out = str(tmp_path / "sft")
    train_sft.train(train_sft.SFTConfig(out=out, data=str(data), tokenizer=str(tmp_path / "tok"),
                                        **{**TINY_SFT, "max_steps": 4, "n_show": 0}))
    model, saved_tok, _ = load_stage(out, "gpt")
    assert saved_tok.fingerprint() == tok.fingerprint()
    assert model.config.vocab_size == tok.vocab_size == 275
    assert Tokenizer.load(os.path.join(out, "tokenizer.tiktoken")).fingerprint() == \
        tok.fingerprint()
    with pytest.raises(ValueError, match="--tokenizer and --init"):
        train_sft.SFTConfig(tokenizer=str(tmp_path / "tok"), init=out).check()


ONLINE = dict(DPO, rounds=3, round_steps=4, round_pairs=12, round_samples=3, eval_samples=2)


def test_online_dpo_rounds_tile_the_steps():
    """Round r trains steps first+1 .. last of `round_span`; the spans tile 0 .. total_steps
    without gap or overlap, round 1 is --max-steps long and the others --round-steps, and
    `round_at` (where a resumed run picks up) names the round of the next step."""
    for max_steps, round_steps, rounds in [(6, 4, 3), (1, 1, 1), (600, 100, 5), (7, 3, 2)]:
        cfg = train_dpo.DPOConfig(max_steps=max_steps, round_steps=round_steps, rounds=rounds)
        spans = [train_dpo.round_span(r, cfg) for r in range(1, rounds + 1)]
        assert spans[0] == (0, max_steps) and spans[-1][1] == cfg.total_steps
        assert all(a[1] == b[0] and b[1] - b[0] == round_steps for a, b in zip(spans, spans[1:]))
        for step in range(cfg.total_steps + 1):
            rnd = train_dpo.round_at(step, cfg)
            if step == cfg.total_steps:
                assert rnd == rounds + 1
            else:
                assert spans[rnd - 1][0] <= step < spans[rnd - 1][1]


def dpo_pairs_dir(tmp_path, rm_dir):
    """The RM stage's pairs with the world's prompts, in a folder of their own."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ("prefs.jsonl", "prefs_val.jsonl", "prefs_test.jsonl"):
        shutil.copy(os.path.join(rm_dir, name), data_dir / name)
    return str(data_dir / "prefs.jsonl")


@pytest.mark.parametrize("reference", ["sft", "previous"])
def test_online_dpo_round_one_is_offline_dpo(tmp_path, monkeypatch, sft_dir, rm_dir, reference):
    """Online DPO's first round is today's offline DPO step for step (the same weights at its
    end, the same logged numbers); each later round trains on --round-pairs pairs sampled from the
    policy of its start and labelled, saved with π_ref's log-probs in OUT/round_<r>.jsonl: the
    SFT model's (--reference sft) or the round's starting policy's (previous); metrics.jsonl
    has one "round" row per later round; and a run stopped after any checkpoint, also the one
    that ends a round before the next round's pairs exist, resumes to the same weights."""
    data = dpo_pairs_dir(tmp_path, rm_dir)
    offline = train_dpo.DPOConfig(out=str(tmp_path / "offline"), sft=sft_dir, data=data, **DPO)
    train_dpo.train(offline)
    cfg = train_dpo.DPOConfig(out=str(tmp_path / "a"), sft=sft_dir, data=data,
                              reference=reference, **ONLINE)
    result = train_dpo.train(cfg)
    assert result["steps"] == 6 + 2 * 4
    metrics = read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
    assert ([r for r in metrics if r["step"] <= 6 and r["split"] != "round"]
            == read_metrics(str(tmp_path / "offline" / "metrics.jsonl")))
    rounds = [r for r in metrics if r["split"] == "round"]
    assert [(r["round"], r["step"]) for r in rounds] == [(2, 6), (3, 10)]
    assert all(r["pairs"] == 12 and 0 <= r["sample_accuracy"] <= 1 for r in rounds)
    # round 2's π_ref: the SFT model, or the policy round 1 ended with (= offline DPO's)
    pairs, ref_logp = train_dpo.read_round(str(tmp_path / "a" / "round_2.jsonl"),
                                           load_stage(sft_dir, "gpt")[1])
    ref_stage = sft_dir if reference == "sft" else str(tmp_path / "offline")
    model, tok, _ = load_stage(ref_stage, "gpt")
    with torch.no_grad():
        c, r = train_dpo.response_logprobs(model.eval(), pairs, tok, torch.device("cpu"))
    assert len(pairs) == 12
    assert torch.allclose(torch.stack([c, r], 1), ref_logp, atol=1e-4)
    for n_saves in (2, 3):  # stopped at the end of round 1, then inside round 2
        cut = dataclasses.replace(cfg, out=str(tmp_path / f"cut{n_saves}"))
        interrupt_after_saves(monkeypatch, training, "save_stage", n_saves)
        with pytest.raises(Interrupted):
            train_dpo.train(cut)
        monkeypatch.undo()
        if n_saves == 2:
            assert same_weights(str(tmp_path / "offline" / "checkpoint.pt"),
                                os.path.join(cut.out, "checkpoint.pt"))
            assert not os.path.exists(os.path.join(cut.out, "round_2.jsonl"))
        train_dpo.train(dataclasses.replace(cut, resume=True))
        assert same_weights(str(tmp_path / "a" / "checkpoint.pt"),
                            os.path.join(cut.out, "checkpoint.pt"))


def test_online_dpo_with_a_judge_and_its_refusals(tmp_path, sft_dir, rm_dir):
    """--labeller ai:DIR has a reward-model stage label each round's pairs (the judge prefers the
    chosen response of most of them); the world's labeller refuses prompts it does not know, and
    --overwrite removes an old run's round files."""
    data = dpo_pairs_dir(tmp_path, rm_dir)
    cfg = train_dpo.DPOConfig(out=str(tmp_path / "a"), sft=sft_dir, data=data,
                              labeller=f"ai:{rm_dir}", **{**ONLINE, "rounds": 2})
    train_dpo.train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "a" / "round_2.jsonl")]
    judge, tok, _ = load_stage(rm_dir, "scalar")
    pairs = train_dpo.encode_pairs(rows, tok)
    r_w, r_l = train_rm.judge_scores(judge.eval(), [(c, r) for c, r, _ in pairs], tok,
                                     torch.device("cpu"))
    assert len(rows) == 12 and (r_w > r_l).float().mean() >= 0.5
    train_dpo.train(dataclasses.replace(cfg, rounds=1, overwrite=True))
    assert not os.path.exists(tmp_path / "a" / "round_2.jsonl")
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"prompt": f"Write haiku {i}.", "chosen": "Leaves fall.",
                                       "rejected": "No."}) + "\n" for i in range(40)))
    with pytest.raises(DataError, match="--labeller world labels the built-in world's prompts"):
        train_dpo.train(dataclasses.replace(cfg, out=str(tmp_path / "b"), data=str(own),
                                            labeller="world"))
