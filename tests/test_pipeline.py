"""`python -m minirlhf.pipeline --quick` end to end: every stage runs through the scripts' own
code, summary.json has every key the contract names with finite numbers, and the figures exist."""
import json
import math
import os

import pytest

from minirlhf import pipeline

KEYS = {"world": {"demonstrators_gold", "optimum_gold", "n_test_prompts"},
        "sft": {"gold", "accuracy", "seconds"},
        "rm": {"test_accuracy", "bayes_accuracy", "expected_accuracy", "seconds"},
        "ppo": {"gold", "accuracy", "kl", "proxy", "seconds"},
        "ppo_no_kl": {"gold", "proxy", "kl", "seconds"},
        "dpo": {"gold", "accuracy", "kl", "seconds"}}


def test_quick_pipeline_writes_summary_and_figures(tmp_path, capsys):
    """All stages run; summary.json holds every contract key with a finite number; each stage's
    command line is printed; the four figures are written. The results table opens by saying it
    is a smoke run whose numbers mean nothing, and summary.json says "quick". A second run into
    the same --out is refused in one line naming --overwrite."""
    out = str(tmp_path / "run")
    summary = pipeline.main(["--out", out, "--quick", "--device", "cpu"])
    on_disk = json.load(open(os.path.join(out, "summary.json")))
    assert on_disk["total_seconds"] == summary["total_seconds"] > 0
    assert on_disk["quick"] is True
    for section, keys in KEYS.items():
        for key in keys:
            value = on_disk[section][key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (section, key, value)
    printed = capsys.readouterr().out
    for script in ("train_sft.py", "train_rm.py", "train_ppo.py", "train_dpo.py"):
        assert f"$ python {script} --out {out}" in printed
    # the reward model's stage: its pairs, then training on them, both by train_rm.py
    assert f"$ python train_rm.py --out {out}/rm --sft {out}/sft --make-pairs --pairs-only " \
           in printed
    assert "--kl-coef 0.0" in printed  # the β = 0 run is the same script with one flag changed
    table = printed[printed.index("\nbuilt-in world: ") - len(pipeline.SMOKE) - 1:]
    assert table.startswith(pipeline.SMOKE + "\n")  # the table's header: a smoke run
    assert "SMOKE RUN (--quick)" in pipeline.SMOKE and "not trained to quality" in pipeline.SMOKE
    assert printed.startswith(pipeline.SMOKE + "\n")  # and before the first stage
    shortfall = on_disk["rm"]["shortfall"]  # points under the Bayes limit, by kind of test pair
    assert shortfall and sum(shortfall.values()) == pytest.approx(
        100 * (on_disk["rm"]["bayes_accuracy"] - on_disk["rm"]["expected_accuracy"]))
    curve = on_disk["kl_optimum"]["points"]  # the closed-form optimum at each β
    assert len(curve) >= 4 and all(math.isfinite(c[k]) for c in curve for k in ("gold", "kl"))
    golds = [c["gold"] for c in sorted(curve, key=lambda c: c["beta"])]
    assert golds == sorted(golds, reverse=True)  # smaller β, weaker anchor: never less gold
    assert on_disk["kl_optimum"]["ppo"]["beta"] == 0.2
    assert on_disk["kl_optimum"]["dpo"]["beta"] == 0.3
    # the same optimum with PPO's reward (the trained reward model): a point at every β
    assert all(math.isfinite(c["reward_model"][k]) for c in curve for k in ("gold", "kl"))
    assert math.isfinite(on_disk["kl_optimum"]["ppo"]["reward_model"]["gap_closed"])
    assert "with PPO's reward (the trained reward model) instead" in printed
    for name in ("losses", "hacking", "frontier", "calibration"):
        path = os.path.join(out, "figures", f"{name}.png")
        assert os.path.getsize(path) > 1000
    for stage in ("sft", "rm", "ppo", "ppo_no_kl", "dpo"):
        assert os.path.exists(os.path.join(out, stage, "checkpoint.pt"))
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--out", out, "--quick", "--device", "cpu"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"python -m minirlhf.pipeline: error: {out} already holds a pipeline run "
        f"(sft/checkpoint.pt); pass --overwrite to start over\n")


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(2**40)], "--seed must be in [0, 2**32)"),
    (["--out", "{file}"], "--out {file}: {file} is a file, not a folder"),
    (["--out", "{file}/run"], "--out {file}/run: {file} is a file, not a folder"),
    (["--out", ""], "--out must name a folder, not ''"),
])
def test_bad_flags_end_in_one_line(tmp_path, capsys, flags, message):
    """Every stage's config is checked as its script checks it, and --out must be a folder,
    before any stage starts: one line, exit 2, nothing written."""
    file = tmp_path / "a_file"
    file.write_text("")
    flags = [f.format(file=file) for f in flags]
    if "--out" not in flags:
        flags += ["--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        pipeline.main(flags + ["--quick"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"python -m minirlhf.pipeline: error: "
                                       f"{message.format(file=file)}\n")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_overwrite_and_verbose_reach_every_stage(tmp_path):
    """--overwrite and --verbose are passed to every stage's config (a stage refuses a used
    folder without --overwrite); without them the stages get neither."""
    for flags, value in (([], False), (["--overwrite", "--verbose"], True)):
        cfgs = pipeline.stage_configs(pipeline.parse_args(["--out", str(tmp_path)] + flags))
        assert {(c.overwrite, c.verbose) for c in cfgs.values()} == {(value, value)}


def test_command_line_lists_only_changed_flags():
    """The printed command reproduces a config: defaults are omitted, booleans become
    --flag / --no-flag, other values follow their flag."""
    import train_ppo
    cfg = train_ppo.PPOConfig(kl_coef=0.0, whiten=False, out="x")
    line = pipeline.command_line(cfg)
    assert line == "python train_ppo.py --out x --kl-coef 0.0 --no-whiten"
