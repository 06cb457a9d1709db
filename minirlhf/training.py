"""What every training script does around its loop — and nothing of the algorithms themselves.

- `lr_at(step, ...)`: linear warmup then cosine decay, the schedule every stage uses.
- `make_optimizer(model, ...)`: AdamW, weight decay on matrices only (fused).
- `pad_batch(seqs, ...)`: right-padded (tokens, attn_mask, loss_mask) from token lists.
- `epoch_batches(...)`: an epoch's batches, grouped by length, a function of (seed, epoch) only.
- `pair_groups(pairs)`, `group_batches(...)`, `distinct_rows(seqs)`: preference pairs that share
  a response (one prompt's k responses make k(k−1)/2 pairs) batched together, and each distinct
  sequence of a batch run through the model once (train_rm.py, train_dpo.py).
- `MetricsLog`: appends one JSON line per logged step to OUT/metrics.jsonl; on resume it first cuts
  the file back to the checkpoint's step, so a killed run never leaves duplicated steps. Under
  torchrun only rank 0's log writes (`enabled=dist.is_main`).
- `check_finite`: a NaN or inf in a loss, reward or gradient norm stops the run with a message that
  names the quantity and the step (the last good checkpoint on disk is left as it is).
- `start_run`: checks that every path flag names a file or folder that is there
  (`check_paths`), refuses an --out that already holds a run (unless --resume or --overwrite),
  resolves the device and the seeds; under torchrun it joins the other processes first and
  returns who this one is (minirlhf/distributed.py). Then it claims OUT (`claim_out`): creates
  it, or says in one line why it cannot be one (a file, a name too long, a read-only disk),
  takes the lock OUT/.lock so that a second run into OUT is refused, and removes the temporary
  files of killed writes; and prints one line (where, on what, how long; the whole config with
  --verbose).
- `guarded_run`: decorates each script's train(): the claim ends with it (`release_out`), and a
  run that failed before its first step leaves nothing behind, not even the folder it made.
- `open_log`: the run's metrics log, opened once the inputs have been read; a fresh run then
  clears an old run's files (--overwrite) and writes OUT/config.json, so a run refused for bad
  input leaves OUT as it was.
- Around the loops of train_sft.py, train_rm.py and train_dpo.py, one call each:
  `checkpoint_to_resume` and `resume_state` (--resume: the checkpoint, then the weights,
  optimizer, random states and step), `save_run` (the checkpoint --resume reads),
  `batches_from` / `pair_batches_from` (the run's batches from a step on, this process's share),
  `optimizer_step` (clip, NaN guard, update), `due` (log / evaluate / checkpoint now?),
  `progress_bar`.

The loops themselves stay in the train_*.py scripts, flat and in the open (docs/design.md,
"Conventions", rule 7).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import json
import math
import os
import random
import re
import shlex
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import (CHECKPOINT, STAGES, TOKENIZER, check_compatible, check_stage,
                         load_checkpoint, rng_state, save_checkpoint, save_stage, set_rng_state,
                         write_json)
from .errors import CheckpointError, NonFiniteError, WriteError, replacing, write_failure
from .config import config_to_dict, format_config
from .device import resolve_device, set_precision, uses_bf16
from .distributed import Dist, broadcast, setup, shard


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to lr·min_lr_ratio at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases / LayerNorm / scalars do not (as in GPT-2 training).
    Fused: one kernel for all parameters, on CUDA and on CPU (where a world-model step took
    1.1 ms instead of the for-loop's 3.2 ms; tests/test_fast_path.py checks the same steps)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, fused=True)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def pad_batch(seqs: list[list[int]], n_prompt: list[int], pad_id: int, device=None):
    """Right-pad token lists. Returns tokens (B, T), attn_mask (B, T) and loss_mask (B, T), the
    last being 1 on response tokens (those at index >= n_prompt) — the targets SFT learns.

    Under bf16 autocast T is rounded up to a multiple of 8: oneDNN builds a bf16 matmul kernel
    for every new shape on CPU, and a run whose batches take every length between 20 and 64
    spends more time building kernels than bf16 saves (measured: reward-model steps 79 ms
    unrounded, 51 ms rounded, 65 ms in float32). The extra columns are padding like the rest."""
    T = max(len(s) for s in seqs)
    if device is not None and uses_bf16(torch.device(device)):
        T = -(-T // 8) * 8
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    loss_mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, n_prompt)):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attn_mask[i, :len(s)] = True
        loss_mask[i, p:len(s)] = True
    return tokens.to(device), attn_mask.to(device), loss_mask.to(device)


def live_columns(attn_mask: torch.Tensor, device) -> slice:
    """The columns of a left- and right-padded batch attn_mask (B, T) where some row holds a real
    token; outside them every row is padding, which no real token attends to, so a causal
    forward over these columns alone gives the real tokens the same outputs. Under bf16 widened
    to a multiple of 8 columns, as `pad_batch` rounds."""
    real = attn_mask.any(0).nonzero().squeeze(1)
    start, stop = int(real[0]), int(real[-1]) + 1
    if uses_bf16(torch.device(device)):
        width = min(-(-(stop - start) // 8) * 8, attn_mask.shape[1])
        stop = min(start + width, attn_mask.shape[1])
        start = stop - width
    return slice(start, stop)


def by_length(fn, tokens: torch.Tensor, attn_mask: torch.Tensor, device,
              groups: int = 4) -> torch.Tensor:
    """fn(tokens, attn_mask) over a batch of sampled sequences, run on `groups` groups of rows of
    similar length, each over its own `live_columns`: responses vary in length (a rollout's
    longest is ~3x its mean), and one pass over the whole batch computes its longest row's
    width for every row. fn returns one value per row (b,) or per target (b, T'-1); the result
    is the whole batch's, (B,) or (B, T-1), 0 at targets outside a group's columns (padding)."""
    ends = attn_mask.long().cumsum(-1).argmax(-1)           # (B,) each row's last real column
    out = None
    for rows in ends.argsort(stable=True).chunk(groups):
        cols = live_columns(attn_mask[rows], device)
        part = fn(tokens[rows][:, cols], attn_mask[rows][:, cols])        # (b,) or (b, T'-1)
        if out is None:
            out = part.new_zeros(tokens.shape[0], *([tokens.shape[1] - 1] * (part.dim() - 1)))
        if part.dim() == 1:
            out[rows] = part
        else:
            out[rows, cols.start:cols.stop - 1] = part
    return out


def epoch_batches(seed: int, epoch: int, lengths: np.ndarray, batch_size: int,
                  window: int = 4) -> list:
    """The batches of one epoch, as arrays of example indices. Examples are shuffled, then
    sorted by length inside windows of `window` batches so that a batch holds similar lengths
    (less padding), then the batch order is shuffled again. A small window on purpose: in the
    built-in world length goes with the writer's style, and batches of one style trained worse
    (measured: window 32 was 2.2x faster per step but ended at val loss 0.256 vs 0.229 for
    random batches). Drawn from (seed, epoch) alone, so a resumed run reads the same batches."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    window = batch_size * window
    batches = []
    for start in range(0, len(perm), window):
        chunk = perm[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches  # drop ragged leftovers
    return [batches[i] for i in rng.permutation(len(batches))]


def pair_groups(pairs, max_size: int = 64) -> list[list[int]]:
    """Indices of consecutive pairs that share a response: the k(k−1)/2 pairs that
    `train_rm.py --make-pairs` writes for one prompt's k responses form one group (other data:
    mostly groups of one). A group stops at max_size pairs, so that a long chain of shared
    responses in a user's file cannot become one batch. pairs: (chosen, rejected, ...) tuples
    of token lists."""
    groups, seen = [], set()
    for i, (c, r, *_) in enumerate(pairs):
        c, r = tuple(c), tuple(r)
        if groups and len(groups[-1]) < max_size and (c in seen or r in seen):
            groups[-1].append(i)
        else:
            groups.append([i])
            seen = set()
        seen.update((c, r))
    return groups


def group_batches(seed: int, epoch: int, groups: list[list[int]], lengths: np.ndarray,
                  batch_size: int) -> list:
    """`epoch_batches` over whole groups of pairs: each batch holds ~batch_size pairs (as many
    groups as make that on average) and is returned as one array of pair indices. Each response
    is then seen once per epoch and, with `distinct_rows`, run through the model once per batch:
    a group of k responses costs k sequences instead of k(k−1)."""
    n = sum(len(g) for g in groups)
    per_batch = min(max(1, round(batch_size * len(groups) / n)), len(groups))  # groups per batch
    group_lengths = np.array([max(lengths[i] for i in g) for g in groups])
    return [np.concatenate([groups[g] for g in b])
            for b in epoch_batches(seed, epoch, group_lengths, per_batch)]


def distinct_rows(seqs) -> tuple[list, list[int]]:
    """(the distinct items of seqs in first-seen order, the row of each item among them), so
    that seqs[i] == distinct[rows[i]]. Items are token lists or tuples of them."""
    index: dict = {}
    rows = [index.setdefault(_frozen(s), len(index)) for s in seqs]
    distinct = [None] * len(index)
    for s, row in zip(seqs, rows):
        distinct[row] = s
    return distinct, rows


def _frozen(x):
    return tuple(_frozen(v) for v in x) if isinstance(x, (list, tuple)) else x


def check_finite(step: int, **values) -> None:
    """Raise NonFiniteError naming the first quantity that is NaN or inf."""
    for name, v in values.items():
        v = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
        if not math.isfinite(v):
            raise NonFiniteError(f"step {step}: {name} is {v}; stopping (the last good "
                                 f"checkpoint is kept)")


class MetricsLog:
    """OUT/metrics.jsonl, one object per logged step: {"step": ..., "split": ..., ...}."""

    def __init__(self, path: str, resume_step: int | None = None, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # False on the ranks other than 0 under torchrun: no file at all
        if not enabled:
            return
        if resume_step is None:
            if os.path.exists(path):
                os.remove(path)  # a fresh run starts a fresh log
        elif os.path.exists(path):
            kept = []
            lines = open(path).read().split("\n")
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # the last line, torn by a kill mid-write: drop it
                        break
                    raise CheckpointError(f"{path}:{i + 1}: not a JSON object; the metrics log "
                                          f"is damaged (move it away to resume)") from None
                if row.get("step", 0) <= resume_step:
                    kept.append(line + "\n")
            with replacing(path) as tmp:
                with open(tmp, "w") as f:
                    f.writelines(kept)

    def write(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        for k, v in metrics.items():
            v = float(v) if isinstance(v, (torch.Tensor, np.floating)) else v
            # NaN is not JSON: an undefined number (the explained variance of a run without a
            # value model) is written as null, so jq and strict parsers read every line
            row[k] = None if isinstance(v, float) and not math.isfinite(v) else v
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        except OSError as e:  # a full disk: a torn last line, which --resume drops
            raise WriteError(f"{self.path}: could not write it ({write_failure(e)})") from None


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# An --out holding one of these holds a run; --overwrite removes all of RUN_FILES before the new
# run writes its own, so that no file of the old run is read as the new one's. (Preference pairs,
# PAIRS, are inputs: train_rm.py --make-pairs rewrites them, otherwise they stay. The pairs a
# judge relabelled, prefs*_ai.jsonl, are the run's own: train_rm.py --labeller ai:DIR.)
USED_IF = (CHECKPOINT, "metrics.jsonl")
RUN_FILES = (CHECKPOINT, "best.pt", "metrics.jsonl", "eval.json", "samples.jsonl", "config.json",
             "calibration.png", "prefs_ai.jsonl", "prefs_val_ai.jsonl",
             "round_*.jsonl")  # online DPO's pairs: train_dpo.py --rounds
PAIRS = ("prefs.jsonl", "prefs_val.jsonl", "prefs_test.jsonl")  # train_rm.py --make-pairs


def run_files(folder: str, names=USED_IF) -> list[str]:
    """The names among `names` that exist in folder; a name with * matches as a glob."""
    found = []
    for n in names:
        if "*" in n:
            found += sorted(os.path.basename(p)
                            for p in glob.glob(os.path.join(glob.escape(folder), n)))
        elif os.path.exists(os.path.join(folder, n)):
            found.append(n)
    return found


def check_out(cfg) -> None:
    """ValueError unless --out is free, or --resume or --overwrite says what to do with it."""
    if cfg.out == "":
        raise ValueError("--out '': an empty path")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite starts it over: "
                         "give one")
    used = run_files(cfg.out)
    if used and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{cfg.out} already holds a run ({used[0]}); pass --resume to continue "
                         f"it or --overwrite to start over")


def clear_run(cfg) -> None:
    """--overwrite: remove the old run's files (RUN_FILES) from OUT; nothing without it."""
    if cfg.overwrite:
        for name in run_files(cfg.out, RUN_FILES):
            os.remove(os.path.join(cfg.out, name))


# ----------------------------------------------------------------------------------------------
# Every path flag is checked before any work, in one place
# ----------------------------------------------------------------------------------------------

# The flags that name a path, and what each must name: "data" a file; "stage" a stage folder
# holding checkpoint.pt (or the file itself), or gpt2:DIR; "tokenizer" a folder holding
# tokenizer.tiktoken (or the file itself), or gpt2:DIR. None is no path.
PATH_FLAGS = {"data": "data", "val_data": "data", "test_data": "data", "prompts": "data",
              "eval_prompts": "data", "sft": "stage", "rm": "stage", "init": "stage",
              "policy": "stage", "tokenizer": "tokenizer"}
HOLDS = {"stage": CHECKPOINT, "tokenizer": TOKENIZER}  # what a folder of that kind holds


def check_paths(cfg) -> None:
    """ValueError naming the first path flag (PATH_FLAGS) whose file or folder is not there.
    Defaults count (train_ppo.py's --sft out/sft); a config's `unused_paths()` names the flags
    a run with its settings never reads, and its `inner_paths()` the paths inside other flags'
    values, {flag: (path, kind)} (train_rm.py's --labeller ai:DIR)."""
    unused = cfg.unused_paths() if hasattr(cfg, "unused_paths") else ()
    inner = cfg.inner_paths() if hasattr(cfg, "inner_paths") else {}
    paths = [(name, getattr(cfg, name, None), kind) for name, kind in PATH_FLAGS.items()
             if name not in unused]
    for name, value, kind in paths + [(name, *v) for name, v in inner.items()]:
        problem = None if value is None else path_problem(value, kind)
        if problem:
            raise ValueError(f"--{name.replace('_', '-')} {shown(getattr(cfg, name))}: {problem}")


def path_problem(path: str, kind: str) -> str | None:
    """What is wrong with a path of this kind (PATH_FLAGS); None if nothing."""
    if path == "":
        return "an empty path"
    if kind != "data" and path.startswith("gpt2:"):
        return None if os.path.isdir(path[len("gpt2:"):]) else (
            "no such folder (gpt2:DIR names a Hugging Face GPT-2 folder)")
    if not os.path.exists(path):
        return "no such file" if kind == "data" else "no such file or folder"
    if kind == "data" and os.path.isdir(path):
        return "a folder, not a file"
    inner = HOLDS.get(kind)
    if inner and os.path.isdir(path) and not os.path.isfile(os.path.join(path, inner)):
        first = " (train that stage first)" if kind == "stage" else ""
        return f"no {inner} in this folder{first}"
    return None


def shown(path: str) -> str:
    """A path as a message shows it: quoted if it needs to be ('' when empty), its middle left
    out past 100 characters."""
    return shlex.quote(path if len(path) <= 100 else f"{path[:60]}...{path[-30:]}")


# ----------------------------------------------------------------------------------------------
# The output folder: claimed by one run at a time, given back when the run ends
# ----------------------------------------------------------------------------------------------

LOCK = ".lock"  # OUT/.lock: flock-ed by the run that writes in OUT, removed when it ends
# What a killed write leaves: NAME.tmpPID (errors.replacing, MetricsLog) and .NAME.HEX.tmp
# (data.write_jsonl)
STALE = re.compile(r".+\.tmp\d+|\..+\.[0-9a-f]{8}\.tmp")
PROGRESS = (CHECKPOINT, "best.pt", "metrics.jsonl")  # what a run that took a step has changed


@dataclass
class Claim:
    """This process's hold on an output folder, from `start_run` to the end of train()."""
    out: str
    lock: int            # OUT/.lock, open and flock-ed
    created: list[str]   # the folders the run created (OUT, missing parents), deepest first
    before: dict         # the (inode, size, mtime) of each file OUT held at the start


CLAIMS: dict[str, Claim] = {}  # abspath(OUT) -> this process's claim on it


def claim_out(out: str) -> None:
    """Make OUT this run's: create it (or see that it can be one), lock it against a second run
    and remove what killed writes left in it (safe: no other run writes there while we hold
    the lock). ValueError, one line, if it cannot; then nothing is left behind."""
    created = make_folder(out)
    try:
        lock = lock_folder(out)
    except ValueError:
        remove_folders(created)
        raise
    for entry in os.scandir(out):
        if STALE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.remove(entry.path)
    before = {entry.name: file_state(entry.path) for entry in os.scandir(out)}
    CLAIMS[os.path.abspath(out)] = Claim(out, lock, created, before)


def make_folder(out: str) -> list[str]:
    """Create OUT and its missing parents; returns those it created, deepest first. ValueError
    naming --out for a file in the way, a name too long, a read-only disk, ..."""
    if os.path.isfile(out):
        raise ValueError(f"--out {shown(out)}: a file, not a folder")
    created, path = [], os.path.abspath(out)
    while not os.path.lexists(path) and path != os.path.dirname(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        remove_folders(created)
        raise ValueError(f"--out {shown(out)}: cannot create the folder ({e.strerror})") from None
    return created


def lock_folder(out: str) -> int:
    """Open OUT/.lock and take its exclusive flock, so that a second run into OUT (a second
    --resume too) is refused, naming the folder and the process that holds it. The kernel
    lets go of a killed run's lock, so a stale .lock file blocks nothing. Returns the fd."""
    path = os.path.join(out, LOCK)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise ValueError(f"--out {shown(out)}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 20, 0).decode(errors="replace").strip()
            os.close(fd)
            if not isinstance(e, BlockingIOError):
                raise ValueError(f"--out {shown(out)}: cannot lock {LOCK} ({e.strerror})") from None
            who = f" (process {holder})" if holder.isdigit() else ""
            raise ValueError(f"{out} is in use by another run{who}: wait for it to end, or "
                             f"pick another --out") from None
        try:
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # a run that ended removed the file we locked: lock the one there now
    with contextlib.suppress(OSError):  # who holds it, for the message above
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def file_state(path: str) -> tuple | None:
    """(device, inode, size, mtime) of a file; None if there is none."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def release_out(out: str, failed: bool) -> None:
    """End this process's claim on OUT (`claim_out`): the lock file goes. A run that failed
    before its first step (no checkpoint and no metrics log changed) takes with it the files it
    created (train_rm.py's preference pairs aside: a finished phase of their own) and the
    folders it created, once empty."""
    claim = CLAIMS.pop(os.path.abspath(out), None)
    if claim is None:
        return
    try:
        if failed and all(file_state(os.path.join(claim.out, name)) == claim.before.get(name)
                          for name in PROGRESS):
            for entry in os.scandir(claim.out):
                if (entry.name not in claim.before and entry.name != LOCK
                        and entry.name not in PAIRS
                        and entry.is_file(follow_symlinks=False)):
                    os.remove(entry.path)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(claim.out, LOCK))  # while locked: see lock_folder's loop
    finally:
        os.close(claim.lock)
    if failed:
        remove_folders(claim.created)


def remove_folders(folders: list[str]) -> None:
    """Remove each folder, deepest first, while they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def guarded_run(train):
    """Decorates a script's train(cfg, prog): the claim its start_run takes on OUT ends with
    train, whether it returns or fails (`release_out`), so a later run in the same process
    (the pipeline, the tests) claims the folder afresh."""
    @functools.wraps(train)
    def run(cfg, *args, **kwargs):
        try:
            result = train(cfg, *args, **kwargs)
        except BaseException:
            release_out(cfg.out, failed=True)
            raise
        release_out(cfg.out, failed=False)
        return result
    return run


def run_line(cfg, prog: str, dist: Dist) -> str:
    """The one line a run starts with: where it writes, on what, how long, where its config is."""
    precision = "bf16 autocast" if uses_bf16(dist.device) else "float32"
    processes = f", {dist.world_size} processes" if dist.world_size > 1 else ""
    length = (f"{cfg.max_steps} steps" if hasattr(cfg, "max_steps")
              else f"{cfg.iterations} iterations")
    mode = (" | resuming" if cfg.resume else " | starting over (--overwrite)"
            if cfg.overwrite and run_files(cfg.out) else "")
    verbose = "" if cfg.verbose else " (--verbose prints it)"
    return (f"{prog}: {cfg.out} | {dist.device}, {precision}{processes} | {length}{mode} | "
            f"config: {os.path.join(cfg.out, 'config.json')}{verbose}")


def start_run(cfg, prog: str) -> Dist:
    """Check every path flag (`check_paths`), refuse a used --out (`check_out`), resolve the
    device and precision, join torchrun's processes if there are several, claim OUT
    (`claim_out`: created, locked against a second run, cleared of what killed writes left),
    print one line (the whole config with --verbose), seed every RNG. Returns a `Dist`
    (minirlhf/distributed.py): rank, world_size, is_main, device. The claim ends when train()
    does: the scripts decorate it with `guarded_run`."""
    try:
        check_paths(cfg)  # every input is there, before any work
        check_out(cfg)  # before torchrun's processes join: each checks before any writes
        set_precision(getattr(cfg, "precision", "auto"))
        dist = setup(resolve_device(cfg.device))
        for name in ("batch_size", "prompts_per_iter", "minibatch_size"):  # global batches
            if getattr(cfg, name, 0) % dist.world_size:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)} does not split "
                                 f"evenly over {dist.world_size} processes")
        problem = None
        if dist.is_main:  # the one process that writes in OUT claims it, and tells the others
            try:
                claim_out(cfg.out)
            except ValueError as e:
                problem = str(e)
        problem = broadcast(problem, dist)
        if problem:
            raise ValueError(problem)
    except ValueError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        raise SystemExit(2)
    print(run_line(cfg, prog, dist), flush=True)
    if cfg.verbose:
        print(format_config(cfg), flush=True)
    seed_everything(cfg.seed)
    return dist


def open_log(cfg, start: int | None, dist: Dist) -> MetricsLog:
    """OUT/metrics.jsonl for a run that starts at step `start` (None: a fresh run). Called once
    the inputs are read, the moment a run starts writing: a fresh run first removes an old
    run's files (--overwrite, `clear_run`); then OUT/config.json gets this run's config."""
    if dist.is_main and start is None:
        clear_run(cfg)
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), start, enabled=dist.is_main)
    if dist.is_main:
        write_json(os.path.join(cfg.out, "config.json"), config_to_dict(cfg))
    return log


