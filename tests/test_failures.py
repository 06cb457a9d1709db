"""Failures around a run, not inside its numbers: each ends in one `prog: error: ...` line, never a
traceback, and leaves nothing half-written (the companion of tests/test_reliability.py).

1. The output folder: an --out that cannot be a folder (a file, '', a name too long, a read-only
   disk) is refused naming --out; a second run into a folder another run holds (fresh, --resume
   or --overwrite) is refused naming the folder and the process; temporary files of killed
   writes are removed at start; a run that fails before its first step leaves nothing behind,
   not even the folder it made; a write that fails (a full disk, a read-only folder) names the
   file and the cause and leaves the last good file and no temporary one.
2. Path flags: every flag of every script that names a file or folder is checked before any
   work, missing, empty or of the wrong kind, naming the flag; defaults count.
3. Loading: a stage whose weights hold NaN or inf is refused by every script and tool that loads
   it; a tokenizer rank file with a huge, negative, repeated or unreadable rank, a repeated
   token or a missing byte is refused naming the line.

Most cases fail before any training, so the file runs in seconds; a few tiny SFT runs check
the failures that come mid-run.
"""
import base64
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch

import train_dpo
import train_ppo
import train_rm
import train_sft
from minirlhf import chat, training
from minirlhf.checkpoint import (CheckpointError, atomic_torch_save, load_checkpoint, load_stage,
                                 save_stage, write_json)
from minirlhf.data import write_jsonl
from minirlhf.errors import WriteError
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel
from minirlhf.tokenizer import Tokenizer, TokenizerError, load_ranks, save_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"sft": (train_sft, train_sft.SFTConfig), "rm": (train_rm, train_rm.RMConfig),
           "ppo": (train_ppo, train_ppo.PPOConfig), "dpo": (train_dpo, train_dpo.DPOConfig)}
PROG = {name: f"train_{name}.py" for name in SCRIPTS}
TINY_SFT = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--n-examples", "200",
            "--batch-size", "16", "--n-show", "0", "--max-new-tokens", "8", "--eval-samples", "1",
            "--warmup", "2", "--device", "cpu"]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # "No space left on device"


def run_main(module, argv) -> int:
    """A script's main() in-process; its exit code (0 when it returns)."""
    try:
        module.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def one_line(capsys, module, argv, prog: str, code: int) -> str:
    """Run main(argv): exit `code` and exactly one stderr line `prog: error: ...`; returns it."""
    capsys.readouterr()
    assert run_main(module, argv) == code
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


def files_in(folder) -> dict | None:
    """A folder's files and their bytes; None if there is no folder."""
    if not os.path.isdir(folder):
        return None
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, n))}


