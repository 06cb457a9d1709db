"""The reliability suite (issue 10): every stage survives a SIGKILL at any moment, repeats
itself exactly for a seed, refuses bad input with one line, stops on NaN/inf with the last good
checkpoint intact, and refuses checkpoints that do not fit.

1. Kill and resume: each script runs as a subprocess on tiny settings (a checkpoint every 2
   steps) and is SIGKILLed half-way through a checkpoint write, then, resumed, at a seeded random
   moment (SFT also between its first metrics row and its first checkpoint); in-process runs
   are stopped after the last checkpoint and, for the RM, after early stopping. The checkpoint
   left on disk always loads, and the last --resume ends with the weights, optimizer, RNG and
   extra state, metrics rows and eval.json of an uninterrupted run.
2. Determinism: the same flags twice in one process give identical weights and metrics.
3. Bad input: malformed JSONL (a list of named cases, plus hypothesis-corrupted files) and bad
   flags end in exactly one `prog: error: ...` line naming the file and line, or the flag, with
   a non-zero exit. A refused run leaves OUT as it found it: no new file (config.json is
   written once the inputs are read), and an existing checkpoint, metrics log or eval.json
   untouched. A run into an OUT that holds a run is refused unless --resume or --overwrite says
   what to do with it; --overwrite ends exactly as a run into a fresh folder.
4. Numbers: NaN/inf in a loss, a reward or a gradient norm stops the run naming the step (as
   metrics.jsonl numbers steps) and the quantity; OUT/checkpoint.pt still holds the last good
   step. Every loss is finite for inputs of ±1e4.
5. Checkpoint safety: stage checkpoints load with weights_only=True; other model sizes,
   tokenizers, and truncated files are refused with one line naming the file.

Timing fields (time_*, *seconds*) are the only things excluded from "identical".
"""
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import train_dpo
import train_ppo
import train_rm
import train_sft
import minirlhf.training
from minirlhf.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, load_stage
from minirlhf.data import write_jsonl
from minirlhf.masking import token_entropy
from minirlhf.model import ScalarHeadModel
from minirlhf.tokenizer import Tokenizer
from minirlhf.training import read_metrics
from minirlhf.world import World

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Tiny settings: a checkpoint every 2 steps, every code path (evaluation, samples) still taken.
SFT_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-steps", "16",
             "--n-examples", "200", "--batch-size", "16", "--log-every", "1", "--eval-every", "8",
             "--ckpt-every", "2", "--n-show", "1", "--max-new-tokens", "16", "--warmup", "4",
             "--device", "cpu"]


def rm_flags(d):
    return ["--sft", d["sft"], "--data", d["prefs"], "--val-data", d["prefs_val"],
            "--max-steps", "12", "--batch-size", "8", "--eval-every", "2", "--patience", "6",
            "--device", "cpu"]


def ppo_flags(d):
    return ["--sft", d["sft"], "--rm", d["rm"], "--iterations", "8", "--prompts-per-iter", "2",
            "--samples-per-prompt", "2", "--max-new-tokens", "16", "--minibatch-size", "2",
            "--epochs", "2", "--eval-every", "4", "--ckpt-every", "2", "--adaptive-kl",
            "--device", "cpu"]


def dpo_flags(d):
    return ["--sft", d["sft"], "--data", d["prefs"], "--max-steps", "10", "--batch-size", "4",
            "--eval-every", "4", "--ckpt-every", "2", "--max-new-tokens", "16", "--device", "cpu"]


# stage -> (module, script, flags(dirs), steps, checkpoint.pt writes in a full run); every stage
# writes checkpoint.pt every 2 steps, and the RM once more at the end (rewards normalised).
STAGES = {
    "sft": (train_sft, "train_sft.py", lambda d: SFT_FLAGS, 16, 8),
    "rm": (train_rm, "train_rm.py", rm_flags, 12, 7),
    "ppo": (train_ppo, "train_ppo.py", ppo_flags, 8, 4),
    "dpo": (train_dpo, "train_dpo.py", dpo_flags, 10, 5),
}


