"""The rewards that are not a reward model (minirlhf/graders.py): the world's verifier is 1 for a
right answer and 0 otherwise, the gold reward is the gold judge on the labellers' scale (what
the closed-form bound of `kl_optimum` tilts by), a user's `module:function` is loaded from a
module or a file, and every way it can fail is one clear error naming what is wrong."""
import math

import pytest
import torch

from minirlhf import graders
from minirlhf.graders import GraderError, load_verifier, make_reward, text_reward
from minirlhf.world import BT_TEMPERATURE, World, correct, gold_reward, optimal_response

P = World(0).test_prompts[0].text
RIGHT = optimal_response(P)
WRONG = "I think it is nothing."


def call(reward, prompts, responses, ended=None):
    ended = torch.ones(len(prompts), dtype=torch.bool) if ended is None else ended
    return reward(None, None, ended, prompts, responses)


def test_the_worlds_verifier_is_one_for_a_right_answer_and_zero_otherwise():
    reward = make_reward("verifier")
    assert correct(P, RIGHT) and not correct(P, WRONG)
    assert call(reward, [P, P], [RIGHT, WRONG]).tolist() == [1.0, 0.0]


def test_the_no_end_penalty_is_added_to_a_response_that_never_ended():
    reward = make_reward("verifier", no_end_penalty=-1.0)
    ended = torch.tensor([True, False])
    assert call(reward, [P, P], [RIGHT, RIGHT], ended).tolist() == [1.0, 0.0]


def test_gold_is_the_judge_on_the_labellers_scale():
    """gold / T, the unended penalty included by the judge itself (no extra penalty)."""
    ended = torch.tensor([True, False, True])
    got = call(make_reward("gold"), [P] * 3, [RIGHT, RIGHT, WRONG], ended)
    want = [gold_reward(P, r, e) / BT_TEMPERATURE
            for r, e in ((RIGHT, True), (RIGHT, False), (WRONG, True))]
    torch.testing.assert_close(got, torch.tensor(want))


def test_a_verifier_from_a_file_and_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_checks.py").write_text(
        "def says_yes(prompt, response):\n    return 'yes' in response\n")
    from_file = load_verifier(f"{tmp_path / 'my_checks.py'}:says_yes")
    monkeypatch.chdir(tmp_path)  # a dotted module is imported from the current folder
    from_module = load_verifier("my_checks:says_yes")
    for fn in (from_file, from_module):
        reward = text_reward(fn)
        assert call(reward, ["q", "q"], ["yes!", "no"]).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected module:function"),
    (":fn", "expected module:function"),
    ("{dir}/missing.py:fn", "no file {dir}/missing.py"),
    ("{dir}/checks.py:absent", "checks.py has no function absent"),
    ("{dir}/broken.py:fn", "cannot import {dir}/broken.py: ZeroDivisionError"),
    ("no_such_module_here:fn", "cannot import no_such_module_here: ModuleNotFoundError"),
])
def test_a_verifier_that_cannot_be_loaded_is_one_clear_error(tmp_path, spec, message):
    (tmp_path / "checks.py").write_text("x = 1\n")
    (tmp_path / "broken.py").write_text("1 / 0\n")
    with pytest.raises(GraderError) as e:
        load_verifier(spec.format(dir=tmp_path))
    assert message.format(dir=tmp_path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "seven"])
def test_a_verifier_returning_no_finite_number_stops_with_the_prompt(value):
    reward = text_reward(lambda p, r: value, name="--verifier mine:fn")
    with pytest.raises(GraderError, match="--verifier mine:fn .*prompt 'q'"):
        call(reward, ["q"], ["a"])


def test_graders_that_need_the_world_refuse_other_prompts():
    with pytest.raises(GraderError, match="gold judge knows only the built-in world"):
        make_reward("gold", world_prompts=False)
    with pytest.raises(GraderError, match="needs --verifier module:function"):
        make_reward("verifier", world_prompts=False)
    assert graders.all_world_prompts([P]) and not graders.all_world_prompts([P, "Hi there"])
    assert math.isfinite(call(make_reward("verifier"), [P], [""]).item())
