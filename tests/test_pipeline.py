"""`python -m minirlhf.pipeline --quick` end to end: every stage runs through the scripts' own
code, summary.json has every key the contract names with finite numbers, and the figures exist.
`--resume`: a run stopped in any stage — after the stage's first checkpoint, or after the reward
model's pairs — ends with the summary.json of a run never stopped; a finished run is skipped
stage by stage; a damaged checkpoint in a finished stage trains that stage again. Bad flags end
in one line.

Time (2 cores, load ~3 from other work, measured): one uninterrupted quick run shared by the
module (`quick_run`, 19 s), the run stopped in every stage (19 s: one pipeline's work plus what
each stop redoes), the damaged DPO checkpoint (5 s), the finished run resumed (2 s: the
closed-form optimum and the figures again), the rest well under a second; the file, 45 s.
`--all` (measured alone): its stages added to the finished quick run (`all_run`, 16 s), and the
same stopped twice and resumed (17 s)."""
import contextlib
import io
import json
import math
import os
import shutil

import pytest
import torch

import train_ppo
import train_rm
from minirlhf import pipeline, training
from minirlhf.checkpoint import load_checkpoint

KEYS = {"world": {"demonstrators_gold", "optimum_gold", "n_test_prompts"},
        "sft": {"gold", "accuracy", "seconds"},
        "rm": {"test_accuracy", "bayes_accuracy", "expected_accuracy", "seconds"},
        "ppo": {"gold", "accuracy", "kl", "proxy", "seconds"},
        "ppo_no_kl": {"gold", "proxy", "kl", "seconds"},
        "dpo": {"gold", "accuracy", "kl", "seconds"}}