def run_main(module, argv):
    """A script's main() in-process; returns the exit code (0 when it returns normally)."""
    try:
        module.main(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The inputs every later stage needs, built once: a tiny SFT stage (in-process, with the
    kill tests' flags, so it doubles as their uninterrupted reference), hand-made preference
    files, and a tiny reward model trained on them."""
    root = tmp_path_factory.mktemp("stages")
    d = {"root": str(root), "sft": str(root / "sft"), "rm": str(root / "rm")}
    assert run_main(train_sft, SFT_FLAGS + ["--out", d["sft"]]) == 0
    examples = World(0).sft_examples(90, 0)
    rows = [{"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
            for a, b in zip(examples, examples[1:]) if a["completion"] != b["completion"]]
    for name, part in (("prefs", rows[:48]), ("prefs_val", rows[48:64]),
                       ("prefs_test", rows[64:80])):
        d[name] = str(root / "data" / f"{name}.jsonl")
        write_jsonl(d[name], part)
    prompts = str(root / "data" / "prompts.jsonl")
    write_jsonl(prompts, [{"prompt": p.text} for p in World(0).train_prompts[:8]])
    d["prompts"] = prompts
    assert run_main(train_rm, rm_flags(d) + ["--out", d["rm"]]) == 0
    return d


@pytest.fixture(scope="module")
def references(dirs):
    """One uninterrupted in-process run per stage with the kill tests' flags."""
    refs = {"sft": dirs["sft"], "rm": dirs["rm"]}
    for name in ("ppo", "dpo"):
        module, _, flags, _, _ = STAGES[name]
        refs[name] = os.path.join(dirs["root"], f"{name}_ref")
        assert run_main(module, flags(dirs) + ["--out", refs[name]]) == 0
    return refs


# ----------------------------------------------------------------------------------------------
# Comparing two runs
# ----------------------------------------------------------------------------------------------

def is_timing(key) -> bool:
    return isinstance(key, str) and (key.startswith("time_") or "seconds" in key)


def assert_same(a, b, where="", skip=()):
    """Recursive equality of checkpoint / JSON contents; tensors must be bit-identical."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        keys = {k for k in a if not is_timing(k) and k not in skip}
        assert keys == {k for k in b if not is_timing(k) and k not in skip}, where
        for k in keys:
            assert_same(a[k], b[k], f"{where}.{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", skip)
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def assert_metrics_well_formed(rows):
    """Per split, each step appears once and steps strictly increase."""
    for split in {r["split"] for r in rows}:
        steps = [r["step"] for r in rows if r["split"] == split]
        assert steps == sorted(set(steps)), f"{split} steps duplicated or out of order: {steps}"


def assert_same_run(out, ref):
    """The final checkpoint (weights, optimizer, RNG, extra state such as PPO's value model and
    KL controller or the RM's best loss and reward shift), RM's best.pt, every metrics row and
    eval.json of `out` equal those of `ref`, timing fields aside."""
    a, b = load_checkpoint(os.path.join(out, "checkpoint.pt")), load_checkpoint(
        os.path.join(ref, "checkpoint.pt"))
    # the config differs in out, resume and overwrite only; the tokenizer's source is the path it
    # was read from
    skip = ("out", "resume", "overwrite", "source")
    assert_same(a, b, "checkpoint", skip=skip)
    if os.path.exists(os.path.join(ref, "best.pt")):
        assert_same(load_checkpoint(os.path.join(out, "best.pt")),
                    load_checkpoint(os.path.join(ref, "best.pt")), "best.pt", skip=skip)
    rows, ref_rows = (read_metrics(os.path.join(p, "metrics.jsonl")) for p in (out, ref))
    assert_metrics_well_formed(rows)
    assert_same(rows, ref_rows, "metrics.jsonl")
    assert_same(json.load(open(os.path.join(out, "eval.json"))),
                json.load(open(os.path.join(ref, "eval.json"))), "eval.json")


# ----------------------------------------------------------------------------------------------
# 1. Kill and resume
# ----------------------------------------------------------------------------------------------

# Runs a script with its k-th write of checkpoint.pt stopped half-way: the first half of the
# bytes is flushed to the temporary file, a marker file says so, and the process sleeps until the
# test kills it.
SLOW_WRITE_LAUNCHER = r"""
import io, os, runpy, sys, time
import torch
slow_at, calls, real_save = int(os.environ["SLOW_CHECKPOINT_WRITE"]), [0], torch.save
def save(obj, f, *args, **kwargs):
    if not os.path.basename(getattr(f, "name", "")).startswith("checkpoint.pt.tmp"):
        return real_save(obj, f, *args, **kwargs)
    calls[0] += 1
    if calls[0] != slow_at:
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    open(os.environ["HALF_WRITTEN_MARKER"], "w").close()
    time.sleep(120)
    f.write(data[len(data) // 2:])
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def wait_for(condition, proc, what, timeout=60.0):
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (code {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def start(script, argv, **env):
    return subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, env={**ENV, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class StepOnDisk:
    """The step of the checkpoint at `path`, re-read only when the file was replaced."""

    def __init__(self, path):
        self.path, self.inode, self.step = path, None, -1

    def __call__(self) -> int:
        inode = os.stat(self.path).st_ino if os.path.exists(self.path) else None
        if inode != self.inode:
            self.inode, self.step = inode, load_checkpoint(self.path)["step"]
        return self.step


def kill(proc) -> bool:
    """SIGKILL; True if the run was still going (False: it had already finished)."""
    proc.send_signal(signal.SIGKILL)
    return proc.wait() == -signal.SIGKILL


def kill_points(stage, dirs, out, rng, step_seconds):
    """Run the stage and SIGKILL it over and over, resuming each time with --resume, then let
    the last resume finish. After every kill the checkpoint on disk (if any) and its tokenizer
    load. Returns a description of each kill point."""
    _, script, flags, steps, n_writes = STAGES[stage]
    argv = flags(dirs) + ["--out", out]
    ck = os.path.join(out, "checkpoint.pt")
    points = []
    if stage == "sft":  # a metrics row is written at step 1, the first checkpoint at step 2
        proc = start(script, argv)
        wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")), proc, "a metrics row")
        kill(proc)
        points.append("after the first metrics row" + (
            ", before the first checkpoint" if not os.path.exists(ck) else ""))

    # Half-way through the k-th write of checkpoint.pt (the (k-1)-th is on disk).
    k = rng.randint(2, n_writes - len(points))  # (a resumed run has fewer writes left)
    marker = out + ".half-written"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE_LAUNCHER, script, *argv,
                             *(["--resume"] if points else [])], cwd=ROOT,
                            env={**ENV, "SLOW_CHECKPOINT_WRITE": str(k),
                                 "HALF_WRITTEN_MARKER": marker},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: os.path.exists(marker), proc, f"checkpoint write {k}")
    assert kill(proc)
    torn = f"{ck}.tmp{proc.pid}"  # atomic_torch_save's temporary file
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(torn)  # the kill really landed half-way through the write
    points.append(f"half-way through checkpoint write {k} of {n_writes}, "
                  f"step {load_checkpoint(ck)['step']} on disk")
    load_stage(out)

    # A seeded random moment of the resumed run: a random fraction of two steps' time after the
    # checkpoint of a random later step.
    after = min(steps, 2 * (k - 1) + 2 * rng.randint(1, n_writes - k + 1))
    delay = rng.uniform(0.0, 2 * step_seconds)
    step_on_disk = StepOnDisk(ck)
    proc = start(script, argv + ["--resume"])
    wait_for(lambda: step_on_disk() >= after, proc, f"the checkpoint of step {after}")
    time.sleep(delay)
    running = kill(proc)
    points.append(f"{delay * 1000:.0f} ms after the checkpoint of step {after}, step "
                  f"{load_checkpoint(ck)['step']} on disk" + ("" if running else
                                                             " (the run had finished)"))
    load_stage(out)

    done = subprocess.run([sys.executable, script, *argv, "--resume"], cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return points


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, dirs, references, stage):
    """SIGKILLed half-way through writing checkpoint.pt, then again at a seeded random moment
    of the resumed run (SFT also right after its first metrics row): after each kill the
    checkpoint on disk loads (a torn write leaves the previous one), and the last --resume ends
    with the same weights, optimizer and RNG state, extra state, metrics rows (each step once,
    none missing) and eval.json as the uninterrupted reference run."""
    rng = random.Random(stage)
    train_seconds = json.load(open(os.path.join(references[stage], "eval.json")))["train_seconds"]
    points = kill_points(stage, dirs, str(tmp_path / stage), rng,
                         step_seconds=train_seconds / STAGES[stage][3])
    print(f"\n{stage} killed: " + "; ".join(points))
    assert_same_run(str(tmp_path / stage), references[stage])


@pytest.mark.parametrize("stage", list(STAGES))
def test_resuming_a_finished_run_changes_nothing(tmp_path, dirs, references, stage):
    """A kill after the last checkpoint (during the final evaluation) is resumed by re-running
    the evaluation only: weights, optimizer, metrics and eval.json stay those of the run."""
    module, _, flags, _, _ = STAGES[stage]
    out = str(tmp_path / stage)
    shutil.copytree(references[stage], out)
    os.remove(os.path.join(out, "eval.json"))  # the kill came before eval.json was written
    assert run_main(module, flags(dirs) + ["--out", out, "--resume"]) == 0
    assert_same_run(out, references[stage])


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_a_metrics_row_torn_by_a_kill_is_dropped_on_resume(tmp_path, dirs, references, stage):
    """A kill half-way through appending a metrics row leaves a torn last line; --resume drops
    it and ends with the uninterrupted run's metrics (each step once)."""
    module, _, flags, _, _ = STAGES[stage]
    out = str(tmp_path / stage)
    shutil.copytree(references[stage], out)
    os.remove(os.path.join(out, "eval.json"))
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 999, "split": "tra')  # no closing brace, no newline
    assert run_main(module, flags(dirs) + ["--out", out, "--resume"]) == 0
    assert_same_run(out, references[stage])


def test_a_metrics_log_damaged_in_the_middle_is_refused(tmp_path, capsys, dirs, references):
    """Damage that a kill cannot cause (a broken line before the last) is not silently
    dropped: --resume stops with one line naming the file and line."""
    module, _, flags, _, _ = STAGES["sft"]
    out = str(tmp_path / "sft")
    shutil.copytree(references["sft"], out)
    path = os.path.join(out, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    lines[1] = "not json\n"
    open(path, "w").writelines(lines)
    capsys.readouterr()
    assert run_main(module, flags(dirs) + ["--out", out, "--resume"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl:2" in err[0] and "Traceback" not in err[0], err


class Interrupted(Exception):
    """Stands in for a SIGKILL at a chosen point of an in-process run."""


def test_rm_resumed_after_early_stopping_does_not_train_on(tmp_path, dirs, monkeypatch):
    """An RM run that stopped early, killed between its last evaluation's checkpoint and the
    final normalised save, or after it, resumes to the uninterrupted result: it must not take
    further steps (from the best, reward-shifted weights)."""
    flags = rm_flags(dirs) + ["--patience", "1", "--lr", "3e-3"]
    ref = str(tmp_path / "ref")
    assert run_main(train_rm, flags + ["--out", ref]) == 0
    result = json.load(open(os.path.join(ref, "eval.json")))
    assert result["stopped_early"] and result["steps"] < 12  # the case under test happens
    n_saves = len([r for r in read_metrics(os.path.join(ref, "metrics.jsonl"))
                   if r["split"] == "val"])
    out = str(tmp_path / "cut")
    real, calls = minirlhf.training.save_stage, []  # save_run writes checkpoint.pt with it

    def save_then_die(*args, **kwargs):  # dies right after the early-stopping evaluation's save
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == n_saves:
            raise Interrupted
    monkeypatch.setattr(minirlhf.training, "save_stage", save_then_die)
    with pytest.raises(Interrupted):
        train_rm.main(flags + ["--out", out])
    monkeypatch.undo()
    assert "finished" not in load_checkpoint(os.path.join(out, "checkpoint.pt"))["extra"]
    assert run_main(train_rm, flags + ["--out", out, "--resume"]) == 0
    assert_same_run(out, ref)
    assert run_main(train_rm, flags + ["--out", out, "--resume"]) == 0  # and once finished
    assert_same_run(out, ref)


# ----------------------------------------------------------------------------------------------
# 2. Determinism
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", list(STAGES))
def test_same_seed_and_flags_give_identical_runs(tmp_path, dirs, references, stage):
    """A second run with the same flags (here in the same process, after other runs have moved
    every global RNG) ends with bit-identical weights, optimizer state, metrics and eval.json."""
    module, _, flags, _, _ = STAGES[stage]
    out = str(tmp_path / stage)
    assert run_main(module, flags(dirs) + ["--out", out]) == 0
    assert_same_run(out, references[stage])


# ----------------------------------------------------------------------------------------------
# A used --out: refused, resumed, or started over
# ----------------------------------------------------------------------------------------------

STALE = b"an old run's file\n"


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_used_out_is_refused_or_started_over(tmp_path, capsys, dirs, references, stage):
    """A run into a folder that holds a run is refused in one line naming --resume and
    --overwrite, before it changes anything there; --resume with --overwrite is refused alike.
    --overwrite starts over: the old run's files are gone (a stale samples.jsonl, calibration
    plot or best.pt too) and the folder ends as a run into a fresh folder ends: the same
    checkpoint, metrics rows (no old row left) and eval.json."""
    module, _, flags, _, _ = STAGES[stage]
    out = str(tmp_path / stage)
    shutil.copytree(references[stage], out)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 999, "split": "train", "loss": 0.0}) + "\n")
    stale = [n for n in ("samples.jsonl", "calibration.png", "best.pt")
             if not os.path.exists(os.path.join(out, n))]
    for name in stale:
        open(os.path.join(out, name), "wb").write(STALE)
    refused(capsys, stage, flags(dirs) + ["--out", out], out,
            f"{PROG[stage]}: error: {out} already holds a run (checkpoint.pt); pass --resume to "
            f"continue it or --overwrite to start over\n", code=2)
    refused(capsys, stage, flags(dirs) + ["--out", out, "--resume", "--overwrite"], out,
            "--resume continues the run in --out, --overwrite starts it over: give one", code=2)
    capsys.readouterr()
    assert run_main(module, flags(dirs) + ["--out", out, "--overwrite"]) == 0
    assert "| starting over (--overwrite) |" in capsys.readouterr().out
    for name in stale:
        path = os.path.join(out, name)
        assert not os.path.exists(path) or open(path, "rb").read() != STALE, name
    assert_same_run(out, references[stage])


def test_overwrite_refused_for_bad_input_keeps_the_old_run(tmp_path, capsys, dirs, references):
    """--overwrite replaces the old run only once the new run has read its inputs: refused for
    a bad data file, it leaves every file of the old run as it was."""
    out = str(tmp_path / "dpo")
    shutil.copytree(references["dpo"], out)
    bad = str(tmp_path / "bad.jsonl")
    open(bad, "w").write(json.dumps(PREFS_ROW) + "\n[1]\n")
    refused(capsys, "dpo", dpo_flags(dirs) + ["--data", bad, "--out", out, "--overwrite"], out,
            f"{bad}:2: ", code=1)


# ----------------------------------------------------------------------------------------------
# 3. Bad input: malformed files and bad flags
# ----------------------------------------------------------------------------------------------

# What each script reads and how: the flag that names the file, and a good line of that file.
SFT_ROW = {"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."}
PREFS_ROW = {"prompt": "What is 2 plus 3?", "chosen": "2 plus 3 is 5.", "rejected": "It is 6."}
PROMPT_ROW = {"prompt": "What is 2 plus 3?"}
READS = {  # stage -> (flag, good row, extra flags)
    "sft": ("--data", SFT_ROW, lambda d: ["--n-layer", "1", "--n-head", "2", "--n-embd", "32"]),
    "rm": ("--data", PREFS_ROW, lambda d: ["--sft", d["sft"]]),
    "dpo": ("--data", PREFS_ROW, lambda d: ["--sft", d["sft"]]),
    "ppo": ("--prompts", PROMPT_ROW, lambda d: ["--sft", d["sft"], "--rm", d["rm"],
                                                "--max-new-tokens", "16"]),
}
PROG = {stage: STAGES[stage][1] for stage in STAGES}


GOOD = "the stage's good line"


def line(obj, good=None) -> bytes:
    if obj is GOOD:
        obj = good
    return json.dumps(obj).encode() if not isinstance(obj, bytes) else obj


def files_in(out) -> dict:
    """OUT's files and their bytes."""
    if not os.path.isdir(out):
        return {}
    return {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}


def refused(capsys, stage, argv, out, *mentions, code=None):
    """Run the script on argv: a non-zero exit, exactly one stderr line `prog: error: ...`
    holding every mention, no traceback, and OUT as it was: no new file (not even config.json),
    and an existing checkpoint, metrics log or eval.json untouched."""
    module = STAGES[stage][0]
    before = files_in(out)
    capsys.readouterr()
    exit_code = run_main(module, argv)
    err = capsys.readouterr().err
    assert exit_code not in (0, None) and (code is None or exit_code == code), (exit_code, err)
    assert err.startswith(f"{PROG[stage]}: error: ") and err.count("\n") == 1, err
    for m in mentions:
        assert m in err, (m, err)
    after = files_in(out)
    assert set(after) == set(before), f"a refused run left {set(after) - set(before)} in OUT"
    assert all(after[k] == before[k] for k in before), "a refused run changed OUT"
    return err


BIG = "word " * 40_000  # 200 kB, some 40k tokens
BAD_FILES = [  # (case, stages, lines of the file, line number named, words in the message)
    ("broken JSON", "all", [b'{"prompt": "a", "completion": }'], 1, "bad JSON"),
    ("line cut short", "all", [b'{"prompt": "What is 2 plus'], 1, "bad JSON"),
    ("trailing comma", "all", [b'{"prompt": "a",}'], 1, "bad JSON"),
    ("a list, not an object", "all", [b"[1, 2]"], 1, "got a list"),
    ("a bare string", "all", [b'"hello"'], 1, "got a string"),
    ("null", "all", [b"null"], 1, "got null"),
    ("nested too deeply", "sft", [b"[" * 100_000 + b"]" * 100_000], 1, "nested too deeply"),
    ("not UTF-8 (Latin-1)", "all", [b'{"prompt": "caf\xe9"}'], 1, "not valid UTF-8"),
    ("UTF-16 with its BOM", "sft", ['{"prompt": "a"}'.encode("utf-16")], 1, "not valid UTF-8"),
    ("a BOM on line 2", "sft", [SFT_ROW, b"\xef\xbb\xbf" + line(SFT_ROW)], 2, "bad JSON"),
    ("an unpaired surrogate escape", "all", [b'{"prompt": "a\\ud800b"}'], 1,
     "not valid Unicode"),
    ("prompt missing", "all", [{"completion": "x", "chosen": "x", "rejected": "y"}], 1,
     "missing field 'prompt'"),
    ("completion missing", "sft", [{"prompt": "a"}], 1, "missing field 'completion'"),
    ("rejected missing", "rm dpo", [{"prompt": "a", "chosen": "b"}], 1,
     "missing field 'rejected'"),
    ("prompt a number", "all", [{**SFT_ROW, **PREFS_ROW, "prompt": 7}], 1,
     "'prompt' must be a string, got a number"),
    ("prompt NaN", "all", [b'{"prompt": NaN}'], 1, "must be a string, got a number"),
    ("completion null", "sft", [{**SFT_ROW, "completion": None}], 1, "got null"),
    ("chosen a list", "rm dpo", [{**PREFS_ROW, "chosen": ["a"]}], 1, "got a list"),
    ("prompt an object", "ppo", [{"prompt": {"text": "a"}}], 1, "got an object"),
    ("rejected a boolean", "rm dpo", [{**PREFS_ROW, "rejected": True}], 1, "got a boolean"),
    ("empty prompt", "all", [{**SFT_ROW, **PREFS_ROW, "prompt": ""}], 1, "is empty"),
    ("whitespace completion", "sft", [{**SFT_ROW, "completion": " \t\r\n"}], 1,
     "only whitespace"),
    ("chosen equals rejected", "rm dpo", [{**PREFS_ROW, "rejected": PREFS_ROW["chosen"]}], 1,
     "the same text"),
    ("huge completion", "sft", [SFT_ROW, {**SFT_ROW, "completion": BIG}], 2,
     "longer than max_len=96"),
    ("huge rejected", "rm dpo", [PREFS_ROW, PREFS_ROW, {**PREFS_ROW, "rejected": BIG}], 3,
     "longer than max_len=96"),
    ("prompt longer than the context", "ppo", [PROMPT_ROW, {"prompt": "what " * 90}], 2,
     "longer than max_len=80"),  # block 96 minus --max-new-tokens 16
    ("bad line after blank lines", "all", [b"", GOOD, b"   ", b"[]"], 4, "got a list"),
    ("empty file", "all", [], None, "no records"),
    ("only blank lines", "all", [b"", b" \t", b"\r"], None, "no records"),
    ("messages not a list", "sft", [{"messages": "hi"}], 1, "must be a non-empty list"),
    ("messages empty", "sft", [{"messages": []}], 1, "an empty list"),
    ("message not an object", "sft", [{"messages": ["hi"]}], 1, "messages[0] must be an object"),
    ("message without content", "sft", [{"messages": [{"role": "user"}]}], 1,
     "missing field 'messages[0].content'"),
    ("unknown role", "sft", [{"messages": [{"role": "bot", "content": "a"}]}], 1, "has role"),
    ("user has the last word", "sft", [{"messages": [{"role": "user", "content": "a"}]}], 1,
     "must be the assistant's"),
    ("no user message", "sft", [{"messages": [{"role": "system", "content": "a"},
                                              {"role": "assistant", "content": "b"}]}], 1,
     "no user message"),
    ("messages and prompt", "sft", [{**SFT_ROW, "messages": []}], 1, "has both"),
]
FILE_CASES = [pytest.param(stage, lines, lineno, words, id=f"{stage}: {case}")
              for case, stages, lines, lineno, words in BAD_FILES
              for stage in (STAGES if stages == "all" else stages.split())]


@pytest.mark.parametrize("stage, lines, lineno, words", FILE_CASES)
def test_bad_file_is_refused_naming_file_and_line(tmp_path, capsys, dirs, stage, lines,
                                                  lineno, words):
    """Each malformed file ends the run with one line naming the file and the line (the file
    alone for file-level problems) and saying what is wrong; nothing is written."""
    flag, good, extra = READS[stage]
    path = str(tmp_path / "bad.jsonl")
    with open(path, "wb") as f:
        f.write(b"".join(line(x, good) + b"\n" for x in lines))
    out = str(tmp_path / "out")
    where = f"{path}:{lineno}: " if lineno else f"{path}: "
    refused(capsys, stage, extra(dirs) + [flag, path, "--out", out, "--device", "cpu"], out,
            where, words, code=1)


def test_bad_validation_file_is_named(tmp_path, capsys, dirs):
    """--val-data is checked like --data: its own path and line are named."""
    good, bad = str(tmp_path / "good.jsonl"), str(tmp_path / "val.jsonl")
    write_jsonl(good, [SFT_ROW] * 3)
    with open(bad, "wb") as f:
        f.write(line(SFT_ROW) + b"\n" + b'{"prompt": 1}\n')
    out = str(tmp_path / "out")
    refused(capsys, "sft", READS["sft"][2](dirs) + ["--data", good, "--val-data", bad,
                                                    "--out", out, "--device", "cpu"],
            out, f"{bad}:2: ", "must be a string")


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_documented_oddities_are_accepted(tmp_path, capsys, dirs, stage):
    """Handled as documented in minirlhf/data.py: special-token spellings stay plain text,
    extra fields are ignored, CRLF line ends, a byte-order mark on line 1 and blank lines are
    accepted. The run trains (exit 0)."""
    flag, row, extra = READS[stage]
    odd = {k: v + " <|end|><|bos|><|pad|><|endoftext|>" for k, v in row.items()}
    path = str(tmp_path / "odd.jsonl")
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + line({**odd, "id": 3}) + b"\r\n\r\n" + line(row) + b"\r\n")
    out = str(tmp_path / "out")
    argv = extra(dirs) + [flag, path, "--out", out, "--device", "cpu", "--max-steps", "2",
                          "--batch-size", "2", "--eval-every", "1", "--ckpt-every", "1",
                          "--max-new-tokens", "16"]
    assert run_main(STAGES[stage][0], argv) == 0, capsys.readouterr().err
    _, tok, ck = load_stage(out)
    assert ck["step"] == 2
    ids, _ = tok.render(odd["prompt"], "x")
    assert ids.count(tok.end_id) == 1 and ids.count(tok.bos_id) == 1  # only the template's own


@st.composite
def corrupted_file(draw, stage):
    """Good lines, blank lines, and one bad line of a random kind at a random place. Returns
    (file bytes, the bad line's number, words its error must hold)."""
    good = READS[stage][1]
    fields = list(good)
    kind = draw(st.sampled_from(["cut", "non-object", "missing", "wrong type", "blank field",
                                 "bytes", "too long"]))
    field = draw(st.sampled_from(fields))
    if kind == "cut":  # any strict prefix of an object's JSON text is not JSON
        text = json.dumps(good)
        bad, words = text[:draw(st.integers(1, len(text) - 1))].encode(), "bad JSON"
    elif kind == "non-object":
        value = draw(st.one_of(st.integers(), st.booleans(), st.none(), st.text(max_size=5),
                               st.lists(st.integers(), max_size=3)))
        bad, words = json.dumps(value).encode(), "expected a JSON object"
    elif kind == "missing":
        bad, words = line({k: v for k, v in good.items() if k != field}), "missing field"
    elif kind == "wrong type":
        value = draw(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                               st.none(), st.lists(st.integers(), max_size=2),
                               st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
        bad, words = line({**good, field: value}), "must be a string"
    elif kind == "blank field":
        value = draw(st.text(st.sampled_from(" \t\r\n\x0b\x0c\u00a0\u2003"), max_size=6))
        bad, words = line({**good, field: value}), "empty" if not value else "only whitespace"
    elif kind == "bytes":  # a byte that never occurs in UTF-8, inside a string value
        text = line({**good, field: draw(st.text("abc ", max_size=8))})
        at = text.index(b'"', text.index(f'"{field}":'.encode()) + len(field) + 3) + 1
        bad = text[:at] + draw(st.sampled_from([b"\xff", b"\xfe", b"\xc0", b"\x80"])) + text[at:]
        words = "not valid UTF-8"
    else:
        n = draw(st.integers(100, 5000))
        bad, words = line({**good, field: "ab " * n}), "longer than max_len"
    before = draw(st.lists(st.sampled_from([line(good), b"", b" \t"]), max_size=4))
    after = draw(st.lists(st.sampled_from([line(good), b""]), max_size=3))
    return b"".join(x + b"\n" for x in before + [bad] + after), len(before) + 1, words


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(data=st.data())
def test_any_corrupted_file_gives_one_line_naming_its_line(tmp_path_factory, capsys, dirs, data):
    """Hypothesis: whichever script reads it and wherever the bad line sits among good and
    blank lines, the run ends with one line naming the file and that line number."""
    stage = data.draw(st.sampled_from(list(READS)))
    content, lineno, words = data.draw(corrupted_file(stage))
    folder = tmp_path_factory.mktemp("corrupt")
    path = str(folder / "data.jsonl")
    with open(path, "wb") as f:
        f.write(content)
    flag, _, extra = READS[stage]
    out = str(folder / "out")
    refused(capsys, stage, extra(dirs) + [flag, path, "--out", out, "--device", "cpu"], out,
            f"{path}:{lineno}: ", words, code=1)


BAD_FLAGS = [  # (stage, argv, words in the message); argv is added to the stage's working flags
    ("sft", ["--bogus", "1"], "unrecognized arguments: --bogus"),
    ("sft", ["--max-steps", "ten"], "--max-steps"),
    ("sft", ["--max-steps", "2.5"], "--max-steps"),
    ("sft", ["--device", "tpu"], "--device"),
    ("sft", ["--max-steps", "-5"], "--max-steps must be positive"),
    ("sft", ["--batch-size", "0"], "--batch-size must be positive"),
    ("sft", ["--n-head", "0"], "--n-head must be positive"),
    ("sft", ["--n-embd", "30", "--n-head", "4"], "--n-embd must be divisible by --n-head"),
    ("sft", ["--lr", "nan"], "--lr"),
    ("sft", ["--grad-clip", "inf"], "--grad-clip"),
    ("sft", ["--seed", "-1"], "--seed"),
    ("sft", ["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    ("sft", ["--min-lr-ratio", "2"], "--min-lr-ratio"),
    ("sft", ["--vocab-size", "100"], "--vocab-size"),
    ("sft", ["--block-size", "16"], "--block-size 16"),
    ("sft", ["--init", "/nonexistent/sft"], "/nonexistent/sft"),
    ("rm", ["--pairs-only"], "--pairs-only needs --make-pairs"),
    ("rm", ["--responses-per-prompt", "1"], "--responses-per-prompt"),
    ("rm", ["--patience", "0"], "--patience must be positive"),
    ("rm", ["--pair-temperature", "0"], "--pair-temperature must be positive"),
    ("rm", ["--sft", "/nonexistent/sft"], "--sft /nonexistent/sft: no such file or folder"),
    ("rm", ["--data", "/nonexistent/prefs.jsonl"], "/nonexistent/prefs.jsonl"),
    ("rm", ["--make-pairs", "--max-new-tokens", "1", "--n-pairs", "4", "--n-val-pairs", "2",
            "--n-test-pairs", "2"], "within --max-new-tokens 1"),  # no response can end
    ("ppo", ["--advantage", "group", "--samples-per-prompt", "1"], "--samples-per-prompt"),
    ("ppo", ["--advantage", "td"], "--advantage"),
    ("ppo", ["--clip-eps", "1.5"], "--clip-eps"),
    ("ppo", ["--gamma", "1.1"], "--gamma"),
    ("ppo", ["--kl-coef", "-0.1"], "--kl-coef"),
    ("ppo", ["--warmup", "-1"], "--warmup must be >= 0"),
    ("ppo", ["--target-kl", "0", "--adaptive-kl"], "--target-kl must be positive"),
    ("ppo", ["--value-clip", "0"], "--value-clip"),
    ("ppo", ["--max-new-tokens", "200"], "--max-new-tokens"),
    ("ppo", ["--prompts", "PROMPTS", "--max-new-tokens", "96"], "--max-new-tokens"),
    ("ppo", ["--rm", "SFT"], "holds a 'gpt' model, expected 'scalar'"),
    ("ppo", ["--prompts", "PROMPTS", "--prompts-per-iter", "9"], "--prompts-per-iter 9"),
    ("dpo", ["--loss-type", "ipo", "--label-smoothing", "0.1"], "--label-smoothing"),
    ("dpo", ["--label-smoothing", "0.5"], "--label-smoothing"),
    ("dpo", ["--beta", "0"], "--beta"),
    ("dpo", ["--loss-type", "hinge"], "--loss-type"),
    ("dpo", ["--grad-clip", "-1"], "--grad-clip must be positive"),
    ("dpo", ["--data", "/nonexistent/prefs.jsonl"], "/nonexistent/prefs.jsonl"),
    *([("dpo", ["--device", "cuda"], "--device cuda")] if not torch.cuda.is_available() else []),
]


@pytest.mark.parametrize("stage, argv, words", BAD_FLAGS,
                         ids=[f"{s} {' '.join(a)}" for s, a, _ in BAD_FLAGS])
def test_bad_flags_are_refused_naming_the_flag(tmp_path, capsys, dirs, stage, argv, words):
    """A bad flag, value or combination exits non-zero with one line naming the flag (or the
    missing path), before anything is written."""
    _, _, flags, _, _ = STAGES[stage]
    argv = [dirs[a.lower()] if a in ("SFT", "PROMPTS") else a for a in argv]
    out = str(tmp_path / "out")
    refused(capsys, stage, flags(dirs) + argv + ["--out", out], out, words)


# The valid range of every numeric flag, as each config's check() enforces it (floats must
# also be finite, which the parser enforces). Fields missing here take any finite value.
positive = lambda v: v > 0
non_negative = lambda v: v >= 0
seed_range = lambda v: 0 <= v < 2**32
unit = lambda v: 0 <= v <= 1
RANGES = {
    "sft": dict(seed=seed_range, n_layer=positive, n_head=lambda v: v > 0 and 128 % v == 0,
                n_embd=lambda v: v > 0 and v % 4 == 0, block_size=positive,
                vocab_size=lambda v: v >= 256, n_examples=positive, max_steps=positive,
                batch_size=positive, grad_accum=positive, lr=positive, min_lr_ratio=unit,
                warmup=non_negative, weight_decay=non_negative, grad_clip=positive,
                log_every=positive, eval_every=positive, ckpt_every=positive,
                n_show=non_negative, max_new_tokens=positive, eval_temperature=non_negative),
    "rm": dict(seed=seed_range, n_pairs=positive, n_val_pairs=positive, n_test_pairs=positive,
               responses_per_prompt=lambda v: v >= 2, pair_temperature=positive,
               max_new_tokens=positive, max_steps=positive, batch_size=positive, lr=positive,
               min_lr_ratio=unit, warmup=non_negative, weight_decay=non_negative,
               grad_clip=positive, eval_every=positive, patience=positive),
    "ppo": dict(seed=seed_range, iterations=positive, prompts_per_iter=positive,
                samples_per_prompt=positive, max_new_tokens=positive, temperature=positive,
                kl_coef=non_negative, target_kl=positive, kl_horizon=positive, gamma=unit,
                lam=unit, epochs=positive, minibatch_size=positive,
                clip_eps=lambda v: 0 < v < 1, vf_coef=non_negative, ent_coef=non_negative,
                value_clip=positive, lr=positive, value_lr=positive, warmup=non_negative,
                grad_clip=positive, eval_every=positive, ckpt_every=positive),
    "dpo": dict(seed=seed_range, beta=positive, label_smoothing=lambda v: 0 <= v < 0.5,
                max_steps=positive, batch_size=positive, lr=positive, min_lr_ratio=unit,
                warmup=non_negative, weight_decay=non_negative, grad_clip=positive,
                eval_every=positive, ckpt_every=positive, max_new_tokens=positive),
}
CONFIGS = {"sft": train_sft.SFTConfig, "rm": train_rm.RMConfig, "ppo": train_ppo.PPOConfig,
           "dpo": train_dpo.DPOConfig}
NUMBERS = st.one_of(st.integers(-3, 3), st.integers(-2**40, 2**40),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, 1e-300, 0.5, 1.0, 2**32]))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_numeric_flag_is_range_checked(data, capsys):
    """Hypothesis over (script, numeric flag, value): a value in the flag's range parses to
    itself; any other value (out of range, nan, ±inf, a float for an int) exits 2 with one line
    naming the flag — before any file is touched."""
    stage = data.draw(st.sampled_from(list(RANGES)))
    field = data.draw(st.sampled_from(sorted(RANGES[stage])))
    valid = RANGES[stage][field]
    kind = {f.name: f.type for f in dataclasses.fields(CONFIGS[stage])}[field]
    value = data.draw(NUMBERS)
    text = repr(value)  # ints print as ints, floats with a point or as nan / inf
    flag = "--" + field.replace("_", "-")
    parses = (isinstance(value, int) or "float" in str(kind)) and (
        not isinstance(value, float) or value == value and abs(value) != float("inf"))
    capsys.readouterr()
    try:
        cfg = STAGES[stage][0].parse_config(CONFIGS[stage], [f"{flag}={text}"], PROG[stage])
    except SystemExit as e:
        err = capsys.readouterr().err
        assert not (parses and valid(float(text))), f"{flag}={text} was refused: {err}"
        assert e.code == 2 and err.count("\n") == 1 and flag in err, err
        return
    assert parses and valid(float(text)), f"{flag}={text} was accepted"
    assert getattr(cfg, field) == float(text)


# ----------------------------------------------------------------------------------------------
# 4. Numbers: NaN / inf stop the run; losses stay finite for extreme inputs
# ----------------------------------------------------------------------------------------------

def poison(monkeypatch, owner, name, at, bad, count=lambda: True):
    """Replace owner.name by a wrapper whose `at`-th counted call returns bad(real result)."""
    real, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        if count():
            calls[0] += 1
            if calls[0] == at:
                return bad(out)
        return out
    monkeypatch.setattr(owner, name, wrapped)


nan_loss = lambda out: (out[0] * float("nan"), out[1])
inf_norm = lambda out: torch.tensor(float("inf"))
training = torch.is_grad_enabled  # validation and rollouts run under no_grad
# PPO with the kill tests' flags: 4 responses per iteration, minibatches of 2, 2 epochs -> 4
# updates per iteration, each clipping the policy's gradient, then the value model's.
NAN_CASES = [  # (stage, patch target, name, counted call, quantity, bad step, value)
    ("sft", train_sft, "sft_loss", 5, "loss", 5, "nan"),
    ("sft", torch.nn.utils, "clip_grad_norm_", 5, "grad_norm", 5, "inf"),
    ("rm", train_rm, "reward_loss", 5, "loss", 5, "nan"),
    ("rm", torch.nn.utils, "clip_grad_norm_", 5, "grad_norm", 5, "inf"),
    ("dpo", train_dpo, "dpo_loss", 5, "loss", 5, "nan"),
    ("dpo", torch.nn.utils, "clip_grad_norm_", 5, "grad_norm", 5, "inf"),
    # r_φ scores a rollout in 4 length-sorted groups (training.by_length): the 3rd rollout's first
    ("ppo", ScalarHeadModel, "score", 2 * 4 + 1, "proxy_reward", 3, "nan"),
    ("ppo", train_ppo, "ppo_loss", 2 * 4 + 1, "loss", 3, "nan"),
    ("ppo", torch.nn.utils, "clip_grad_norm_", 2 * 8 + 1, "policy_grad_norm", 3, "inf"),
    ("ppo", torch.nn.utils, "clip_grad_norm_", 2 * 8 + 2, "value_grad_norm", 3, "inf"),
]


@pytest.mark.parametrize("stage, owner, name, at, quantity, step, value", NAN_CASES,
                         ids=[f"{c[0]} {c[4]}" for c in NAN_CASES])
def test_non_finite_value_stops_the_run_and_keeps_the_last_checkpoint(
        tmp_path, capsys, monkeypatch, dirs, stage, owner, name, at, quantity, step, value):
    """A NaN or inf in a loss, a reward or a gradient norm stops the run with one line naming
    the quantity and the step, numbered as metrics.jsonl numbers steps (the update that would
    have been step k); no row for that step is logged, and OUT/checkpoint.pt still loads and
    holds the last checkpointed step, with finite weights."""
    module, _, flags, _, _ = STAGES[stage]
    bad = nan_loss if quantity == "loss" else inf_norm if value == "inf" else (
        lambda r: r * float("nan"))
    poison(monkeypatch, owner, name, at, bad, count=training if owner is not ScalarHeadModel
           else lambda: True)
    out = str(tmp_path / stage)
    capsys.readouterr()
    assert run_main(module, flags(dirs) + ["--out", out]) == 1
    err = capsys.readouterr().err
    assert err == (f"{PROG[stage]}: error: step {step}: {quantity} is {value}; stopping (the "
                   f"last good checkpoint is kept)\n")
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == (step - 1) // 2 * 2  # every stage here checkpoints every 2 steps
    assert all(torch.isfinite(t).all() for t in ck["model"].values())
    assert all(r["step"] < step for r in read_metrics(os.path.join(out, "metrics.jsonl")))


EXTREME = st.sampled_from([-1e4, -88.8, -20.0, -1.0, 0.0, 1e-3, 1.0, 20.0, 88.8, 1e4])
DTYPES = [pytest.param(torch.float32, "cpu", id="float32"),
          pytest.param(torch.bfloat16, "cuda", id="bf16-cuda", marks=pytest.mark.skipif(
              not torch.cuda.is_available(), reason="bf16 is checked where CUDA exists"))]


def extreme(draw, shape, dtype, device):
    n = torch.Size(shape).numel()
    values = draw(st.lists(EXTREME, min_size=n, max_size=n))
    return torch.tensor(values).reshape(shape).to(device, dtype).requires_grad_()


def assert_finite(loss, *inputs):
    loss.backward()
    assert torch.isfinite(loss.float()).all(), loss
    for x in inputs:
        assert x.grad is None or torch.isfinite(x.grad.float()).all(), x.grad


@pytest.mark.parametrize("dtype, device", DTYPES)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_loss_is_finite_for_inputs_up_to_1e4(dtype, device, data):
    """sft_loss (logits), reward_loss (rewards), dpo_loss in its three forms (log-prob
    differences), policy_loss (log-ratios up to ±1e4: r = exp(1e4) overflows, hence the
    documented clamp), value_loss and ppo_loss with entropy: each loss and its gradients stay
    finite for any mix of inputs between −1e4 and 1e4."""
    draw = data.draw
    B, T, V = 2, 4, 5
    logits = extreme(draw, (B, T, V), dtype, device)
    tokens = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool, device=device)
    assert_finite(train_sft.sft_loss(logits, tokens, mask)[0], logits)

    r_w, r_l = extreme(draw, (B,), dtype, device), extreme(draw, (B,), dtype, device)
    assert_finite(train_rm.reward_loss(r_w, r_l)[0], r_w, r_l)

    beta = draw(st.sampled_from([0.01, 0.1, 1.0, 10.0]))
    for loss_type, smoothing in (("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)):
        logps = [extreme(draw, (B,), dtype, device) for _ in range(4)]
        loss, _ = train_dpo.dpo_loss(*logps, beta, smoothing, loss_type)
        assert_finite(loss, *logps)

    logp, old_logp = extreme(draw, (B, T), dtype, device), extreme(draw, (B, T), dtype, device)
    adv, values, old_values, returns = (extreme(draw, (B, T), dtype, device) for _ in range(4))
    assert_finite(train_ppo.policy_loss(logp, old_logp.detach(), adv.detach(), mask)[0], logp)
    for clip in (None, 0.2):
        values.grad = None
        assert_finite(train_ppo.value_loss(values, old_values.detach(), returns.detach(), mask,
                                           clip)[0], values)
    logits.grad = logp.grad = values.grad = None
    loss, stats = train_ppo.ppo_loss(logp, old_logp.detach(), adv.detach(), values,
                                     old_values.detach(), returns.detach(), mask,
                                     entropy=token_entropy(logits[:, :, :]), ent_coef=0.01)
    assert_finite(loss, logp, values, logits)
    assert all(torch.isfinite(v.float()).all() for k, v in stats.items()
               if k != "explained_variance")  # (nan when the returns are constant, by design)


# ----------------------------------------------------------------------------------------------
# 5. Checkpoint safety
# ----------------------------------------------------------------------------------------------

def test_stage_checkpoints_hold_only_weights_only_types(references):
    """Every checkpoint a stage writes (RM's best.pt too) loads with torch.load(weights_only=True)
    on its own: only tensors, numbers, strings, lists and dicts, so loading runs no code."""
    paths = [os.path.join(references[s], "checkpoint.pt") for s in STAGES]
    paths.append(os.path.join(references["rm"], "best.pt"))
    for path in paths:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert ck["format"] == "minirlhf-checkpoint-v1" and ck["model"]


class RunsCode:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def corrupt(folder, how, tmp_path):
    """Damage a copy of a stage folder's checkpoint in one of the ways a user meets."""
    path = os.path.join(folder, "checkpoint.pt")
    if how == "truncated":
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
    elif how == "runs code":
        torch.save({"format": "minirlhf-checkpoint-v1", "x": RunsCode(tmp_path / "ran")}, path)
    else:
        ck = load_checkpoint(path)
        if how == "bigger model":
            ck["model_config"]["n_embd"] *= 2
        else:  # "other tokenizer"
            ck["tokenizer"]["fingerprint"] = "0" * 16
        atomic_torch_save(ck, path)


SAFETY = [  # (stage resumed, damage to its own OUT/checkpoint.pt, words in the message)
    *[(s, "truncated", "not a readable checkpoint (truncated") for s in STAGES],
    *[(s, "runs code", "not a readable checkpoint") for s in STAGES],
    *[(s, "bigger model", "checkpoint is for another model config: n_embd=64 (run wants 32)")
      for s in STAGES],
    *[(s, "other tokenizer", "checkpoint was trained with another tokenizer")
      for s in ("rm", "ppo", "dpo")],
]


@pytest.mark.parametrize("stage, how, words", SAFETY, ids=[f"{s} {h}" for s, h, _ in SAFETY])
def test_resume_refuses_a_checkpoint_that_does_not_fit(tmp_path, capsys, dirs, references,
                                                       stage, how, words):
    """--resume on a truncated checkpoint, a pickle that would run code, one for another model
    size or another tokenizer: one line naming the file and the problem, no code run, and OUT
    left as it was."""
    out = str(tmp_path / "out")
    shutil.copytree(references[stage], out)
    corrupt(out, how, tmp_path)
    _, _, flags, _, _ = STAGES[stage]
    refused(capsys, stage, flags(dirs) + ["--out", out, "--resume"], out,
            os.path.join(out, "checkpoint.pt"), words)
    assert not (tmp_path / "ran").exists()


def test_other_model_size_flags_and_tokenizers_are_refused(tmp_path, capsys, dirs, references):
    """SFT --resume with flags for another model size; an SFT folder whose tokenizer file is
    not the checkpoint's; a reward model whose tokenizer differs from the policy's; an --sft
    folder holding a truncated checkpoint: each is one line naming the file."""
    sft = str(tmp_path / "sft")
    shutil.copytree(references["sft"], sft)
    refused(capsys, "sft", SFT_FLAGS + ["--out", sft, "--resume", "--n-layer", "2"], sft,
            "checkpoint is for another model config: n_layer=1 (run wants 2)")

    other = Tokenizer.train("a different corpus, a different tokenizer " * 20, 260)
    other.save(os.path.join(sft, "tokenizer.tiktoken"))
    refused(capsys, "sft", SFT_FLAGS + ["--out", sft, "--resume"], sft,
            "tokenizer.tiktoken does not match the checkpoint")

    rm = str(tmp_path / "rm")
    shutil.copytree(references["rm"], rm)
    other.save(os.path.join(rm, "tokenizer.tiktoken"))
    ck = load_checkpoint(os.path.join(rm, "checkpoint.pt"))
    ck["tokenizer"]["fingerprint"] = other.fingerprint()
    atomic_torch_save(ck, os.path.join(rm, "checkpoint.pt"))
    out = str(tmp_path / "ppo")
    refused(capsys, "ppo", ppo_flags(dirs) + ["--rm", rm, "--out", out], out,
            "uses another tokenizer")

    broken = str(tmp_path / "broken_sft")
    shutil.copytree(references["sft"], broken)
    corrupt(broken, "truncated", tmp_path)
    for stage in ("rm", "ppo", "dpo"):
        out = str(tmp_path / f"{stage}_on_broken")
        refused(capsys, stage, STAGES[stage][2](dirs) + ["--sft", broken, "--out", out], out,
                os.path.join(broken, "checkpoint.pt"), "truncated")


def test_ppo_warmup_zero_means_no_warmup(tmp_path, dirs):
    """--warmup 0 (allowed, like every stage's warmup >= 0) trains at the full learning rates
    from the first iteration instead of dividing by zero."""
    out = str(tmp_path / "ppo")
    assert run_main(train_ppo, ppo_flags(dirs) + ["--out", out, "--warmup", "0",
                                                  "--iterations", "1", "--ckpt-every", "1"]) == 0
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert {g["lr"] for g in ck["optimizer"]["param_groups"]} == {train_ppo.PPOConfig.lr}
    assert {g["lr"] for g in ck["extra"]["value_optimizer"]["param_groups"]} == {
        train_ppo.PPOConfig.value_lr}
