"""The figures and `python -m minirlhf.report`: it draws a run's figures from its files, and
refuses a missing or foreign summary with one line, like every other tool."""
import json
import os

import pytest

from minirlhf import report
from minirlhf.plots import spaced


def fake_run(root):
    """The files a pipeline run leaves that the figures read: metrics of each stage, summary."""
    for stage, key in (("sft", "loss"), ("rm", "loss"), ("dpo", "dpo_loss"), ("ppo", None),
                       ("ppo_no_kl", None)):
        os.makedirs(root / stage)
        with open(root / stage / "metrics.jsonl", "w") as f:
            for step in (1, 2, 3):
                row = ({"loss": 1.0 / step, "dpo_loss": 0.7 / step} if key else
                       {"proxy": 0.1 * step, "gold": 0.5, "kl": 0.2 * step})
                f.write(json.dumps({"step": step, "split": "train", **row}) + "\n")
    json.dump({"calibration": [{"bin": "0.4-0.5", "n": 10, "predicted": 0.45,
                                "observed": 0.5}]}, open(root / "rm" / "eval.json", "w"))
    curve = [{"beta": b, "kl": 1 / b, "gold": 1 - 0.1 / b,
              "reward_model": {"kl": 1.1 / b, "gold": 0.9 - 0.1 / b}} for b in (0.1, 0.2, 1.0)]
    summary = {"world": {"optimum_gold": 1.3, "demonstrators_gold": 0.8},
               "frontier": [{"method": "SFT", "kl": 0.0, "gold": 0.6},
                            {"method": "PPO", "kl": 1.6, "gold": 1.0, "label": "β=0.2"}],
               "kl_optimum": {"points": curve}}
    json.dump(summary, open(root / "summary.json", "w"))


def test_report_draws_every_figure_of_a_run(tmp_path, capsys):
    fake_run(tmp_path)
    paths = report.main([str(tmp_path)])
    assert sorted(os.path.basename(p) for p in paths) == [
        "calibration.png", "frontier.png", "hacking.png", "losses.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_an_all_run_with_several_judges_also_draws_the_rlaif_curve(tmp_path):
    """--all with --judge-pairs 2000 16000: rlaif.png, judge quality against its human pairs."""
    fake_run(tmp_path)
    summary = json.load(open(tmp_path / "summary.json"))
    summary.update(rm={"test_accuracy": 0.77}, ppo={"gold": 0.99}, sft={"gold": 0.64})
    summary["rlaif_curve"] = [
        {"judge_pairs": n, "judge_test_accuracy": a, "judge_agreement": a - 0.03,
         "human_agreement": 0.77, "rm_test_accuracy": a - 0.01, "bayes_accuracy": 0.82,
         "gold": g} for n, a, g in ((2000, 0.70, 0.8), (16000, 0.75, 0.9))]
    json.dump(summary, open(tmp_path / "summary.json", "w"))
    paths = report.main([str(tmp_path)])
    rlaif = [p for p in paths if os.path.basename(p) == "rlaif.png"]
    assert len(paths) == 5 and rlaif and os.path.getsize(rlaif[0]) > 1000


@pytest.mark.parametrize("content", [None, "[1, 2]", "{not json", '{"world": {}}'])
def test_report_refuses_a_missing_or_foreign_summary_in_one_line(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "summary.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "summary.json" in err


def test_report_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        report.main(["--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_spaced_labels_keep_the_ends_and_drop_crowded_points():
    """β labels on the frontier: the first point is kept, and a point within the gap of the
    last kept one in both KL and gold is dropped."""
    pts = [{"kl": 0.0, "gold": 0.0}, {"kl": 0.01, "gold": 0.01}, {"kl": 1.0, "gold": 1.0},
           {"kl": 0.5, "gold": 0.5}]
    assert [p["kl"] for p in spaced(pts)] == [0.0, 0.5, 1.0]
    assert spaced([]) == []