STAGES = ("sft", "rm", "ppo", "ppo_no_kl", "dpo")
QUICK = ["--quick", "--device", "cpu"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted quick pipeline: (its --out, what main returned, what it printed)."""
    out = str(tmp_path_factory.mktemp("pipeline") / "run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = pipeline.main(["--out", out] + QUICK)
    return out, summary, printed.getvalue()


def without_seconds(x):
    """summary.json less its wall-clock seconds (every key ending in "seconds"): what a resumed
    run must reproduce."""
    if isinstance(x, dict):
        return {k: without_seconds(v) for k, v in x.items() if not k.endswith("seconds")}
    if isinstance(x, list):
        return [without_seconds(v) for v in x]
    return x


def summary_of(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def test_quick_pipeline_writes_summary_and_figures(quick_run, capsys):
    """All stages run; summary.json holds every contract key with a finite number; each stage's
    command line is printed; the four figures are written. The results table opens by saying it
    is a smoke run whose numbers mean nothing, and summary.json says "quick". A second run into
    the same --out is refused in one line naming --overwrite."""
    out, summary, printed = quick_run
    on_disk = summary_of(out)
    assert on_disk["total_seconds"] == summary["total_seconds"] > 0
    assert on_disk["quick"] is True
    for section, keys in KEYS.items():
        for key in keys:
            value = on_disk[section][key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (section, key, value)
    for script in ("train_sft.py", "train_rm.py", "train_ppo.py", "train_dpo.py"):
        assert f"$ python {script} --out {out}" in printed
    # the reward model's stage samples its pairs and trains on them, in one command
    assert f"$ python train_rm.py --out {out}/rm --sft {out}/sft --make-pairs " in printed
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
    for stage in STAGES:
        assert os.path.exists(os.path.join(out, stage, "checkpoint.pt"))
        # each stage's seconds are kept in its eval.json, for a later --resume to report
        with open(os.path.join(out, stage, "eval.json")) as f:
            assert json.load(f)["pipeline_seconds"] == on_disk[stage]["seconds"]
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--out", out] + QUICK)
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"python -m minirlhf.pipeline: error: {out} already holds a pipeline run "
        f"(sft/checkpoint.pt); pass --overwrite to start over\n")


class Interrupted(Exception):
    """Stands in for a SIGKILL that lands right after a write."""


def stop_after_first_save(monkeypatch, folder, n: int = 1):
    """Make the stage writing into `folder` stop right after its first (n-th) checkpoint.pt
    there (train_sft/rm/dpo.py save through training.save_run, train_ppo.py calls save_stage)."""
    saves = {"n": 0}
    for module in (training, train_ppo):
        real = module.save_stage

        def wrapped(out, *args, _real=real, **kwargs):
            path = _real(out, *args, **kwargs)
            if os.path.normpath(out) == os.path.normpath(folder):
                saves["n"] += 1
                if saves["n"] == n:
                    raise Interrupted
            return path
        monkeypatch.setattr(module, "save_stage", wrapped)


def test_a_run_stopped_in_every_stage_resumes_to_the_same_summary(quick_run, tmp_path, capsys,
                                                                   monkeypatch):
    """One quick run, stopped seven times: in SFT after its first checkpoint (step 30 of 60),
    in the reward-model stage once its pairs are written and before training starts (it has no
    checkpoint yet, so it starts over and samples the same pairs again), again after its first
    checkpoint (step 8 of 16; continued with its pairs kept), then in PPO, PPO β = 0 (iteration
    2 of 3) and DPO (step 5 of 10); each time `--resume` continues. Finished stages are skipped,
    the stopped one continues from its checkpoint with its script's --resume.
    The end: the uninterrupted run's summary.json (all but seconds) and the same weights."""
    ref, _, _ = quick_run
    out = str(tmp_path / "run")
    argv = ["--out", out] + QUICK

    def run(stop, resume=True):
        with monkeypatch.context() as m:
            stop(m)
            with pytest.raises(Interrupted):
                pipeline.main(argv + (["--resume"] if resume else []))
        return capsys.readouterr().out

    def stop_before_rm_training(m):
        def interrupted(*args):
            raise Interrupted
        m.setattr(train_rm, "load_reward_model", interrupted)


    # a fresh run with --resume: nothing to resume, every stage starts
    printed = run(lambda m: stop_after_first_save(m, f"{out}/sft"))
    assert load_checkpoint(f"{out}/sft/checkpoint.pt")["step"] == 30
    assert not os.path.exists(f"{out}/sft/eval.json") and "skipped" not in printed
    printed = run(stop_before_rm_training)
    assert (f"resuming {out}/sft from its checkpoint.pt (step 30): the run stopped before it "
            f"wrote eval.json\n$ python train_sft.py --out {out}/sft --resume ") in printed
    assert f"resumed from {out}/sft/checkpoint.pt at step 30" in printed
    assert sorted(os.listdir(f"{out}/rm")) == ["prefs.jsonl", "prefs_test.jsonl",
                                               "prefs_val.jsonl"]
    pairs = open(f"{out}/rm/prefs.jsonl").read()
    printed = run(lambda m: stop_after_first_save(m, f"{out}/rm"))
    assert f"skipped: {out}/sft is complete" in printed
    assert f"$ python train_rm.py --out {out}/rm --sft {out}/sft --make-pairs " in printed
    assert open(f"{out}/rm/prefs.jsonl").read() == pairs  # sampled again: the same pairs
    for stage, step in (("ppo", 8), ("ppo_no_kl", 2), ("dpo", 2)):
        printed = run(lambda m: stop_after_first_save(m, f"{out}/{stage}"))
        stopped = {"ppo": "rm", "ppo_no_kl": "ppo", "dpo": "ppo_no_kl"}[stage]
        assert (f"resuming {out}/{stopped} from its checkpoint.pt (step {step}): the run stopped "
                f"before it wrote eval.json") in printed
        assert printed.count("skipped: ") == STAGES.index(stopped)
        if stopped == "rm":  # continued from its checkpoint: its pairs are kept
            assert (f"preference pairs complete in {out}/rm ({{'prefs.jsonl': 128, "
                    f"'prefs_val.jsonl': 32, 'prefs_test.jsonl': 64}}): kept, not sampled "
                    f"again") in printed and "--make-pairs" not in printed
    with monkeypatch.context() as m:
        m.setattr(train_rm, "make_pairs_main", lambda *args: pytest.fail("pairs sampled again"))
        pipeline.main(argv + ["--resume"])
    printed = capsys.readouterr().out
    assert f"resuming {out}/dpo from its checkpoint.pt (step 5)" in printed
    assert printed.count("skipped: ") == 4
    assert without_seconds(summary_of(out)) == without_seconds(summary_of(ref))
    for stage in STAGES:
        a, b = load_checkpoint(f"{out}/{stage}/checkpoint.pt"), load_checkpoint(
            f"{ref}/{stage}/checkpoint.pt")
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), stage


