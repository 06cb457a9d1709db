"""Your own data through all four stages: a task that is not the built-in world's (reverse a
made-up word), trained with --eval-prompts. Every stage writes samples.jsonl (with the reward
model's score wherever one is known), no world number appears anywhere, the reward model is
centred on the SFT policy's answers, and PPO's first rollout scores near 0."""
import json
import os
import random

import pytest

import train_dpo
import train_ppo
import train_rm
import train_sft
from minirlhf.data import hold_out
from minirlhf.evaluate import evaluate, evaluation_prompts, reward_model_scorer
from minirlhf.checkpoint import load_stage
from minirlhf.training import read_metrics
from minirlhf.world import World, world_tokenizer

WORLD_KEYS = {"gold", "correct", "accuracy", "optimum", "test_proxy", "bayes_accuracy"}


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The four files of the task: SFT records, preference pairs, RL prompts, eval prompts."""
    root = tmp_path_factory.mktemp("reverse")
    rng = random.Random(0)
    syll = [c + v for c in "bdfgklmnprst" for v in "aeiou"]
    words = sorted({"".join(rng.sample(syll, 2)) for _ in range(400)})
    rng.shuffle(words)
    ask = lambda w: f"Reverse the letters of {w}."  # noqa: E731
    return {"sft": write(root / "sft.jsonl", [{"prompt": ask(w), "completion": w[::-1]}
                                               for w in words[:120]]),
            "prefs": write(root / "prefs.jsonl", [{"prompt": ask(w), "chosen": w[::-1],
                                                   "rejected": w} for w in words[120:220]]),
            "prompts": write(root / "prompts.jsonl", [{"prompt": ask(w)} for w in words[220:260]]),
            "eval": write(root / "eval.jsonl", [{"prompt": ask(w)} for w in words[260:266]]),
            "root": root}


@pytest.fixture(scope="module")
def stages(task):
    """SFT -> RM -> DPO (scored by the RM) -> PPO, tiny settings, every one with --eval-prompts."""
    out = task["root"] / "out"
    common = dict(device="cpu", eval_prompts=task["eval"], eval_samples=2)
    train_sft.train(train_sft.SFTConfig(
        out=str(out / "sft"), data=task["sft"], n_layer=1, n_head=2, n_embd=32, block_size=48,
        max_steps=30, batch_size=16, log_every=10, eval_every=30, ckpt_every=30,
        max_new_tokens=12, **common))
    train_rm.train(train_rm.RMConfig(
        out=str(out / "rm"), sft=str(out / "sft"), data=task["prefs"], max_steps=20,
        batch_size=16, eval_every=10, max_new_tokens=12, **common))
    train_dpo.train(train_dpo.DPOConfig(
        out=str(out / "dpo"), sft=str(out / "sft"), data=task["prefs"], rm=str(out / "rm"),
        max_steps=6, batch_size=16, eval_every=3, ckpt_every=6, max_new_tokens=12, **common))
    train_ppo.train(train_ppo.PPOConfig(
        out=str(out / "ppo"), sft=str(out / "sft"), rm=str(out / "rm"), prompts=task["prompts"],
        iterations=3, prompts_per_iter=8, samples_per_prompt=2, minibatch_size=8,
        max_new_tokens=12, eval_every=2, ckpt_every=3, **common))
    return out


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo"])
def test_every_stage_writes_samples_of_the_eval_prompts_and_no_world_number(task, stages, stage):
    rows = [json.loads(line) for line in open(stages / stage / "samples.jsonl")]
    eval_prompts = [json.loads(line)["prompt"] for line in open(task["eval"])]
    assert [r["prompt"] for r in rows if not r["greedy"]] == [p for p in eval_prompts
                                                              for _ in range(2)]
    assert [r["prompt"] for r in rows if r["greedy"]] == eval_prompts
    for r in rows:
        assert not WORLD_KEYS & set(r)
        assert {"response", "length", "ended"} <= set(r)
        assert ("reward" in r) == (stage != "sft")  # every stage that knows a reward model
        assert ("kl" in r) == (stage in ("dpo", "ppo") and not r["greedy"])
    result = json.load(open(stages / stage / "eval.json"))
    assert result["eval_prompts"].startswith(task["eval"])
    assert not WORLD_KEYS & set(json.dumps(result).replace('"', " ").split())


def test_reward_model_is_centred_on_the_sft_policys_answers(task, stages):
    """Hand-written pairs are not the SFT policy's samples: the shift is the mean score of the
    policy's answers to the training prompts, so after it those answers average 0."""
    rm, tok, _ = load_stage(str(stages / "rm"), "scalar")
    policy, _, _ = load_stage(str(stages / "sft"), "gpt")
    result = json.load(open(stages / "rm" / "eval.json"))
    assert "answers to" in result["centred_on"] and result["reward_shift"] != 0
    rows = [json.loads(line) for line in open(task["prefs"])]
    train_prompts = list(dict.fromkeys(r["prompt"] for r in hold_out(rows, 0)[0]))
    mean = evaluate(policy, tok, train_prompts, max_new_tokens=12, seed=0,
                    reward=reward_model_scorer(rm, "cpu"))["reward"]
    assert abs(mean) < 0.01 < abs(result["reward_shift"])  # (the stage may have run in bf16)


def test_ppo_on_own_data_starts_near_zero(stages):
    """PPO's first rollout (the SFT policy, before any update) scores near 0 on average: the
    reward model was centred on that policy. Without centring it would start at the shift."""
    first = read_metrics(str(stages / "ppo" / "metrics.jsonl"))[0]
    shift = json.load(open(stages / "rm" / "eval.json"))["reward_shift"]
    assert first["gold"] is None and abs(first["proxy"]) < max(0.5, abs(shift) / 2)
    val = [r for r in read_metrics(str(stages / "ppo" / "metrics.jsonl")) if r["split"] == "val"]
    assert val and all("reward" in r and "gold" not in r for r in val)


def test_evaluation_prompts_follow_the_data():
    """--eval-prompts wins; world training prompts give the world's test prompts; other
    prompts give the held-out ones, each once; none at all is refused."""
    tok = world_tokenizer(512)
    world = [p.text for p in World(0).train_prompts]
    prompts, source = evaluation_prompts(None, world, [], tok, 32, 0)
    assert prompts == [p.text for p in World(0).test_prompts] and "world" in source
    prompts, source = evaluation_prompts(None, ["mine"], ["a", "b", "a"], tok, 32, 0)
    assert prompts == ["a", "b"] and "held out" in source
    with pytest.raises(ValueError, match="--eval-prompts"):
        evaluation_prompts(None, ["mine"], [], tok, 32, 0)


def test_hold_out_keeps_whole_prompts_apart():
    rows = [{"prompt": f"p{i % 40}", "x": i} for i in range(200)]
    kept, held = hold_out(rows, seed=3)
    held_prompts = {r["prompt"] for r in held}
    assert len(held_prompts) == 2 and not held_prompts & {r["prompt"] for r in kept}
    assert len(kept) + len(held) == len(rows)
    assert hold_out(rows, seed=3) == (kept, held)  # by seed
