"""Several processes under torchrun (DDP, gloo on CPU): two processes that each take half of every
batch train to the same weights as one process on the whole batch (SFT, reward model, DPO), only
rank 0 prints and writes files, and PPO finishes with one checkpoint.

The two-process runs go through the scripts' own command lines, all in one torchrun launch (this
file is its worker, see the bottom) to pay torchrun's start-up once; the one-process references
run in-process with the same flags.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # when torchrun runs this file as the worker
    sys.path.insert(0, ROOT)

import train_dpo  # noqa: E402
import train_ppo  # noqa: E402
import train_rm  # noqa: E402
import train_sft  # noqa: E402
from minirlhf.checkpoint import load_checkpoint  # noqa: E402
from minirlhf.data import write_jsonl  # noqa: E402
from minirlhf.training import read_metrics  # noqa: E402
from minirlhf.world import World  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available())
    or int(os.environ.get("WORLD_SIZE", "1")) > 1,
    reason="needs torch.distributed with gloo (and a test run that is not itself under torchrun)")

# grad accumulation on: the SFT token mean must weigh micro-batches and processes by their tokens
SFT = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-steps", "6", "--n-examples",
       "200", "--batch-size", "8", "--grad-accum", "2", "--log-every", "2", "--eval-every", "3",
       "--ckpt-every", "3", "--n-show", "1", "--max-new-tokens", "8", "--warmup", "2",
       "--device", "cpu", "--precision", "fp32"]  # exact equality needs float32
RM = ["--max-steps", "4", "--batch-size", "8", "--eval-every", "2", "--patience", "6",
      "--device", "cpu", "--precision", "fp32"]
DPO = ["--max-steps", "4", "--batch-size", "8", "--eval-every", "2", "--ckpt-every", "2",
       "--max-new-tokens", "8", "--device", "cpu", "--precision", "fp32"]
PPO = ["--iterations", "2", "--prompts-per-iter", "2", "--samples-per-prompt", "2",
       "--max-new-tokens", "8", "--minibatch-size", "2", "--eval-every", "2", "--ckpt-every", "2",
       "--adaptive-kl", "--device", "cpu", "--precision", "fp32"]
ATOL = 1e-5  # float sums in another order (each process pads and reduces its own half)


def run_main(module, argv):
    try:
        module.main(argv)
    except SystemExit as e:
        assert not e.code, f"{module.__name__} exited with {e.code}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (in-process) and two processes (torchrun) for each stage, same flags. The
    two-process RM and DPO start from the one-process SFT model, so that only the number of
    processes differs; PPO uses the two-process reward model."""
    root = tmp_path_factory.mktemp("ddp")
    one, two = {s: str(root / f"{s}1") for s in ("sft", "rm", "dpo")}, \
        {s: str(root / f"{s}2") for s in ("sft", "rm", "dpo", "ppo")}
    examples = World(0).sft_examples(60, 0)
    rows = [{"prompt": a["prompt"], "chosen": a["completion"], "rejected": b["completion"]}
            for a, b in zip(examples, examples[1:]) if a["completion"] != b["completion"]]
    data = root / "data"
    for name, part in (("prefs", rows[:32]), ("prefs_val", rows[32:40]),
                       ("prefs_test", rows[40:48])):
        write_jsonl(str(data / f"{name}.jsonl"), part)
    rm = ["--data", str(data / "prefs.jsonl"), "--val-data", str(data / "prefs_val.jsonl"),
          "--test-data", str(data / "prefs_test.jsonl")] + RM
    dpo = ["--data", str(data / "prefs.jsonl")] + DPO

    run_main(train_sft, SFT + ["--out", one["sft"]])
    stages = [("train_sft", SFT + ["--out", two["sft"]]),
              ("train_rm", rm + ["--sft", one["sft"], "--out", two["rm"]]),
              ("train_dpo", dpo + ["--sft", one["sft"], "--out", two["dpo"]]),
              ("train_ppo", PPO + ["--sft", one["sft"], "--rm", two["rm"], "--out", two["ppo"]])]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # its own process group, so that a hang kills torchrun's workers too, not only the launcher
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", os.path.abspath(__file__),
                             json.dumps(stages)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("two-process run hung for 300 s: " + stderr[-2000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    run_main(train_rm, rm + ["--sft", one["sft"], "--out", one["rm"]])
    run_main(train_dpo, dpo + ["--sft", one["sft"], "--out", one["dpo"]])
    return {"one": one, "two": two, "stdout": stdout, "sft": one["sft"]}


def max_weight_difference(a, b, name="checkpoint.pt", shift_only=()):
    """Largest |weight difference| between two checkpoints, leaving out the parameters whose
    gradient is 0 by a symmetry of the loss: their gradient is rounding noise, which Adam turns
    into steps of size lr. These are the key biases (the middle third of c_attn.bias: q·(k + b)
    adds q·b to every score of a query alike, which softmax ignores) and `shift_only`."""
    a, b = load_checkpoint(os.path.join(a, name)), load_checkpoint(os.path.join(b, name))
    assert list(a["model"]) == list(b["model"])  # the same keys: no "module." prefix
    assert a["step"] == b["step"]
    worst = 0.0
    for k in a["model"]:
        diff = (a["model"][k] - b["model"][k]).abs()
        if k.endswith("attn.c_attn.bias"):
            C = diff.numel() // 3
            diff[C:2 * C] = 0  # the key bias
        if k not in shift_only:
            worst = max(worst, diff.max().item())
    return worst


def assert_same_metrics(a, b):
    """The same rows (each logged step once: one writer), numbers equal to float rounding."""
    rows_a = read_metrics(os.path.join(a, "metrics.jsonl"))
    rows_b = read_metrics(os.path.join(b, "metrics.jsonl"))
    assert [(r["step"], r["split"]) for r in rows_a] == [(r["step"], r["split"]) for r in rows_b]
    assert len({(r["step"], r["split"]) for r in rows_b}) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        assert set(ra) == set(rb)
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-4), (ra["step"], k)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_two_processes_on_half_batches_match_one_on_whole_batches(runs, stage):
    """Same flags, 1 vs 2 processes: the final weights agree to float rounding (DDP averages the
    halves' gradients into the whole batch's; SFT's token mean is exact across processes with
    different token counts), the metrics are the same rows with the same numbers, and the output
    folders hold the same files (rank 0 alone writes; no leftover temporary files)."""
    one, two = runs["one"][stage], runs["two"][stage]
    # the reward model's biases right before its head shift every reward alike, and the
    # Bradley–Terry loss sees reward differences only
    shift_only = {"transformer.ln_f.bias", "head.bias"} if stage == "rm" else ()
    assert max_weight_difference(one, two, shift_only=shift_only) < ATOL
    if stage == "rm":  # the early-stopping copy, written at the best evaluation
        assert max_weight_difference(one, two, "best.pt", shift_only) < ATOL
    assert_same_metrics(one, two)
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    ev1, ev2 = (json.load(open(os.path.join(d, "eval.json"))) for d in (one, two))
    assert set(ev1) == set(ev2)


def test_only_rank_0_prints(runs):
    """Each log line appears once in the launch's output: the other process prints nothing."""
    out = runs["stdout"]
    starts = [line for line in out.splitlines() if line.startswith("train_sft.py: ")]
    assert len(starts) == 1 and "| cpu, float32, 2 processes |" in starts[0]
    lines = out.splitlines()
    assert len([line for line in lines if "token acc" in line]) == 3  # SFT: steps 2, 4, 6
    assert len([line for line in lines if "implicit acc" in line]) == 2  # DPO: steps 2, 4
    assert len([line for line in lines if line.startswith("iter ")]) == 3  # PPO: 2 + held-out


def test_ppo_runs_under_two_processes(runs):
    """PPO under torchrun (each process samples its half of the prompts, advantages whitened
    with the whole rollout's statistics) finishes: one checkpoint at the last iteration, each
    iteration logged once with finite numbers, the policy moved away from the SFT model."""
    out = runs["two"]["ppo"]
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 2 and not any(k.startswith("module.") for k in ck["model"])
    assert not any(k.startswith("module.") for k in ck["extra"]["value_model"])
    rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(abs(r[k]) < 1e6 for r in rows for k in ("proxy", "kl", "approx_kl", "entropy"))
    assert "sampled" in json.load(open(os.path.join(out, "eval.json")))
    sft = load_checkpoint(os.path.join(runs["sft"], "checkpoint.pt"))["model"]
    assert any(not torch.equal(ck["model"][k], sft[k]) for k in sft)


if __name__ == "__main__":  # one of torchrun's processes: each (script, argv) as its CLI runs it
    import importlib
    for script, argv in json.loads(sys.argv[1]):
        importlib.import_module(script).main(argv)
