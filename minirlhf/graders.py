"""Rewards that are not a reward model: RL from a grading function (CS224N notes, "Reinforcement
Fine-Tuning"; "the bottleneck for current RLHF is the design and training of the reward model").

The reward R(x, ŷ) that PPO maximises can be any grading system, differentiable or not. Three
kinds drive `train_ppo.py --reward`:

- `rm`: a trained reward model r_φ (lecture ch. 6), `evaluate.reward_model_scorer`;
- `verifier`: 1 for a right answer, 0 otherwise — the built-in world's checker `world.correct`,
  or on your own data a Python function `module:function` (or `path/to/file.py:function`)
  taking (prompt, response) and returning a number (`load_verifier`);
- `gold`: the built-in world's gold judge on the labeller's scale, gold / BT_TEMPERATURE: the
  utility its Bradley–Terry labels are drawn from, so the reward a perfect reward model would
  learn (up to a constant), and the reward of `evaluate.kl_optimum`'s closed-form bound.

Every reward here has the signature `evaluate` expects of `reward`:
    reward(tokens (B, T), attn_mask (B, T), ended (B,), prompts: list[str], responses: list[str])
    -> (B,) float tensor
so a policy is evaluated with the reward it was trained on, whatever its kind.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import torch

from .evaluate import reward_model_scorer
from .world import BT_TEMPERATURE, correct, gold_reward, is_world_prompt


class GraderError(ValueError):
    """A grading function that cannot be loaded, or returned something that is not a number."""


def load_verifier(spec: str):
    """The function `module:function` names (a dotted module importable from the current folder,
    or a .py file), checked to be callable. GraderError, one line, when it is not there."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise GraderError(f"--verifier {spec!r}: expected module:function, e.g. "
                          f"my_checks:is_right or checks.py:is_right")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise GraderError(f"--verifier {spec}: no file {module_name}")
            loaded = importlib.util.spec_from_file_location("verifier_module", module_name)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except GraderError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise GraderError(f"--verifier {spec}: cannot import {module_name}: "
                          f"{type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise GraderError(f"--verifier {spec}: {module_name} has no function {name}")
    return fn


def text_reward(grade, no_end_penalty: float = 0.0, name: str = "grader"):
    """A reward from a function of text, grade(prompt, response) -> number, plus
    `no_end_penalty` for a response that never ended. A result that is not a finite number
    stops the run with GraderError naming the prompt."""
    def reward(tokens, attn_mask, ended, prompts, responses):
        values = []
        for prompt, response in zip(prompts, responses):
            try:
                value = float(grade(prompt, response))
            except Exception as e:
                raise GraderError(f"{name} failed on prompt {prompt!r}: "
                                  f"{type(e).__name__}: {e}") from None
            if not math.isfinite(value):
                raise GraderError(f"{name} returned {value} for prompt {prompt!r}: a reward "
                                  f"must be a finite number")
            values.append(value)
        r = torch.tensor(values, dtype=torch.float32, device=ended.device)     # (B,)
        return r + no_end_penalty * (~ended).float()
    return reward


def world_verifier(prompt: str, response: str) -> float:
    """The built-in world's verifier: 1.0 when the response states the right answer, else 0."""
    return float(correct(prompt, response))


def gold_utility(tokens, attn_mask, ended, prompts, responses):
    """The gold judge's score on the labeller's scale, gold / BT_TEMPERATURE (world prompts;
    an unended response already costs −0.5 gold, so no extra penalty). (B,) tensor."""
    values = [gold_reward(p, r, bool(e)) / BT_TEMPERATURE
              for p, r, e in zip(prompts, responses, ended.tolist())]
    return torch.tensor(values, dtype=torch.float32, device=ended.device)


def make_reward(kind: str, *, verifier: str | None = None, reward_model=None, device="cpu",
                no_end_penalty: float = 0.0, world_prompts: bool = True):
    """The reward of `train_ppo.py --reward KIND` (module docstring). `world_prompts`: every
    training prompt is one of the built-in world's (needed for gold, and for the verifier
    without a function of your own). GraderError when the combination cannot work."""
    if kind == "rm":
        return reward_model_scorer(reward_model, device, no_end_penalty)
    if kind == "gold":
        if not world_prompts:
            raise GraderError("--reward gold: the gold judge knows only the built-in world's "
                              "prompts; use --reward verifier --verifier module:function")
        return gold_utility
    if kind == "verifier":
        if verifier:
            return text_reward(load_verifier(verifier), no_end_penalty, f"--verifier {verifier}")
        if not world_prompts:
            raise GraderError("--reward verifier on your own prompts needs --verifier "
                              "module:function, a function (prompt, response) -> number")
        return text_reward(world_verifier, no_end_penalty, "the world's verifier")
    raise GraderError(f"--reward must be rm, verifier or gold, not {kind!r}")


def all_world_prompts(prompts) -> bool:
    return all(is_world_prompt(p) for p in prompts)