def test_a_finished_run_resumed_skips_every_stage(quick_run, tmp_path, capsys):
    """--resume on a finished run (moved to another folder: the skip accepts it) trains nothing:
    every stage is skipped, its results read back from its eval.json, its seconds those it took,
    and the same summary.json is written again."""
    ref, _, _ = quick_run
    out = str(tmp_path / "moved")
    shutil.copytree(ref, out)
    os.remove(os.path.join(out, "summary.json"))
    pipeline.main(["--out", out, "--resume"] + QUICK)
    printed = capsys.readouterr().out
    for stage in STAGES:
        assert (f"=== {stage} ===\nskipped: {out}/{stage} is complete (eval.json; checkpoint.pt "
                f"loads): its results are read from eval.json\n") in printed
    assert "$ python" not in printed
    assert without_seconds(summary_of(out)) == without_seconds(summary_of(ref))
    assert {s: summary_of(out)[s]["seconds"] for s in STAGES} == {
        s: summary_of(ref)[s]["seconds"] for s in STAGES}


def test_a_damaged_checkpoint_in_a_finished_stage_trains_it_again(quick_run, tmp_path, capsys):
    """A finished stage whose checkpoint.pt has a changed byte (its SHA-256 does not match) is
    not trusted: --resume trains that stage again from scratch, saying why, and the summary is
    the uninterrupted run's. (Stages that read it would start over too; DPO has none.)"""
    ref, _, _ = quick_run
    out = str(tmp_path / "run")
    shutil.copytree(ref, out)
    path = os.path.join(out, "dpo", "checkpoint.pt")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    pipeline.main(["--out", out, "--resume"] + QUICK)
    printed = capsys.readouterr().out
    assert printed.count("skipped: ") == 4
    assert f"=== dpo ===\n{path}: damaged checkpoint" in printed
    assert (f": training dpo again from scratch\n$ python train_dpo.py --out {out}/dpo --sft "
            f"{out}/sft --data {out}/rm/prefs.jsonl --overwrite ") in printed
    load_checkpoint(path)  # whole again
    assert without_seconds(summary_of(out)) == without_seconds(summary_of(ref))


def test_a_damaged_reward_model_is_trained_again_with_the_stages_that_read_it(quick_run,
                                                                            tmp_path):
    """The plan (nothing runs): a finished reward model whose checkpoint.pt is cut short is
    trained again in its folder (--overwrite), its pairs sampled again (the same pairs, and its
    head drawn from the state an uninterrupted run draws it from);
    PPO, PPO β = 0 and DPO read it, so they start over too; SFT is skipped."""
    ref, _, _ = quick_run
    out = str(tmp_path / "run")
    shutil.copytree(ref, out)
    path = os.path.join(out, "rm", "checkpoint.pt")
    os.truncate(path, os.path.getsize(path) - 100)
    args = pipeline.parse_args(["--out", out, "--resume"] + QUICK)
    plans = pipeline.plan_stages(args, pipeline.stage_configs(args))
    assert plans["sft"].action == "skip"
    rm = plans["rm"]
    assert (rm.action, rm.resume, rm.overwrite, rm.make_pairs) == ("train", False, True, True)
    assert rm.note.startswith(f"{path}: ") and rm.note.endswith(": training rm again from scratch")
    for stage in ("ppo", "ppo_no_kl", "dpo"):
        plan = plans[stage]
        assert (plan.action, plan.resume, plan.overwrite) == ("train", False, True)
        assert plan.note == f"{stage} starts over: it reads rm, which is trained again above"


def test_resume_refuses_a_run_made_with_other_flags(quick_run, capsys):
    """--resume with flags other than the run's (here without --quick) is refused in one line
    before anything runs, naming the stage and the first setting that differs."""
    ref, _, _ = quick_run
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--out", ref, "--resume", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"python -m minirlhf.pipeline: error: --resume: {ref}/sft was run with ")
    assert "or pass --overwrite to start over" in err


ALL = ["--all", "--judge-pairs", "64"]


@pytest.fixture(scope="module")
def all_run(quick_run, tmp_path_factory):
    """--all on a copy of the finished quick run, with --resume: (its --out, what main returned,
    what it printed)."""
    out = str(tmp_path_factory.mktemp("pipeline_all") / "run")
    shutil.copytree(quick_run[0], out)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = pipeline.main(["--out", out, "--resume"] + ALL + QUICK)
    return out, summary, printed.getvalue()


