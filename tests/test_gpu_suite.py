"""benchmarks/gpu_suite.py, the GPU checks in one run, on CPU: --smoke runs its benchmark steps
at tiny sizes and writes one JSON with each step's own JSON; a step that fails, prints no JSON
or runs past its limit is reported with why, the rest still run, and the exit code is 1."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import gpu_suite  # noqa: E402


def test_smoke_steps_on_cpu_write_one_json(tmp_path):
    out = tmp_path / "suite.json"
    code = gpu_suite.main(["--device", "cpu", "--smoke", "--out", str(out), "--only",
                           "cuda_tests", "train_step", "sampler_vs_hf", "rlhf_step"])
    report = json.loads(out.read_text())
    assert code == 0 and report["ok"] and report["smoke"] and report["device"] == "cpu"
    steps = report["steps"]
    assert list(steps) == ["cuda_tests", "train_step", "sampler_vs_hf", "rlhf_step"]
    assert "collected" in steps["cuda_tests"]["result"]
    for name in ("train_step", "sampler_vs_hf", "rlhf_step"):
        assert steps[name]["ok"] and steps[name]["result"]["benchmark"] == name
        assert steps[name]["seconds"] > 0 and "--device cpu" in steps[name]["command"]


def test_the_full_plan_names_the_gpu_measurements():
    plan = gpu_suite.steps("cuda", False, "/tmp/x")
    assert list(plan) == ["cuda_tests", "train_step", "sampler_vs_hf", "rlhf_step", "pipeline"]
    assert {"--shape", "gpt2", "--compile"} <= set(plan["train_step"][0])
    assert "gpt2" in plan["sampler_vs_hf"][0] and "--quick" not in plan["pipeline"][0]
    assert all("cuda" in cmd for cmd, _ in list(plan.values())[1:])
    assert sum(limit for _, limit in plan.values()) <= 1200


@pytest.mark.parametrize("code, why", [
    ("import sys; print('boom'); sys.exit(3)", "boom"),
    ("print('not json')", "no JSON on the last line of its output"),
    ("import time; time.sleep(5)", "ran past its 1 s limit"),
])
def test_a_failing_step_is_reported_with_why(tmp_path, code, why):
    entry = gpu_suite.run_step("train_step", [sys.executable, "-c", code], 1, str(tmp_path))
    assert entry["ok"] is False and why in entry["error"] and entry["seconds"] >= 0


def test_a_failed_step_makes_the_exit_code_1_and_the_rest_still_run(tmp_path, monkeypatch):
    real = gpu_suite.steps

    def plan(device, smoke, run_dir):
        p = real(device, smoke, run_dir)
        p["train_step"] = ([sys.executable, "-c", "import sys; sys.exit(1)"], 10)
        return p
    monkeypatch.setattr(gpu_suite, "steps", plan)
    out = tmp_path / "suite.json"
    code = gpu_suite.main(["--device", "cpu", "--smoke", "--out", str(out), "--only",
                           "train_step", "cuda_tests"])
    report = json.loads(out.read_text())
    assert code == 1 and not report["ok"]
    assert not report["steps"]["train_step"]["ok"] and report["steps"]["cuda_tests"]["ok"]


def test_pipeline_numbers_reads_the_headline_of_a_summary(tmp_path):
    row = {"gold": 0.9, "accuracy": 0.8, "kl": 1.0, "seconds": 5.0}
    summary = {k: dict(row) for k in ("sft", "ppo", "ppo_no_kl", "dpo")}
    summary.update(rm={"test_accuracy": 0.77}, gap_closed={"ppo": 0.5}, total_seconds=300.0)
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    numbers = gpu_suite.pipeline_numbers(str(tmp_path / "summary.json"))
    assert numbers["ppo"] == row and numbers["rm_test_accuracy"] == 0.77
    assert numbers["gap_closed"] == {"ppo": 0.5} and numbers["total_seconds"] == 300.0


def test_an_unknown_step_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--out", str(tmp_path / "s.json"), "--only", "nope"])
    assert "--only: no step 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("precision, dtype", [("fp32", "float32"), ("bf16", "bf16-autocast")])
def test_benchmarks_label_the_precision_their_paths_ran_in(precision, dtype):
    """--precision reaches `autocast` through `common.start`, and "dtype" says what it was
    (a bf16-native CPU used to be labelled float32 while ours ran bf16 autocast)."""
    import dataclasses

    import torch

    import common
    from minirlhf import device as device_module

    @dataclasses.dataclass
    class Config:
        device: str = "cpu"
        precision: str = "auto"
    try:
        cfg, dev = common.start(Config, ["--precision", precision], "bench")
        assert device_module.uses_bf16(dev) == (precision == "bf16")
        assert common.environment(dev)["dtype"] == dtype
        with device_module.autocast(dev):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        assert out.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    finally:
        device_module.set_precision("auto")
