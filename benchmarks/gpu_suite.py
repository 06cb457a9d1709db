"""The GPU checks in one run: the CUDA-only tests and the GPU measurements, one JSON file.

    bash benchmarks/gpu_suite.sh --out gpu_suite.json              # on one GPU (H100/H200)
    python benchmarks/gpu_suite.py --device cpu --smoke --out s.json  # the same steps, tiny, CPU

Each step runs as its own process with its own time limit, in this order:

1. `cuda_tests`: pytest on the tests that need CUDA (`-k cuda` over the files that hold them;
   on a machine without CUDA they skip);
2. `train_step`: `benchmarks/train_step.py --shape gpt2 --compile` (tokens/s and MFU);
3. `sampler_vs_hf`: `benchmarks/sampler_vs_hf.py --shape gpt2` (ours against transformers);
4. `rlhf_step`: `benchmarks/rlhf_step.py` (a PPO iteration and a DPO step, TRL beside when
   importable);
5. `pipeline`: `python -m minirlhf.pipeline` in a temporary folder, its summary's main numbers.

Writes OUT: {"ok", "device", "smoke", "seconds", "steps": {name: {"ok", "seconds", "command",
"result" (the step's JSON) or "error" (the tail of its output)}}}; exits 1 when a step failed
or ran out of time, after running the rest. --smoke runs every step at tiny sizes (the world
model, a few steps, the --quick pipeline): what the test suite runs on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_TEST_FILES = ["tests/test_fast_path.py", "tests/test_reliability.py", "tests/test_ddp.py"]


def steps(device: str, smoke: bool, run_dir: str) -> dict[str, tuple[list[str], int]]:
    """{name: (command, time limit in seconds)}: the full sizes, or --smoke's tiny ones."""
    py, dev = sys.executable, ["--device", device]
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda"] + CUDA_TEST_FILES
    if smoke:
        return {
            "cuda_tests": (tests + ["--co"], 120),  # collect only: the CPU has none to run
            "train_step": ([py, "benchmarks/train_step.py", "--shape", "world", "--steps", "2",
                            "--warmup", "1", "--json"] + dev, 120),
            "sampler_vs_hf": ([py, "benchmarks/sampler_vs_hf.py", "--shape", "world",
                               "--batches", "1", "--new-tokens", "4", "--repeats", "1",
                               "--json"] + dev, 120),
            "rlhf_step": ([py, "benchmarks/rlhf_step.py", "--prompts", "2", "--samples", "2",
                           "--new-tokens", "4", "--pairs", "4", "--iterations", "1",
                           "--dpo-steps", "1", "--warmup", "1", "--no-trl", "--json"] + dev, 180),
            "pipeline": ([py, "-m", "minirlhf.pipeline", "--quick", "--out", run_dir] + dev, 300),
        }
    return {
        "cuda_tests": (tests, 240),
        "train_step": ([py, "benchmarks/train_step.py", "--shape", "gpt2", "--compile",
                        "--json"] + dev, 180),
        "sampler_vs_hf": ([py, "benchmarks/sampler_vs_hf.py", "--shape", "gpt2", "--json"] + dev,
                          150),
        "rlhf_step": ([py, "benchmarks/rlhf_step.py", "--json"] + dev, 150),
        "pipeline": ([py, "-m", "minirlhf.pipeline", "--out", run_dir] + dev, 420),
    }


def run_step(name: str, command: list[str], limit: int, run_dir: str) -> dict:
    """Run one step; its JSON (the last line of a benchmark's output, the pipeline's summary's
    main numbers, pytest's last line) or why it failed."""
    t0 = time.time()
    entry = {"command": " ".join(command[1:]), "ok": False}
    try:
        p = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        entry.update(seconds=time.time() - t0, error=f"ran past its {limit} s limit")
        return entry
    entry["seconds"] = time.time() - t0
    if p.returncode != 0:
        entry["error"] = (p.stdout + p.stderr)[-2000:]
        return entry
    lines = p.stdout.strip().splitlines() or [""]
    if name == "cuda_tests":
        entry["result"] = lines[-1]
    elif name == "pipeline":
        entry["result"] = pipeline_numbers(os.path.join(run_dir, "summary.json"))
    else:
        try:
            entry["result"] = json.loads(lines[-1])
        except ValueError:
            entry["error"] = f"no JSON on the last line of its output: {lines[-1][:200]!r}"
            return entry
    entry["ok"] = True
    return entry


def pipeline_numbers(path: str) -> dict:
    """The pipeline's headline numbers: each stage's gold, KL and seconds, the gaps closed."""
    s = json.load(open(path))
    rows = {k: {f: s[k].get(f) for f in ("gold", "accuracy", "kl", "seconds")}
            for k in ("sft", "ppo", "ppo_no_kl", "dpo")}
    return {**rows, "rm_test_accuracy": s["rm"]["test_accuracy"],
            "gap_closed": s["gap_closed"], "total_seconds": s["total_seconds"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_suite.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, the test suite)")
    parser.add_argument("--only", nargs="+", metavar="STEP", help="run these steps only")
    args = parser.parse_args(argv)
    t0, results = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "pipeline")
        plan = steps(args.device, args.smoke, run_dir)
        unknown = set(args.only or ()) - set(plan)
        if unknown:
            parser.error(f"--only: no step {sorted(unknown)[0]!r}; the steps: {', '.join(plan)}")
        for name, (command, limit) in plan.items():
            if args.only and name not in args.only:
                continue
            results[name] = run_step(name, command, limit, run_dir)
            print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'} in "
                  f"{results[name]['seconds']:.0f} s", flush=True)
    report = {"ok": all(r["ok"] for r in results.values()), "device": args.device,
              "smoke": args.smoke, "seconds": time.time() - t0, "steps": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}: {'all steps ok' if report['ok'] else 'a step FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