def test_all_adds_the_methods_beyond_the_reward_model(quick_run, all_run):
    """--all on a finished quick run (--resume: the five stages are skipped) adds PPO with the
    gold reward, RFT, GRPO with the verifier and with the reward model, and RLAIF (a judge on
    64 human pairs, a reward model on its labels of the reward model's pairs, PPO): each a row
    of summary.json and of the printed table; the five stages' numbers are unchanged; each
    stage ran with the flags its method names (read back from its config.json)."""
    ref, _, _ = quick_run
    out, summary, printed = all_run
    assert printed.count("skipped: ") == 5
    for key in ("ppo_gold", "rft", "grpo", "grpo_rm", "rlaif"):
        row = summary[key]
        assert all(math.isfinite(row[k]) for k in ("gold", "accuracy", "kl", "seconds")), key
        assert key in summary["gap_closed"]
    rlaif = summary["rlaif"]
    assert rlaif["judge_pairs"] == 64 and summary["rlaif_curve"] == [rlaif]
    assert 0 <= rlaif["judge_agreement"] <= 1 and 0 <= rlaif["rm_test_accuracy"] <= 1
    assert 0.5 <= rlaif["human_agreement"] <= 1
    base = summary_of(ref)
    for stage in STAGES:
        assert without_seconds(summary[stage]) == without_seconds(base[stage]), stage
    config = {name: json.load(open(f"{out}/{folder}/config.json")) for name, folder in
              (("ppo_gold", "ppo_gold"), ("rft", "rft"), ("grpo", "grpo"),
               ("grpo_rm", "grpo_rm"), ("judge", "rlaif_64/judge"), ("rm", "rlaif_64/rm"),
               ("ppo", "rlaif_64/ppo"))}
    assert (config["ppo_gold"]["reward"], config["rft"]["reward"]) == ("gold", "verifier")
    assert (config["grpo"]["advantage"], config["grpo"]["reward"]) == ("grpo", "verifier")
    assert (config["grpo_rm"]["advantage"], config["grpo_rm"]["reward"]) == ("grpo", "rm")
    assert config["judge"]["n_pairs"] == 64 and config["judge"]["make_pairs"]
    assert config["rm"]["labeller"] == f"ai:{out}/rlaif_64/judge"
    assert config["rm"]["data"] == f"{out}/rm/prefs.jsonl"
    assert config["ppo"]["rm"] == f"{out}/rlaif_64/rm"
    assert "value_model" not in load_checkpoint(f"{out}/grpo/checkpoint.pt")["extra"]
    assert "beyond the reward model" in printed and "RLAIF, judge of 64 human pairs" in printed
    assert {p["method"] for p in summary["frontier"]} >= {"PPO gold", "RFT", "GRPO", "RLAIF"}
    bon = summary["best_of_n"]["points"]  # the reward model keeps the best of n SFT samples
    assert [p["n"] for p in bon] == [1, 2, 4] and bon[0]["kl"] == 0
    assert all(math.isfinite(p[k]) for p in bon for k in ("gold", "accuracy", "proxy", "kl"))
    assert bon[0]["proxy"] <= bon[1]["proxy"] <= bon[2]["proxy"]  # the selector's own score
    assert "best-of-n (the reward model keeps the best of n SFT samples)" in printed