@pytest.fixture
def inputs(tmp_path):
    """Inputs that exist but are no use: a stage folder with an unreadable checkpoint.pt, a data
    file, a tokenizer folder. Every path check passes on them; loading the stage fails."""
    d = tmp_path / "inputs"
    (d / "stage").mkdir(parents=True)
    (d / "stage" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    (d / "tok").mkdir()
    (d / "tok" / "tokenizer.tiktoken").write_text("")
    (d / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (d / "empty").mkdir()
    return {"stage": str(d / "stage"), "data": str(d / "data.jsonl"), "tok": str(d / "tok"),
            "empty": str(d / "empty"), "missing": str(d / "nope")}


def base_flags(script, inputs) -> list[str]:
    """Flags that point every path a script reads by default at `inputs`."""
    stage, data = inputs["stage"], inputs["data"]
    return {"sft": [], "rm": ["--sft", stage], "ppo": ["--sft", stage, "--rm", stage],
            "dpo": ["--sft", stage, "--data", data]}[script] + ["--device", "cpu"]


def failing_flags(script, inputs) -> list[str]:
    """`base_flags` that fail right after the run claims OUT: its stage will not load."""
    return base_flags(script, inputs) + (["--init", inputs["stage"]] if script == "sft" else [])


# ----------------------------------------------------------------------------------------------
# 1. The output folder
# ----------------------------------------------------------------------------------------------

def raise_for(name_part, error, target=os, attr="makedirs"):
    """A stand-in for target.attr that raises `error` when its path holds name_part."""
    real = getattr(target, attr)

    def fake(path, *args, **kwargs):
        if name_part in os.fspath(path):
            raise error
        return real(path, *args, **kwargs)
    return fake


EROFS = OSError(errno.EROFS, os.strerror(errno.EROFS))
OUT_CASES = {  # case -> (how to make it, the --out value from tmp, the message after --out X: )
    "a file": (lambda p: p.write_text("x"), "file", "a file, not a folder"),
    "empty": (None, "", "an empty path"),
    "a name too long": (None, "n" * 300, "cannot create the folder (File name too long)"),
    "under a file": (lambda p: p.parent.write_text("x"), "f/out",
                     "cannot create the folder (Not a directory)"),
    "read-only disk, new folder": ("makedirs", "readonly-disk/out",
                                   "cannot create the folder (Read-only file system)"),
    "read-only disk, folder there": ("open", "readonly-disk",
                                     "cannot write there (Read-only file system)"),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", OUT_CASES)
def test_an_out_that_cannot_be_a_folder_is_refused(tmp_path, capsys, monkeypatch, inputs,
                                                   script, case):
    """--out naming a file, '', a 300-character name, a path under a file, or a folder on a
    read-only disk (simulated: EROFS from makedirs or from creating OUT/.lock, since root writes
    through chmod) ends in one line naming --out and the cause, exit 2, and nothing is created."""
    make, name, words = OUT_CASES[case]
    out = str(tmp_path / name) if name else ""
    if callable(make):
        make(tmp_path / name)
    if make == "makedirs":
        monkeypatch.setattr(os, "makedirs", raise_for("readonly-disk", EROFS))
    if make == "open":
        (tmp_path / "readonly-disk").mkdir()
        monkeypatch.setattr(os, "open", raise_for(".lock", EROFS, attr="open"))
    before = sorted(os.listdir(tmp_path))
    err = one_line(capsys, SCRIPTS[script][0], base_flags(script, inputs) + ["--out", out],
                   PROG[script], 2)
    assert err.endswith(f": {words}\n") and f"--out {training.shown(out)}: " in err, err
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder anyway")
def test_a_read_only_folder_is_refused_without_root(tmp_path, capsys, inputs):
    """A folder without write permission (chmod 555) is refused naming --out: exit 2."""
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        err = one_line(capsys, train_sft, ["--out", str(out)], "train_sft.py", 2)
    finally:
        out.chmod(0o755)
    assert err == f"train_sft.py: error: --out {out}: cannot write there (Permission denied)\n"


@contextlib.contextmanager
def locked_by(out, pid="4242"):
    """Hold OUT/.lock as another run does (flock on its own open file), with `pid` in it."""
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{pid}\n".encode())
    try:
        yield
    finally:
        os.close(fd)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("mode", [[], ["--resume"], ["--overwrite"]], ids=["fresh", "resume",
                                                                           "overwrite"])
def test_a_second_run_into_a_held_folder_is_refused(tmp_path, capsys, inputs, script, mode):
    """While another run holds OUT/.lock, a run into OUT, fresh, --resume or --overwrite, is
    refused in one line naming the folder and the holder's process, exit 2, and changes
    nothing. Once the holder lets go, its .lock file blocks nothing, and the next run removes it
    when it ends."""
    out = str(tmp_path / "out")
    module, argv = SCRIPTS[script][0], failing_flags(script, inputs) + ["--out", out] + mode
    with locked_by(out):
        before = files_in(out)
        err = one_line(capsys, module, argv, PROG[script], 2)
        assert err == (f"{PROG[script]}: error: {out} is in use by another run (process 4242): "
                       f"wait for it to end, or pick another --out\n")
        assert files_in(out) == before
    err = one_line(capsys, module, argv, PROG[script], 1)  # past the lock: the dummy stage fails
    assert "not a readable checkpoint" in err and not os.path.exists(os.path.join(out, ".lock"))


def wait_for(condition, proc, what, timeout=120.0):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_two_real_runs_into_one_folder_do_not_both_write(tmp_path, capsys):
    """A second SFT process into the folder a first one is training in is refused: with
    --resume or --overwrite by the lock, naming the folder and the first run's process; plain,
    because the folder holds a run. Once the first run is killed its lock is gone with it."""
    out = str(tmp_path / "sft")
    argv = TINY_SFT + ["--max-steps", "100000", "--ckpt-every", "1", "--eval-every", "100000",
                       "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train_sft.py", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "checkpoint.pt")), proc,
                 "the first checkpoint")
        held = f"{out} is in use by another run (process {proc.pid})"
        second = argv + ["--max-steps", "2"]  # short, should it get through
        for mode in (["--resume"], ["--overwrite"]):
            assert held in one_line(capsys, train_sft, second + mode, "train_sft.py", 2)
        assert "already holds a run" in one_line(capsys, train_sft, second, "train_sft.py", 2)
    finally:
        proc.kill()
        proc.wait()
    training.claim_out(out)  # the killed run's lock went with its process
    training.release_out(out, failed=False)
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] >= 1


