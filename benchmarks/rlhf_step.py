"""Where the time of one PPO iteration and one DPO step goes, phase by phase; and the same work
in TRL when it is installed.

    python benchmarks/rlhf_step.py --json            # built-in world shape, auto device
    python benchmarks/rlhf_step.py --no-trl --json   # ours only

Everything runs on the built-in world's model shape (4 layers, 4 heads, 128 channels, block 96,
its 517-token BPE) with random weights, on the world's prompts; every response has exactly
`--new-tokens` tokens (our end id is -1, TRL's end token is banned by min_new_tokens), so both
sides do the same amount of work.

Ours, built from the project's own functions (train_ppo.py, train_dpo.py, minirlhf/):
- `ppo`: one iteration of train_ppo.py with its defaults (GAE with a value model, its --epochs
  passes over minibatches of 32 of B = prompts × samples responses), its own functions
  `rollout`, `compute_advantages` and `ppo_update`, timed as generate | score (π_θold where not
  from the sampler, π_ref, V_ψ and r_φ) | advantages | update; logging and the gold judge are
  left out.
- `rloo`: the same loop with `--advantage group --epochs 1 --minibatch-size B`: the RLOO baseline,
  no critic, one optimizer step per rollout — the configuration TRL's RLOOTrainer runs.
- `dpo`: one train_dpo.py step on B pairs: policy_forward (chosen and rejected in one pass, and
  the loss) | backward | optimizer (clip + AdamW). The reference log-probs are precomputed as in
  train_dpo.py, so `ref_forward` — what a step would pay without precomputation — is timed
  separately and left out of `step_seconds`.

TRL (1.16 has no PPOTrainer: PPO was removed from TRL; RLOOTrainer and GRPOTrainer remain):
- `trl_rloo`: RLOOTrainer on the same policy weights (a GPT2LMHeadModel twin, benchmarks/
  hf_twin.py), same prompts, B and k, response length, β (KL as a sequence-level reward penalty,
  as ours), ε, whitened advantages, one optimizer step per generation. Its reward is a Python
  function that runs the GPT-2 twin of our reward model on prompt ids + completion ids: TRL's
  own reward-model path decodes and re-tokenizes text, and random weights emit byte tokens that
  do not survive that round trip within the 96-token context.
- `trl_dpo`: DPOTrainer with precompute_ref_log_probs=True (as train_dpo.py), the same B pairs
  every step, tokenized by the twin tokenizer to the same ids (`same_token_ids`).
TRL's step time is the median gap between consecutive `on_step_end` callbacks after warm-up,
so it includes its data collation and bookkeeping, as ours includes padding. Ratios are
ours / TRL seconds per step: below 1, ours is faster. Each side uses its own optimizer defaults
(reported). On CUDA both run bf16 autocast; on a CPU TRL runs float32 and ours --precision (auto:
bf16 autocast on bf16-native CPUs), so `--precision fp32` compares like with like there; "dtype"
and "trl_dtype" say what each side ran in.

Left out on purpose: GRPOTrainer (RLOOTrainer is the closer match to our group baseline),
vLLM generation, multi-GPU, TRL's own reward-model text path.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, fail, start  # noqa: E402
import train_dpo  # noqa: E402
import train_ppo  # noqa: E402
from hf_twin import (hf_available, hf_lm, hf_scalar, hf_tokenizer, offline,  # noqa: E402
                     prompt_text, same_ids)
from minirlhf.config import format_config  # noqa: E402
from minirlhf.device import autocast  # noqa: E402
from minirlhf.distributed import Dist  # noqa: E402
from minirlhf.graders import make_reward  # noqa: E402
from minirlhf.model import GPT, GPTConfig, ScalarHeadModel  # noqa: E402
from minirlhf.training import make_optimizer, pad_batch  # noqa: E402
from minirlhf.world import World, demonstration, world_tokenizer  # noqa: E402

PROG = "benchmarks/rlhf_step.py"


@dataclass
class BenchConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"   # where to run (auto: cuda if available)
    prompts: int = 16                                 # prompts per PPO iteration
    samples: int = 4                                  # responses per prompt (k); B = prompts × k
    new_tokens: int = 48                              # response length, the same for every row
    pairs: int = 32                                   # preference pairs per DPO step
    iterations: int = 5                               # timed PPO iterations (median kept)
    dpo_steps: int = 10                               # timed DPO steps (median kept)
    warmup: int = 2                                   # untimed iterations / steps first (>= 1)
    trl: bool = True                                  # also time TRL when it is importable
    seed: int = 0                                     # weights, prompts, sampling
    threads: int | None = None                        # CPU threads for torch (none: default)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # ours (auto: bf16 autocast on CUDA and
                                                      # bf16-native CPUs); fp32 on a CPU matches TRL
    json: bool = False                                # print one JSON object and nothing else

    def check(self):
        if min(self.prompts, self.samples - 1, self.new_tokens, self.pairs, self.iterations,
               self.dpo_steps, self.warmup, self.threads or 1) < 1:
            raise ValueError("every count must be >= 1 (and --samples >= 2)")


# PPO hyper-parameters of train_ppo.py's defaults; only the update schedule differs per mode
PPO = train_ppo.PPOConfig()
MODES = {"ppo": dict(advantage="gae", epochs=PPO.epochs, minibatch_size=PPO.minibatch_size),
         "rloo": dict(advantage="group", epochs=1, minibatch_size=None)}  # None: all of B


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PhaseClock:
    """Seconds per named phase, one list entry per iteration: `with clock("generate"): ...`"""

    def __init__(self, device):
        self.device, self.times, self.current = device, {}, {}

    @contextlib.contextmanager
    def __call__(self, name):
        sync(self.device)
        t0 = time.perf_counter()
        yield
        sync(self.device)
        self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - t0

    def end_iteration(self, keep: bool):
        if keep:
            for name, s in self.current.items():
                self.times.setdefault(name, []).append(s)
            self.times.setdefault("total", []).append(sum(self.current.values()))
        self.current = {}

    def medians(self) -> dict:
        return {name: round(statistics.median(ts), 5) for name, ts in self.times.items()}


def fresh_models(model_cfg, seed, device):
    """The four models of lecture ch. 7 with the same weights on every call: π_θ, π_ref (copy),
    r_φ (the trunk of π_θ with a random scalar head), V_ψ (a copy of r_φ, as value_init=rm)."""
    torch.manual_seed(seed)
    policy = GPT(model_cfg).to(device)
    reward_model = ScalarHeadModel.from_gpt(policy)
    ref, value_model = copy.deepcopy(policy), copy.deepcopy(reward_model)
    for frozen in (ref, reward_model):
        frozen.eval().requires_grad_(False)
    return policy, ref, reward_model, value_model


class NeverEnds:
    """The tokenizer with end id -1: no response stops early, so every row is --new-tokens long
    (TRL's end token is banned by min_new_tokens)."""

    def __init__(self, tok):
        self.tok, self.end_id, self.pad_id = tok, -1, tok.pad_id

    def __getattr__(self, name):
        return getattr(self.tok, name)


def ppo_config(cfg, mode: str, n_prompts: int) -> train_ppo.PPOConfig:
    """train_ppo.py's defaults with this benchmark's work and the mode's update schedule."""
    m = MODES[mode]
    return dataclasses.replace(
        PPO, prompts_per_iter=n_prompts, samples_per_prompt=cfg.samples,
        max_new_tokens=cfg.new_tokens, seed=cfg.seed, advantage=m["advantage"],
        epochs=m["epochs"], minibatch_size=m["minibatch_size"] or n_prompts * cfg.samples)


def ppo_iteration(models, opts, prompts, tok, pcfg, it, device, clock):
    """One iteration of train_ppo.train's loop, its own three phases (without logging and the
    gold judge), timed as generate | score (π_θold where not from the sampler, π_ref, V_ψ, r_φ)
    | advantages | update."""
    policy, ref, reward_model, value_model = models
    policy_opt, value_opt = opts
    value_model = value_model if pcfg.critic else None
    dist = Dist(0, 1, device)
    reward = make_reward("rm", reward_model=reward_model, device=device)
    sync(device)
    ro = train_ppo.rollout(policy, policy, ref, reward, value_model, NeverEnds(tok), prompts,
                           pcfg, it, dist)
    if ro.gen.response_mask.sum(-1).min() != pcfg.max_new_tokens:
        raise RuntimeError("a response ended early: the work would differ from TRL's")
    clock.current.update(ro.seconds)
    with clock("advantages"):
        advantages, returns, value_mask = train_ppo.compute_advantages(ro, pcfg.kl_coef, pcfg,
                                                                       dist)
    with clock("update"):
        train_ppo.ppo_update(policy, value_model, policy_opt, value_opt, ro, advantages, returns,
                             value_mask, pcfg.kl_coef, pcfg, it, dist)


def ppo_runner(model_cfg, prompts, tok, pcfg, device, before_step=None):
    """(step, clock): step(keep) runs one PPO iteration of `pcfg` on the prompt texts, its phases
    timed into clock; `before_step()` runs first each time (ppo_vs_trl.py sets a precision)."""
    models = fresh_models(model_cfg, pcfg.seed, device)
    opts = make_optimizer(models[0], pcfg.lr, 0.0), make_optimizer(models[3], pcfg.value_lr, 0.0)
    clock, its = PhaseClock(device), itertools.count()

    def step(keep: bool):
        if before_step is not None:
            before_step()
        ppo_iteration(models, opts, prompts, tok, pcfg, next(its), device, clock)
        clock.end_iteration(keep)
    return step, clock


def dpo_runner(model_cfg, pairs, tok, cfg, device):
    """(step, clock): step(keep) runs one train_dpo.py step, its phases timed into clock."""
    policy, ref, _, _ = fresh_models(model_cfg, cfg.seed, device)
    dpo = train_dpo.DPOConfig()
    optimizer = make_optimizer(policy, dpo.lr, dpo.weight_decay)
    ref_logp = train_dpo.precompute_reference(ref, pairs, tok, device)             # (B, 2)
    clock = PhaseClock(device)
    policy.train()

    def step(keep: bool):
        with clock("ref_forward"), torch.no_grad():  # what precomputation saves (not in the step)
            train_dpo.response_logprobs(ref, pairs, tok, device)
        with clock("policy_forward"):
            chosen, rejected = train_dpo.response_logprobs(policy, pairs, tok, device)  # (B,) each
            loss, _ = train_dpo.dpo_loss(chosen, rejected, ref_logp[:, 0], ref_logp[:, 1],
                                         dpo.beta, dpo.label_smoothing, dpo.loss_type)
        with clock("backward"):
            loss.backward()
        with clock("optimizer"):
            torch.nn.utils.clip_grad_norm_(policy.parameters(), dpo.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        clock.end_iteration(keep)
    return step, clock


def dpo_summary(clock) -> dict:
    med = clock.medians()
    steps = zip(*(clock.times[k] for k in ("policy_forward", "backward", "optimizer")))
    med["step_seconds"] = round(statistics.median(sum(s) for s in steps), 5)
    del med["total"]  # it would count ref_forward, which train_dpo.py does not pay per step
    return med


def run_alone(step, n: int, warmup: int):
    for i in range(n):
        step(keep=i >= warmup)


# ----------------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------------

def trl_common(cfg, device, out_dir, max_steps) -> dict:
    """TrainingArguments shared by both TRL runs: offline, quiet, no checkpoints."""
    return dict(output_dir=out_dir, max_steps=max_steps, report_to="none", save_strategy="no",
                logging_steps=10**9, disable_tqdm=True, seed=cfg.seed,
                lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0,
                use_cpu=device.type == "cpu", bf16=device.type == "cuda")


def trl_train(trainer, n_steps, warmup, device, ours_step) -> dict:
    """Run `trainer.train()` with one of our steps between each two of TRL's, so machine noise
    hits both sides alike. A TRL step is timed from the end of our step before it to its own
    end; the first `warmup` steps of each side are dropped. Returns TRL's median seconds per
    step and the optimizer it chose."""
    from transformers import PrinterCallback, TrainerCallback

    class Interleave(TrainerCallback):
        def __init__(self):
            self.ends, self.resumes = [], []

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.ends.append(time.perf_counter())
            ours_step(keep=len(self.ends) > warmup)
            sync(device)
            self.resumes.append(time.perf_counter())

    clock = Interleave()
    trainer.add_callback(clock)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    if len(clock.ends) != n_steps:
        raise RuntimeError(f"TRL ran {len(clock.ends)} steps, expected {n_steps}")
    gaps = [end - resume for end, resume in zip(clock.ends[1:], clock.resumes[:-1])]  # steps 2..n
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # unwrap accelerate's
    return {"step_seconds": round(statistics.median(gaps[warmup - 1:]), 5),
            "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')})"}


def time_trl_dpo(model_cfg, rows, hf_tok, cfg, device, out_dir, ours_step) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    policy = fresh_models(model_cfg, cfg.seed, device)[0]
    tok_ids = dict(pad_id=hf_tok.pad_token_id, eos_id=hf_tok.eos_token_id)
    dpo = train_dpo.DPOConfig()
    n = cfg.warmup + cfg.dpo_steps
    args = DPOConfig(**trl_common(cfg, device, out_dir, n),
                     per_device_train_batch_size=len(rows), learning_rate=dpo.lr, beta=dpo.beta,
                     precompute_ref_log_probs=True, max_length=model_cfg.block_size,
                     max_grad_norm=dpo.grad_clip, weight_decay=dpo.weight_decay)
    trainer = DPOTrainer(model=hf_lm(policy, **tok_ids), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=hf_tok)
    return trl_train(trainer, n, cfg.warmup, device, ours_step)


def time_trl_rloo(model_cfg, prompts, tok, hf_tok, cfg, device, out_dir, ours_step) -> dict:
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer
    policy, _, reward_model, _ = fresh_models(model_cfg, cfg.seed, device)
    tok_ids = dict(pad_id=tok.pad_id, eos_id=tok.end_id)
    path = os.path.join(out_dir, "policy")  # RLOOTrainer builds its reference from a path
    hf_lm(policy, **tok_ids).save_pretrained(path)
    hf_tok.save_pretrained(path)
    hf_rm = hf_scalar(reward_model, **tok_ids)
    prompt_ids = {prompt_text(p): tok.render_prompt(p) for p in prompts}

    def reward(prompts, completions, completion_ids, **kwargs):
        """r_φ on prompt ids + completion ids, as ours scores them (no text round trip)."""
        ids = [prompt_ids[p] + list(c) for p, c in zip(prompts, completion_ids)]
        tokens, attn_mask, _ = pad_batch(ids, [0] * len(ids), tok.pad_id, device)  # (B, T)
        with torch.no_grad(), autocast(device):
            scores = hf_rm(input_ids=tokens, attention_mask=attn_mask.long()).logits  # (B, 1)
        return scores[:, 0].float().tolist()

    n = cfg.warmup + cfg.iterations
    args = RLOOConfig(**trl_common(cfg, device, out_dir, n),
                      per_device_train_batch_size=cfg.prompts * cfg.samples,
                      num_generations=cfg.samples, max_completion_length=cfg.new_tokens,
                      generation_kwargs={"min_new_tokens": cfg.new_tokens},
                      temperature=PPO.temperature, top_k=0, top_p=1.0, beta=PPO.kl_coef,
                      epsilon=PPO.clip_eps, normalize_advantages=PPO.whiten, num_iterations=1,
                      learning_rate=PPO.lr, max_grad_norm=PPO.grad_clip, weight_decay=0.0)
    data = Dataset.from_list([{"prompt": prompt_text(p)} for p in prompts])
    trainer = RLOOTrainer(model=path, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=hf_tok)
    return trl_train(trainer, n, cfg.warmup, device, ours_step)


def run_trl(model_cfg, prompts, rows_ours, tok, cfg, device, runners, result):
    """Time TRL's RLOO and DPO steps, each interleaved with ours (`runners`)."""
    offline()
    import datasets
    import transformers
    import trl
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    hf_tok = hf_tokenizer(tok)
    rows = [{"prompt": prompt_text(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in rows_ours]
    result["same_token_ids"] = same_ids(tok, hf_tok, [r["prompt"] for r in rows_ours] + prompts,
                                        [r["chosen"] for r in rows_ours] + [""] * len(prompts))
    result["trl_version"] = trl.__version__
    result["transformers_version"] = transformers.__version__
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result["trl_dpo"] = time_trl_dpo(model_cfg, rows, hf_tok, cfg, device,
                                         os.path.join(d, "dpo"), runners["dpo"][0])
        result["trl_rloo"] = time_trl_rloo(model_cfg, prompts, tok, hf_tok, cfg, device,
                                           os.path.join(d, "rloo"), runners["rloo"][0])


def main(argv=None):
    cfg, device = start(BenchConfig, argv, PROG)
    if not cfg.json:
        print(format_config(cfg))
    tok = world_tokenizer(512)
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=96)  # train_sft.py's default shape
    world, rng = World(cfg.seed), np.random.default_rng(cfg.seed)
    picked = rng.choice(len(world.train_prompts), size=cfg.prompts, replace=False)
    prompts = [world.train_prompts[i].text for i in picked]
    if max(len(tok.render_prompt(p)) for p in prompts) + cfg.new_tokens > model_cfg.block_size:
        fail(PROG, f"--new-tokens {cfg.new_tokens} leaves no room for the prompts in "
                   f"block_size {model_cfg.block_size}")
    picked = [world.train_prompts[i]
              for i in rng.integers(len(world.train_prompts), size=cfg.pairs)]
    rows = [{"prompt": p.text, "chosen": demonstration(p, rng), "rejected": demonstration(p, rng)}
            for p in picked]
    pairs = train_dpo.encode_pairs(rows, tok)
    dpo_tokens = sum(len(c) + len(r) for c, r, _ in pairs)  # real tokens of one DPO step

    runners = {mode: ppo_runner(model_cfg, prompts, tok, ppo_config(cfg, mode, len(prompts)),
                                device)
               for mode in MODES}
    runners["dpo"] = dpo_runner(model_cfg, pairs, tok, cfg, device)
    run_alone(runners["ppo"][0], cfg.warmup + cfg.iterations, cfg.warmup)  # no TRL twin
    result, skipped = {}, []
    missing = hf_available("transformers", "trl", "datasets", "accelerate")
    if not cfg.trl:
        skipped.append("TRL: --no-trl")
    elif missing:
        skipped.append(f"TRL comparison: not installed: {', '.join(missing)}")
    if skipped:
        run_alone(runners["rloo"][0], cfg.warmup + cfg.iterations, cfg.warmup)
        run_alone(runners["dpo"][0], cfg.warmup + cfg.dpo_steps, cfg.warmup)
    else:
        # TRL prints to stdout; in --json mode stdout holds only our JSON object
        quiet = contextlib.redirect_stdout(sys.stderr) if cfg.json else contextlib.nullcontext()
        with quiet:
            run_trl(model_cfg, prompts, rows, tok, cfg, device, runners, result)
    result["ppo"] = runners["ppo"][1].medians()
    result["rloo"] = runners["rloo"][1].medians()
    result["dpo"] = dpo_summary(runners["dpo"][1])
    if not skipped:
        result["dpo_seconds_ours_over_trl"] = round(
            result["dpo"]["step_seconds"] / result["trl_dpo"]["step_seconds"], 3)
        result["rloo_seconds_ours_over_trl"] = round(
            result["rloo"]["total"] / result["trl_rloo"]["step_seconds"], 3)

    report = {
        "benchmark": "rlhf_step",
        "params": GPT(model_cfg).num_params(),
        "responses": cfg.prompts * cfg.samples, "prompts": cfg.prompts, "samples": cfg.samples,
        "new_tokens": cfg.new_tokens, "pairs": cfg.pairs, "dpo_tokens": dpo_tokens,
        "iterations": cfg.iterations, "dpo_steps": cfg.dpo_steps, "warmup": cfg.warmup,
        **result,
        "compared": {} if skipped else {
            "trl_rloo": "TRL RLOOTrainer vs our train_ppo loop with --advantage group --epochs 1 "
                        "--minibatch-size B (TRL 1.16 has no PPOTrainer)",
            "trl_dpo": "TRL DPOTrainer (precompute_ref_log_probs) vs a train_dpo.py step"},
        "skipped": skipped,
        **environment(device),  # "dtype": ours
        "trl_dtype": "bf16-autocast" if device.type == "cuda" else "float32",
    }
    print(json.dumps(report) if cfg.json else json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