def test_all_adds_online_dpo_and_the_overoptimization_study(all_run):
    """--all's online DPO runs 4 rounds (3 of them on pairs of its own, each logged), π_ref the
    policy of each round's start; the overoptimization study trains reward models on the first
    quarter and half of the reward model's pairs, runs PPO at β = 0.02 against each of the
    three, and reports per reward model best-of-n and PPO points from √KL = 0 on, with Gao et
    al.'s fits (or why none could be made) and the measured peaks; its figure is drawn."""
    out, summary, printed = all_run
    online = summary["online_dpo"]
    assert [r["round"] for r in online["rounds"]] == [2, 3, 4]
    assert all(r["pairs"] == 32 for r in online["rounds"])
    assert all(math.isfinite(online[k]) for k in ("gold", "accuracy", "kl", "seconds"))
    assert "online_dpo" in summary["gap_closed"] and "DPO onl." in printed
    config = json.load(open(f"{out}/online_dpo/config.json"))
    assert (config["rounds"], config["reference"]) == (4, "previous")
    assert sorted(os.path.basename(f) for f in os.listdir(f"{out}/online_dpo")
                  if f.startswith("round_")) == ["round_2.jsonl", "round_3.jsonl", "round_4.jsonl"]
    over = summary["overoptimization"]
    assert over["sizes"] == [32, 64, 128]
    for n in over["sizes"]:
        r = over["reward_models"][str(n)]
        assert 0 <= r["test_accuracy"] <= 1 and r["beta"] == 0.02
        rl, bon = r["rl"]["points"], r["best_of_n"]["points"]
        assert [p["step"] for p in rl] == [0, 3] and rl[0]["d"] == 0
        assert [p["n"] for p in bon] == [1, 2, 4]
        assert all(math.isfinite(p[k]) for p in rl + bon for k in ("d", "gold", "proxy"))
        assert "alpha" in r["best_of_n"]["fit"] and "error" in r["rl"]["fit"]  # one RL point
        ppo = json.load(open(f"{out}/overoptimization/ppo_{n}/config.json"))
        rm_dir = f"{out}/rm" if n == 128 else f"{out}/overoptimization/rm_{n}"
        assert (ppo["rm"], ppo["kl_coef"]) == (rm_dir, 0.02)
        if n < 128:
            assert json.load(open(f"{rm_dir}/config.json"))["max_pairs"] == n
            assert json.load(open(f"{rm_dir}/eval.json"))["n_train_pairs"] == n
    assert ([{k: v for k, v in p.items() if k != "d"}
             for p in over["reward_models"]["128"]["best_of_n"]["points"]]
            == summary["best_of_n"]["points"])  # the reward-model stage's own best-of-n
    assert os.path.getsize(f"{out}/figures/overoptimization.png") > 0
    assert "overoptimization, RM on 32 pairs" in printed


def test_an_all_run_stopped_in_grpo_rlaif_and_online_dpo_resumes_to_the_same_summary(
        quick_run, all_run, tmp_path, capsys, monkeypatch):
    """--all stopped after the first checkpoint of GRPO (no value model in it), then after the
    first of the reward model trained on the judge's labels, then inside online DPO's third
    round: each --resume continues the stopped stage from its checkpoint (the judge's labels
    drawn again, the same; online DPO's pairs read back) and ends with the uninterrupted --all
    run's summary.json and weights."""
    out = str(tmp_path / "run")
    shutil.copytree(quick_run[0], out)
    argv = ["--out", out, "--resume"] + ALL + QUICK
    # online DPO stops at step 15 of 22, inside its third round, two rounds' pairs on disk
    for folder, n in (("grpo", 1), ("rlaif_64/rm", 1), ("online_dpo", 4)):
        with monkeypatch.context() as m:
            stop_after_first_save(m, f"{out}/{folder}", n)
            with pytest.raises(Interrupted):
                pipeline.main(argv)
        assert not os.path.exists(f"{out}/{folder}/eval.json")
    pipeline.main(argv)
    printed = capsys.readouterr().out  # every invocation's
    for folder in ("rlaif_64/rm", "online_dpo"):
        assert f"resuming {out}/{folder} from its checkpoint.pt" in printed
    ref = all_run[0]
    assert without_seconds(summary_of(out)) == without_seconds(summary_of(ref))
    assert open(f"{out}/rlaif_64/rm/prefs_ai.jsonl").read() == open(
        f"{ref}/rlaif_64/rm/prefs_ai.jsonl").read()
    for folder in ("grpo", "rlaif_64/rm", "rlaif_64/ppo", "online_dpo"):
        a, b = (load_checkpoint(f"{d}/{folder}/checkpoint.pt") for d in (out, ref))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), folder


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--seed", str(2**40)], "--seed must be in [0, 2**32)"),
    (["--out", "{file}"], "--out {file}: {file} is a file, not a folder"),
    (["--out", "{file}/run"], "--out {file}/run: {file} is a file, not a folder"),
    (["--out", ""], "--out must name a folder, not ''"),
    (["--resume", "--overwrite"],
     "--resume continues the run in --out, --overwrite starts it over: give one"),
    (["--judge-pairs", "2000"], "--judge-pairs needs --all"),
    (["--all", "--judge-pairs", "2000", "2000"],
     "--judge-pairs must be distinct positive counts, not [2000, 2000]"),
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
    cfg = train_ppo.PPOConfig(kl_coef=0.0, whiten=False, out="x")
    line = pipeline.command_line(cfg)
    assert line == "python train_ppo.py --out x --kl-coef 0.0 --no-whiten"