def fail(prog: str, message: str) -> None:
    """One-line error and exit code 1 for problems found while running (bad data, NaN, ...)."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(1)


# ----------------------------------------------------------------------------------------------
# Around the loop of train_sft.py, train_rm.py and train_dpo.py: resume, batches, the update,
# checkpoints, progress. One call each, so that the scripts' train() reads like the lecture.
# ----------------------------------------------------------------------------------------------

def checkpoint_to_resume(cfg) -> dict | None:
    """OUT/checkpoint.pt, loaded, when --resume finds one; None for a fresh run."""
    path = os.path.join(cfg.out, CHECKPOINT)
    if not cfg.resume:
        return None
    if not os.path.exists(path):
        print(f"no checkpoint at {path}: starting from scratch")
        return None
    ck = load_checkpoint(path)
    check_stage(ck, path, STAGES[type(cfg).__name__])  # not another script's checkpoint
    return ck


def resume_state(cfg, ck: dict | None, optimizer, model=None, tokenizer=None) -> int | None:
    """Continue where checkpoint `ck` (from `checkpoint_to_resume`) left off: restore the
    optimizer and every random state, and return the step it was saved at; None for a fresh run.
    model: the run's model, built as for a fresh run; the checkpoint's weights are loaded into it
    once its shape and tokenizer are checked. Leave it out when the model was built from `ck`."""
    if ck is None:
        return None
    path = os.path.join(cfg.out, CHECKPOINT)
    if model is not None:
        check_compatible(ck, path, model_config=model.config, tokenizer=tokenizer)
        model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    set_rng_state(ck["rng"])
    print(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


def save_run(cfg, step: int, model, optimizer, tokenizer, kind: str = "gpt",
             extra: dict | None = None, path: str | None = None) -> None:
    """All that --resume needs: the weights, the optimizer, every random state and `extra`, in
    OUT/checkpoint.pt (OUT/tokenizer.tiktoken and config.json beside it), or in the file `path`
    (train_rm.py's best.pt). kind: "gpt" or "scalar". Under torchrun, rank 0 saves."""
    state = dict(model=model, model_kind=kind, config=cfg, tokenizer=tokenizer, step=step,
                 optimizer=optimizer, rng=rng_state(), extra=extra)
    if path is None:
        save_stage(cfg.out, **state)
    else:
        save_checkpoint(path, **state)


def batches_from(i: int, batches_of, dist: Dist):
    """The run's batches from its i-th on, epoch after epoch, each as this process's share of
    the example indices. batches_of(epoch) draws one epoch's batches from the seed and the epoch
    alone (`epoch_batches`, `group_batches`), so a resumed run reads the batches it would have."""
    epoch, k = divmod(i, len(batches_of(0)))
    while True:
        for batch in batches_of(epoch)[k:]:
            yield shard(batch, dist)
        epoch, k = epoch + 1, 0


def pair_batches_from(i: int, pairs, seed: int, batch_size: int, dist: Dist):
    """`batches_from` for preference pairs (chosen ids, rejected ids, ...): batches of whole
    groups (`pair_groups`: a prompt's k(k−1)/2 pairs together), so that each response is scored
    once per batch and seen once per epoch, ~batch_size pairs from k/(k−1)·batch_size sequences."""
    groups = pair_groups(pairs)
    lengths = np.array([max(len(c), len(r)) for c, r, *_ in pairs])
    batch_size = min(batch_size, len(pairs))
    return batches_from(i, lambda epoch: group_batches(seed, epoch, groups, lengths, batch_size),
                        dist)


def optimizer_step(optimizer, model, grad_clip: float, step: int, loss) -> torch.Tensor:
    """Clip the global gradient norm, stop on a non-finite loss or norm before the update (named
    as `step`, as the metrics log will number it), update the weights, zero the gradients.
    Returns the gradient norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    check_finite(step, loss=loss, grad_norm=grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def due(step: int, every: int, last: int) -> bool:
    """Time to log, evaluate or checkpoint: every `every` steps, and at the last step."""
    return step % every == 0 or step == last


def progress_bar(total: int, start: int, desc: str, dist: Dist) -> tqdm:
    """A progress bar on rank 0 (shown on a terminal only)."""
    return tqdm(total=total, initial=start, desc=desc, disable=None if dist.is_main else True,
                leave=False)