STALE = ["checkpoint.pt.tmp123", "best.pt.tmp9", "config.json.tmp77", "metrics.jsonl.tmp5",
         "eval.json.tmp4", "tokenizer.tiktoken.tmp12", ".prefs.jsonl.1a2b3c4d.tmp",
         ".samples.jsonl.deadbeef.tmp"]
KEPT = ["notes.tmp", "checkpoint.pt.tmp", "data.tmp12x", ".hidden", "prefs.jsonl", "a.tmp1.txt"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_temporary_files_of_killed_writes_are_removed_at_start(tmp_path, capsys, inputs,
                                                               script):
    """The temporary files a killed write leaves (NAME.tmpPID, .NAME.HEX.tmp) are removed when
    a run claims the folder, even one that then fails; other files, and a folder named like a
    temporary file, stay as they were."""
    out = tmp_path / "out"
    (out / "x.tmp1").mkdir(parents=True)
    for name in STALE + KEPT:
        (out / name).write_text(name)
    one_line(capsys, SCRIPTS[script][0], failing_flags(script, inputs) + ["--out", str(out)],
             PROG[script], 1)
    assert sorted(os.listdir(out)) == sorted(KEPT + ["x.tmp1"])
    assert all((out / name).read_text() == name for name in KEPT)


def out_folder(tmp_path, where: str):
    """(--out, its files now): a folder the run must create with its parents, or one that is
    there already and holds a file of the user's."""
    out = tmp_path / ("a/b/out" if where == "new nested folder" else "out")
    if where != "new nested folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    return out, files_in(out)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("where", ["new nested folder", "folder with a file"])
def test_a_run_failing_before_its_first_step_leaves_nothing(tmp_path, capsys, inputs, script,
                                                            where):
    """A run that fails once it holds OUT (here: its stage will not load) leaves OUT as it found
    it: a folder it created is removed, with the parents it created; a folder that was there
    keeps its files and nothing else (no .lock)."""
    out, before = out_folder(tmp_path, where)
    one_line(capsys, SCRIPTS[script][0], failing_flags(script, inputs) + ["--out", str(out)],
             PROG[script], 1)
    assert files_in(out) == before
    assert not os.path.exists(tmp_path / "a")  # nested: the parents it made went too


@pytest.mark.parametrize("where", ["new nested folder", "folder with a file"])
def test_a_run_stopped_at_its_first_step_leaves_nothing(tmp_path, capsys, monkeypatch, where):
    """SFT stopped by a NaN loss at step 1, after it wrote config.json: the error names the
    step, and OUT ends as it was (the folder it made is gone)."""
    out, before = out_folder(tmp_path, where)
    real = train_sft.sft_loss
    monkeypatch.setattr(train_sft, "sft_loss",
                        lambda *a: (lambda loss, s: (loss * float("nan"), s))(*real(*a)))
    err = one_line(capsys, train_sft, TINY_SFT + ["--max-steps", "4", "--out", str(out)],
                   "train_sft.py", 1)
    assert "step 1: loss is nan" in err
    assert files_in(out) == before and not os.path.exists(tmp_path / "a")


def test_a_finished_run_leaves_no_lock_and_no_temporary_file(tmp_path):
    """A run that ends well gives its folder back: no .lock, no temporary file."""
    out = tmp_path / "sft"
    assert run_main(train_sft, TINY_SFT + ["--max-steps", "2", "--out", str(out)]) == 0
    names = os.listdir(out)
    assert "checkpoint.pt" in names and ".lock" not in names
    assert not [n for n in names if training.STALE.fullmatch(n)], names


# --- a write that fails ------------------------------------------------------------------------

def half_then(error):
    """A torch.save that writes half the bytes, then raises `error` (a full disk)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise error
    return save


ENFORCE = RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed "
                       "writing file data/0: file write failed")
SAVE_FAILURES = {  # case -> (patch target, attribute, replacement, the cause in the message)
    "torch.save: disk full": (torch, "save", half_then(ENOSPC), "No space left on device"),
    "torch.save: enforce fail": (torch, "save", half_then(ENFORCE),
                                 "PytorchStreamWriter failed writing file data/0: file write "
                                 "failed"),
    "fsync: disk full": (os, "fsync", lambda fd: full_disk_fsync(fd), "No space left on device"),
    "rename: read-only": (os, "replace", raise_for("ck.pt", EROFS, attr="replace"),
                          "Read-only file system"),
}


@pytest.mark.parametrize("case", SAVE_FAILURES)
def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch, case):
    """atomic_torch_save failing mid-write (ENOSPC from torch.save or fsync, torch's 'enforce
    fail' RuntimeError, EROFS on the rename) raises one CheckpointError line naming the file
    and the cause; the checkpoint there and its bytes stay, and no temporary file is left."""
    target, attr, fake, cause = SAVE_FAILURES[case]
    path = str(tmp_path / "ck.pt")
    atomic_torch_save({"w": torch.ones(3)}, path)
    before = open(path, "rb").read()
    monkeypatch.setattr(target, attr, fake)
    with pytest.raises(CheckpointError) as info:
        atomic_torch_save({"w": torch.zeros(300)}, path)
    monkeypatch.undo()
    assert str(info.value) == (f"{path}: could not write it ({cause}); the last good checkpoint "
                               f"is kept")
    assert os.listdir(tmp_path) == ["ck.pt"] and open(path, "rb").read() == before


def fails_after(text):
    """A json.dump that writes `text`, then finds the disk full."""
    def dump(obj, f, **kwargs):
        f.write(text)
        raise ENOSPC
    return dump


def full_disk_fsync(fd):
    raise ENOSPC


WRITERS = {  # writer -> (write(path, value), patch target, attribute, what fails)
    "write_json": (write_json, json, "dump", fails_after("{")),
    "write_jsonl": (lambda p, v: write_jsonl(p, [v]), os, "fsync", full_disk_fsync),
    "save_ranks": (lambda p, v: save_ranks({bytes([b]): b + v["a"] for b in range(256)}, p), os,
                   "fsync", full_disk_fsync),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_failed_write_of_any_file_names_it_and_leaves_no_trace(tmp_path, monkeypatch, writer):
    """write_json, write_jsonl and save_ranks (config.json and eval.json, samples and pairs,
    tokenizer.tiktoken) on a full disk: one WriteError line naming the file and the cause; the
    file there keeps its bytes and no temporary file is left."""
    write, target, attr, fake = WRITERS[writer]
    path = str(tmp_path / "out.json")
    write(path, {"a": 1})
    before = open(path, "rb").read()
    monkeypatch.setattr(target, attr, fake)
    with pytest.raises(WriteError) as info:
        write(path, {"a": 2})
    monkeypatch.undo()
    assert str(info.value) == f"{path}: could not write it (No space left on device)"
    assert os.listdir(tmp_path) == ["out.json"] and open(path, "rb").read() == before


def nth_checkpoint_write_fails(monkeypatch, n, error, name="checkpoint.pt"):
    """torch.save of the n-th write of OUT/`name` writes half its bytes, then raises `error`."""
    real, calls, fail = torch.save, [0], half_then(error)

    def save(obj, f, *args, **kwargs):
        if os.path.basename(getattr(f, "name", "")).startswith(f"{name}.tmp"):
            calls[0] += 1
            if calls[0] == n:
                return fail(obj, f, *args, **kwargs)
        return real(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error, cause", [(ENOSPC, "No space left on device"),
                                          (ENFORCE, "PytorchStreamWriter failed writing file "
                                                    "data/0: file write failed")],
                         ids=["ENOSPC", "enforce fail"])
def test_sft_stopped_by_a_full_disk_keeps_its_last_checkpoint(tmp_path, capsys, monkeypatch,
                                                              error, cause):
    """SFT whose second checkpoint write fails half-way ends with one line naming
    OUT/checkpoint.pt and the cause, exit 1; the step-2 checkpoint still loads, and neither a
    temporary file nor the lock is left."""
    out = str(tmp_path / "sft")
    nth_checkpoint_write_fails(monkeypatch, 2, error)
    err = one_line(capsys, train_sft, TINY_SFT + ["--max-steps", "6", "--ckpt-every", "2",
                                                  "--eval-every", "100", "--out", out],
                   "train_sft.py", 1)
    assert err == (f"train_sft.py: error: {out}/checkpoint.pt: could not write it ({cause}); "
                   f"the last good checkpoint is kept\n")
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 2
    assert not [n for n in os.listdir(out) if n == ".lock" or training.STALE.fullmatch(n)]


def test_sft_with_eval_json_on_a_full_disk(tmp_path, capsys, monkeypatch):
    """The last write of a run, eval.json, failing: one line naming it and the cause, exit 1,
    no eval.json and no temporary file; the final checkpoint stays."""
    out = str(tmp_path / "sft")
    real = json.dump

    def dump(obj, f, **kwargs):
        if "eval.json" in getattr(f, "name", ""):
            raise ENOSPC
        return real(obj, f, **kwargs)
    monkeypatch.setattr(json, "dump", dump)
    err = one_line(capsys, train_sft, TINY_SFT + ["--max-steps", "2", "--out", out],
                   "train_sft.py", 1)
    assert err == f"train_sft.py: error: {out}/eval.json: could not write it (No space left on " \
                  f"device)\n"
    names = os.listdir(out)
    assert "eval.json" not in names and not [n for n in names if training.STALE.fullmatch(n)]
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 2


# ----------------------------------------------------------------------------------------------
# 2. Every path flag
# ----------------------------------------------------------------------------------------------

BAD_PATHS = {"data": ["missing", "empty", "a folder"],  # per kind of path flag (PATH_FLAGS)
             "stage": ["missing", "empty", "a folder without its file", "gpt2:missing"]}
BAD_PATHS["tokenizer"] = BAD_PATHS["stage"]


def bad_path(kind, case, inputs) -> tuple[str, str]:
    """(value, what the message says of it) for a path flag of this kind."""
    missing = inputs["missing"] + (".jsonl" if kind == "data" else "")
    inner = {"stage": "checkpoint.pt in this folder (train that stage first)",
             "tokenizer": "tokenizer.tiktoken in this folder"}
    return {"missing": (missing, "no such file" if kind == "data" else "no such file or folder"),
            "empty": ("", "an empty path"),
            "a folder": (inputs["empty"], "a folder, not a file"),
            "a folder without its file": (inputs["empty"], f"no {inner.get(kind)}"),
            "gpt2:missing": ("gpt2:" + inputs["missing"],
                             "no such folder (gpt2:DIR names a Hugging Face GPT-2 folder)")}[case]


PATH_CASES = [pytest.param(script, field, case, id=f"{script} --{field.replace('_', '-')} {case}")
              for script, (_, config) in SCRIPTS.items()
              for field in (f.name for f in dataclasses.fields(config))
              if field in training.PATH_FLAGS
              for case in BAD_PATHS[training.PATH_FLAGS[field]]]


@pytest.mark.parametrize("script, field, case", PATH_CASES)
def test_every_path_flag_names_a_path_that_is_there(tmp_path, capsys, inputs, script, field,
                                                    case):
    """Each path flag of each script (--data, --val-data, --test-data, --prompts,
    --eval-prompts: files; --sft, --rm, --init, --policy: stage folders or gpt2:DIR;
    --tokenizer) set to a missing path, '', or the wrong kind of path ends in one line naming
    the flag and the value, exit 2, before any work: OUT is not even created."""
    value, words = bad_path(training.PATH_FLAGS[field], case, inputs)
    flag = "--" + field.replace("_", "-")
    out = str(tmp_path / "out")
    err = one_line(capsys, SCRIPTS[script][0],
                   base_flags(script, inputs) + [flag, value, "--out", out], PROG[script], 2)
    assert err == f"{PROG[script]}: error: {flag} {shlex.quote(value)}: {words}\n"
    assert not os.path.exists(out)


def good_paths(config, inputs) -> dict:
    """Every path field of a config set to a path of its kind that is there."""
    kinds = {"data": inputs["data"], "stage": inputs["stage"], "tokenizer": inputs["tok"]}
    return {f.name: kinds[training.PATH_FLAGS[f.name]] for f in dataclasses.fields(config)
            if f.name in training.PATH_FLAGS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_paths_that_are_there_pass(inputs, script):
    """Every path field set to a path of its kind (a stage folder or its checkpoint.pt, a
    tokenizer folder or its file, gpt2:DIR with DIR a folder) passes check_paths; so does none."""
    config = SCRIPTS[script][1]
    paths = good_paths(config, inputs)
    training.check_paths(config(**paths))
    stage_file = os.path.join(inputs["stage"], "checkpoint.pt")
    training.check_paths(config(**{k: (stage_file if training.PATH_FLAGS[k] == "stage" else
                                       "gpt2:" + inputs["empty"] if k == "tokenizer" else v)
                                   for k, v in paths.items()}))
    defaults = config()
    training.check_paths(config(**{k: v if getattr(defaults, k) is not None else None
                                   for k, v in paths.items()}))


def test_defaults_count_and_unused_ones_do_not(tmp_path, monkeypatch, capsys, inputs):
    """A default path is checked like a given one (train_ppo.py's --sft out/sft, from a folder
    without out/); train_rm.py --pairs-only with --policy never reads --sft, so its default is
    not required."""
    monkeypatch.chdir(tmp_path)
    err = one_line(capsys, train_ppo, ["--device", "cpu"], "train_ppo.py", 2)
    assert err == "train_ppo.py: error: --sft out/sft: no such file or folder\n"
    rm = train_rm.RMConfig(make_pairs=True, pairs_only=True, policy=inputs["stage"])
    training.check_paths(rm)
    with pytest.raises(ValueError, match="^--sft out/sft: no such file or folder$"):
        training.check_paths(dataclasses.replace(rm, pairs_only=False))


LABELLER_FLAGS = {  # case -> (flags, the message after "train_rm.py: error: ")
    "robot": (["--labeller", "robot"],
              "--labeller robot: human, or ai:DIR with DIR a reward-model stage folder"),
    "ai: and no folder": (["--labeller", "ai:"],
                          "--labeller ai: names no folder: ai:DIR, DIR a reward-model stage"),
    "greedy without a judge": (["--judge-greedy"], "--judge-greedy needs --labeller ai:DIR"),
    "a judge and noise-free labels": (["--labeller", "ai:{stage}", "--noise-free-labels"],
                                      "--noise-free-labels trains on the human labeller's "
                                      "probability; it does not go with --labeller ai:DIR"),
    "a missing judge": (["--labeller", "ai:{missing}"],
                        "--labeller ai:{missing}: no such file or folder"),
    "a judge folder without its file": (["--labeller", "ai:{empty}"],
                                        "--labeller ai:{empty}: no checkpoint.pt in this folder "
                                        "(train that stage first)"),
    "a judge in --out": (["--labeller", "ai:{out}"], "--labeller ai:{out}: the judge is in --out, "
                         "which this run writes: copy it elsewhere or pick another --out"),
}


@pytest.mark.parametrize("case", LABELLER_FLAGS)
def test_a_bad_labeller_is_refused_before_any_work(tmp_path, capsys, inputs, case):
    """train_rm.py --labeller that is neither human nor ai:DIR, ai: without a folder,
    --judge-greedy without a judge, a judge with --noise-free-labels (which trains on the human
    labeller's probability), a judge folder that is not there or holds no checkpoint, and a
    judge in the folder the run writes: one line naming the flag, exit 2, and OUT is not even
    created."""
    flags, message = LABELLER_FLAGS[case]
    out = str(tmp_path / "out")
    flags = [f.format(out=out, **inputs) for f in flags]
    err = one_line(capsys, train_rm, base_flags("rm", inputs) + flags + ["--out", out],
                   "train_rm.py", 2)
    assert err == f"train_rm.py: error: {message.format(out=out, **inputs)}\n"
    assert not os.path.exists(out)


PPO_FLAGS = {  # case -> (flags, the message after "train_ppo.py: error: ")
    "a KL loss term with a critic": (["--kl-in", "loss"], "--kl-in loss is GRPO's form, for the "
                                     "critic-free --advantage grpo or group; with a value model "
                                     "the KL goes in the reward"),
    "a value model from no reward model": (["--reward", "gold", "--value-init", "rm"],
                                           "--value-init rm needs a reward model: --reward gold "
                                           "loads none (use --value-init sft)"),
    "a verifier without its reward": (["--verifier", "m:f"], "--verifier needs --reward verifier"),
    "no group std without grpo": (["--no-group-std"],
                                  "--no-group-std applies to --advantage grpo only"),
    "a grpo group of one": (["--advantage", "grpo", "--samples-per-prompt", "1"],
                            "--advantage grpo needs --samples-per-prompt of at least 2"),
}


DPO_FLAGS = {  # case -> (flags, the message after "train_dpo.py: error: ")
    "no rounds": (["--rounds", "0"], "--rounds must be positive"),
    "a round of no steps": (["--round-steps", "0"], "--round-steps must be positive"),
    "one response per prompt": (["--round-samples", "1"],
                                "--round-samples must be at least 2: a pair needs two responses"),
    "a robot labeller": (["--rounds", "2", "--labeller", "robot"],
                         "--labeller robot: world, or ai:DIR with DIR a reward-model stage "
                         "folder"),
    "ai: and no folder": (["--rounds", "2", "--labeller", "ai:"],
                          "--labeller ai: names no folder: ai:DIR, DIR a reward-model stage"),
    "a judge with one round": (["--labeller", "ai:{stage}"],
                               "--labeller labels the pairs of online DPO's later rounds: it "
                               "needs --rounds of at least 2"),
    "a missing judge": (["--rounds", "2", "--labeller", "ai:{missing}"],
                        "--labeller ai:{missing}: no such file or folder"),
}


REFUSED_FLAGS = [("ppo", case) for case in PPO_FLAGS] + [("dpo", case) for case in DPO_FLAGS]


@pytest.mark.parametrize("stage, case", REFUSED_FLAGS, ids=[f"{s} {c}" for s, c in REFUSED_FLAGS])
def test_a_flag_combination_that_cannot_work_is_refused_before_any_work(tmp_path, capsys,
                                                                        inputs, stage, case):
    """train_ppo.py's --reward, --verifier, --advantage grpo, --kl-in and --no-group-std, and
    train_dpo.py's --rounds, --round-steps, --round-samples and --labeller, in a combination
    that cannot work (out of range, naming no judge): one line naming the flags, exit 2, OUT
    not created."""
    module, table = (train_ppo, PPO_FLAGS) if stage == "ppo" else (train_dpo, DPO_FLAGS)
    flags, message = table[case]
    out = str(tmp_path / "out")
    flags = [f.format(**inputs) for f in flags]
    prog = f"train_{stage}.py"
    err = one_line(capsys, module, base_flags(stage, inputs) + flags + ["--out", out], prog, 2)
    assert err == f"{prog}: error: {message.format(**inputs)}\n"
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------
# 3. What loads: non-finite weights, bad tokenizer files
# ----------------------------------------------------------------------------------------------

def line(token: bytes, rank) -> str:
    """One line of a tiktoken rank file."""
    return f"{base64.b64encode(token).decode()} {rank}\n"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train("What is 2 plus 3? 2 plus 3 is 5. " * 20, 270)


def tiny_stage(folder, tok, kind="gpt", poison=None, name="transformer.ln_f.bias"):
    """A tiny random stage; poison: a value written into one weight, the tensor `name`."""
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(cfg) if kind == "gpt" else ScalarHeadModel(cfg)
    if poison is not None:
        with torch.no_grad():
            model.state_dict()[name].view(-1)[-1] = poison
    save_stage(str(folder), model=model, model_kind=kind, config={"note": "test"}, tokenizer=tok,
               step=0)
    return str(folder)


POISONS = [pytest.param(v, n, id=f"{v} in {n}") for v in (float("nan"), float("inf"), -float("inf"))
           for n in ("transformer.wpe.weight", "transformer.ln_f.bias")]


@pytest.mark.parametrize("value, name", POISONS)
def test_weights_with_nan_or_inf_are_refused_on_load(tmp_path, tok, value, name):
    """A checkpoint whose weights hold NaN, inf or -inf is refused by
    load_checkpoint, so by load_stage and --resume too: one CheckpointError naming the file and
    the first tensor that holds it."""
    folder = tiny_stage(tmp_path / "sft", tok, poison=value, name=name)
    path = os.path.join(folder, "checkpoint.pt")
    message = f"{path}: the weights hold NaN or inf values, first in {name} (a diverged run?)"
    for load in (load_checkpoint, load_stage):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert str(info.value) == message


def nan_stage_runs(stage, rm_stage, out):
    """(module, argv, prog, exit code) of every script and tool on a NaN stage."""
    return [(train_sft, ["--init", stage, "--out", out, "--device", "cpu"], "train_sft.py", 1),
            (train_sft, ["--explain", stage, "What is 2 plus 3?", "5"], "train_sft.py", 1),
            (train_rm, ["--sft", stage, "--out", out, "--device", "cpu"], "train_rm.py", 1),
            (train_dpo, ["--sft", stage, "--data", out + ".jsonl", "--out", out,
                         "--device", "cpu"], "train_dpo.py", 1),
            (train_ppo, ["--sft", stage, "--rm", rm_stage, "--out", out, "--device", "cpu"],
             "train_ppo.py", 1),
            (chat, [stage, "--prompt", "What is 2 plus 3?"], chat.PROG, 1),
            (chat, ["--compare", stage, stage, "--prompt", "hi"], chat.PROG, 1),
            (chat, ["score", rm_stage, "--prompt", "a", "--response", "b"], f"{chat.PROG} score",
             1)]


@pytest.mark.parametrize("i", range(8))
def test_every_script_and_tool_refuses_a_diverged_stage(tmp_path, capsys, tok, i):
    """A stage (or a reward model) with NaN weights, given to each script (--init, --sft,
    --explain) and to python -m minirlhf.chat (answers, --compare, score): one line naming the
    checkpoint, and no OUT left behind."""
    stage = tiny_stage(tmp_path / "sft", tok, poison=float("nan"))
    rm_stage = tiny_stage(tmp_path / "rm", tok, kind="scalar", poison=float("nan"),
                          name="head.bias")
    out = str(tmp_path / "out")
    write_jsonl(out + ".jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    module, argv, prog, code = nan_stage_runs(stage, rm_stage, out)[i]
    err = one_line(capsys, module, argv, prog, code)
    assert "checkpoint.pt: the weights hold NaN or inf values" in err
    assert not os.path.exists(out)


RANK_FILES = {  # case -> (the file's lines after the 256 bytes', dropped byte, message)
    "rank 1e20 written out": ([line(b"ab", 10**20)], None,
                              ":257: rank 100000000000000000000 is out of range (0 to 1048575)"),
    "rank 2**20": ([line(b"ab", 2**20)], None, ":257: rank 1048576 is out of range"),
    "negative rank": ([line(b"ab", -1)], None, ":257: rank -1 is out of range"),
    "rank as 1e20": (["YWI= 1e20\n"], None, ":257: not a tiktoken rank line"),
    "three fields": (["YWI= 300 x\n"], None, ":257: not a tiktoken rank line"),
    "not base64": (["!!! 300\n"], None, ":257: not a tiktoken rank line"),
    "a rank twice": ([line(b"ab", 5)], None, ":257: rank 5 is given twice (line 6 too)"),
    "a token twice": ([line(b"a", 300)], None, ":257: token b'a' is listed twice"),
    "a byte missing": ([line(b"ab", 256)], 0x61, ": byte 0x61 is not a token (a byte-level BPE "
                                                 "table holds all 256 bytes; 1 missing)"),
}


def rank_file(path, case) -> str:
    extra, dropped, _ = RANK_FILES[case]
    with open(path, "w") as f:
        f.writelines([line(bytes([b]), b) for b in range(256) if b != dropped] + extra)
    return str(path)


def unreadable_stage(folder, tok) -> str:
    """A stage folder whose checkpoint.pt is no checkpoint."""
    os.makedirs(folder)
    with open(os.path.join(folder, "checkpoint.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    return str(folder)


JUDGES = {  # case -> (how to make the judge folder, the message after --labeller ai:DIR: )
    "another tokenizer": (lambda d, tok: tiny_stage(d, Tokenizer.train("Who wrote Hamlet? " * 30,
                                                                       270), kind="scalar"),
                          "the judge uses another tokenizer than SFT\n"),
    "a language model": (lambda d, tok: tiny_stage(d, tok, kind="gpt"),
                         "{judge}/checkpoint.pt: holds a 'gpt' model, expected 'scalar'\n"),
    "an unreadable checkpoint": (unreadable_stage,
                                 "{judge}/checkpoint.pt: not a readable checkpoint"),
}


@pytest.mark.parametrize("case", JUDGES)
def test_a_judge_that_cannot_label_is_refused_in_one_line(tmp_path, capsys, tok, case):
    """train_rm.py --labeller ai:DIR with DIR a reward model on another tokenizer than SFT's, a
    language model, or a checkpoint that does not load: one line naming the flag and the
    folder, exit 1, and no OUT left behind."""
    make, message = JUDGES[case]
    sft = tiny_stage(tmp_path / "sft", tok)
    judge = make(str(tmp_path / "judge"), tok)
    data = str(tmp_path / "prefs.jsonl")
    write_jsonl(data, [{"prompt": "What is 2 plus 3?", "chosen": "5.", "rejected": "6."}])
    out = str(tmp_path / "out")
    err = one_line(capsys, train_rm, ["--sft", sft, "--data", data, "--labeller", f"ai:{judge}",
                                      "--out", out, "--device", "cpu"], "train_rm.py", 1)
    assert err.startswith(f"train_rm.py: error: --labeller ai:{judge}: "
                          f"{message.format(judge=judge)}"), err
    assert not os.path.exists(out)


@pytest.mark.parametrize("case", RANK_FILES)
def test_a_bad_rank_file_is_refused_naming_the_line(tmp_path, case):
    """load_ranks (every tokenizer load) refuses each bad rank file in one line naming the file
    and the line: a rank of 1e20 (tiktoken's OverflowError before), a negative or repeated rank
    or token (tiktoken's panic), a line that is not 'base64 rank', a byte that is no token."""
    path = rank_file(tmp_path / "tok.tiktoken", case)
    with pytest.raises(TokenizerError) as info:
        load_ranks(path)
    assert str(info.value).startswith(path + RANK_FILES[case][2]), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["rank 1e20 written out", "a rank twice", "a byte missing"])
def test_scripts_and_chat_refuse_a_bad_rank_file_in_one_line(tmp_path, capsys, tok, case):
    """train_sft.py --tokenizer FILE and chat on a stage whose tokenizer.tiktoken is bad: one
    line each naming the file, exit 1 (no traceback from tiktoken), and no OUT."""
    path = rank_file(tmp_path / "tok.tiktoken", case)
    out = str(tmp_path / "out")
    err = one_line(capsys, train_sft, ["--tokenizer", path, "--out", out, "--device", "cpu"],
                   "train_sft.py", 1)
    assert path + RANK_FILES[case][2] in err and not os.path.exists(out)
    stage = tiny_stage(tmp_path / "stage", tok)
    rank_file(os.path.join(stage, "tokenizer.tiktoken"), case)
    err = one_line(capsys, chat, [stage, "--prompt", "hi"], chat.PROG, 1)
    assert "tokenizer.tiktoken" + RANK_FILES[case][2] in err
