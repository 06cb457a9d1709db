"""One PPO iteration of train_ppo.py next to one of TRL's PPOTrainer, on the same work.

    PYTHONPATH=/opt/trl112 python benchmarks/ppo_vs_trl.py --threads 1 --json

TRL removed PPOTrainer after 1.12 (1.16 keeps RLOO and GRPO), so this benchmark needs TRL 1.12
importable, e.g. installed beside a newer TRL with `pip install --target /opt/trl112 --no-deps
trl==1.12.0` and put first on PYTHONPATH (benchmarks/README.md); `transformers`, `datasets`
and `accelerate` come from the normal install.

The work: the built-in world's model shape (4 layers, 4 heads, 128 channels, block 96, its
517-token BPE) with random weights; B = --prompts × --samples responses of exactly
--new-tokens tokens each (our end id is -1; TRL runs with no stop token), GAE with a value
model that starts as the reward model, β·KL in the reward, --epochs passes over --minibatches
minibatches. Ours is train_ppo.py's own three phases (`rollout`, `compute_advantages`,
`ppo_update`) with its defaults otherwise; logging and the gold judge are left out, as TRL's
logging is. TRL's side is PPOTrainer on twins of the same four models (benchmarks/hf_twin.py)
and the same prompts, with the same β, ε, value clip, γ, λ and learning rate.

The two do the same forwards and backwards with a few differences, each the trainer's own
choice: TRL takes log π_θold from the sampling pass's logits in every precision (ours in
float32), steps one optimizer over policy and value without clipping (ours: one AdamW each,
gradient norms clipped at 1 and checked finite), and computes the entropy after the step.

Timing: ours runs inside TRL's `on_step_end` callback, so the sides alternate iteration by
iteration and machine noise hits both; TRL's iteration is the gap from the end of ours to its
next `on_step_end`. Both sides run in float32 (`--precision fp32`, the default); with
`--default-row` (on by default) ours also runs a third interleaved iteration in the run's
default precision (`auto`: bf16 autocast on CUDA and bf16-native CPUs), reported separately as
"ours_default" with its own "dtype". Medians over --iterations after --warmup.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Literal


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, fail, start  # noqa: E402
import train_ppo  # noqa: E402
from hf_twin import hf_available, hf_lm, hf_scalar, hf_tokenizer, offline  # noqa: E402
from rlhf_step import fresh_models, ppo_runner, trl_common, trl_train  # noqa: E402
from minirlhf.config import format_config  # noqa: E402
from minirlhf.device import set_precision, uses_bf16  # noqa: E402
from minirlhf.model import GPT, GPTConfig  # noqa: E402
from minirlhf.world import World, world_tokenizer  # noqa: E402

PROG = "benchmarks/ppo_vs_trl.py"


@dataclass
class BenchConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"   # where to run (auto: cuda if available)
    prompts: int = 16                                 # prompts per iteration
    samples: int = 4                                  # responses per prompt; B = prompts × k
    new_tokens: int = 32                              # response length, the same for every row
    epochs: int = 4                                   # passes over each rollout
    minibatches: int = 2                              # minibatches per pass (B / this each)
    iterations: int = 7                               # timed iterations per side (median kept)
    warmup: int = 2                                   # untimed iterations first (>= 1)
    seed: int = 0                                     # weights, prompts, sampling
    threads: int | None = None                        # CPU threads for torch (none: default)
    precision: Literal["auto", "fp32", "bf16"] = "fp32"  # ours, compared with TRL's float32
    default_row: bool = True                          # also time ours in --precision auto
    json: bool = False                                # print one JSON object and nothing else

    def check(self):
        if min(self.prompts, self.samples, self.new_tokens, self.epochs, self.minibatches,
               self.iterations, self.warmup, self.threads or 1) < 1:
            raise ValueError("every count must be >= 1")
        if (self.prompts * self.samples) % self.minibatches:
            raise ValueError("--minibatches must divide --prompts × --samples")


def ppo_config(cfg: BenchConfig) -> train_ppo.PPOConfig:
    """train_ppo.py's defaults with this benchmark's work."""
    B = cfg.prompts * cfg.samples
    return train_ppo.PPOConfig(seed=cfg.seed, prompts_per_iter=cfg.prompts,
                               samples_per_prompt=cfg.samples, max_new_tokens=cfg.new_tokens,
                               epochs=cfg.epochs, minibatch_size=B // cfg.minibatches)


def ours_runner(model_cfg, prompts, tok, cfg, device, precision: str):
    """(step, clock): step(keep) runs one iteration of train_ppo.train's loop in `precision`:
    rollout -> compute_advantages -> ppo_update, the functions the script calls."""
    return ppo_runner(model_cfg, prompts, tok, ppo_config(cfg), device,
                      before_step=lambda: set_precision(precision))


def time_trl_ppo(model_cfg, prompts, tok, cfg, device, out_dir, ours_step) -> dict:
    """TRL 1.12's PPOTrainer on twins of the four models, `ours_step` between its iterations."""
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    policy, ref, reward_model, value_model = fresh_models(model_cfg, cfg.seed, device)
    ids = dict(pad_id=tok.pad_id, eos_id=tok.end_id)
    hf_tok = hf_tokenizer(tok)
    hf_tok.padding_side = "left"  # prompts left-padded for generation, as ours
    pcfg, B = ppo_config(cfg), cfg.prompts * cfg.samples
    n = cfg.warmup + cfg.iterations
    common = trl_common(cfg, device, out_dir, n)
    common["bf16"] = False  # float32, as ours with --precision fp32
    args = PPOConfig(**common, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                     total_episodes=B * n, num_mini_batches=cfg.minibatches,
                     num_ppo_epochs=cfg.epochs, local_rollout_forward_batch_size=B,
                     response_length=cfg.new_tokens, stop_token=None, stop_token_id=None,
                     temperature=pcfg.temperature, missing_eos_penalty=None,
                     kl_coef=pcfg.kl_coef, kl_estimator="k1", cliprange=pcfg.clip_eps,
                     vf_coef=pcfg.vf_coef, cliprange_value=pcfg.value_clip, gamma=pcfg.gamma,
                     lam=pcfg.lam, whiten_rewards=False, learning_rate=pcfg.lr,
                     num_sample_generations=0, weight_decay=0.0)
    rows = [{"input_ids": tok.render_prompt(p)} for p in prompts]
    data = Dataset.from_list(rows)
    hf_policy = hf_lm(policy, **ids)
    hf_policy.generation_config.eos_token_id = None  # no stop token: every row full length
    trainer = PPOTrainer(args=args, processing_class=hf_tok, model=hf_policy,
                         ref_model=hf_lm(ref, **ids), reward_model=hf_scalar(reward_model, **ids),
                         value_model=hf_scalar(value_model, **ids), train_dataset=data,
                         eval_dataset=data)
    result = trl_train(trainer, n, cfg.warmup, device, ours_step)
    return result


def trl_version() -> str | None:
    """TRL's version when the installed TRL still has PPOTrainer (1.12 or older), else None."""
    if hf_available("transformers", "trl", "datasets", "accelerate"):
        return None
    import trl
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.ppo import PPOTrainer  # noqa: F401
    except ImportError:
        return None
    return trl.__version__


def main(argv=None):
    cfg, device = start(BenchConfig, argv, PROG)
    if not cfg.json:
        print(format_config(cfg))
    offline()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    version = trl_version()
    if version is None:
        fail(PROG, "needs TRL with PPOTrainer (1.12; later versions removed it), transformers, "
                   "datasets and accelerate: pip install --target DIR --no-deps trl==1.12.0, "
                   "then PYTHONPATH=DIR (benchmarks/README.md)")
    tok = world_tokenizer(512)
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=96)  # train_sft.py's default
    world = World(cfg.seed)
    texts = [p.text for p in world.train_prompts[:cfg.prompts]]
    if max(len(tok.render_prompt(p)) for p in texts) + cfg.new_tokens > model_cfg.block_size:
        fail(PROG, f"--new-tokens {cfg.new_tokens} leaves no room for the prompts in "
                   f"block_size {model_cfg.block_size}")
    batch_prompts = [p for p in texts for _ in range(cfg.samples)]  # TRL's B rows
    ours = ours_runner(model_cfg, texts, tok, cfg, device, cfg.precision)
    default = (ours_runner(model_cfg, texts, tok, cfg, device, "auto")
               if cfg.default_row else None)

    def ours_step(keep: bool):
        ours[0](keep)
        if default is not None:
            default[0](keep)
        set_precision(cfg.precision)

    import transformers
    transformers.logging.set_verbosity_error()
    quiet = contextlib.redirect_stdout(sys.stderr) if cfg.json else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        trl = time_trl_ppo(model_cfg, batch_prompts, tok, cfg, device, d, ours_step)
    set_precision(cfg.precision)
    report = {
        "benchmark": "ppo_vs_trl", "params": GPT(model_cfg).num_params(),
        "responses": len(batch_prompts), "new_tokens": cfg.new_tokens, "epochs": cfg.epochs,
        "minibatches": cfg.minibatches, "iterations": cfg.iterations, "warmup": cfg.warmup,
        "ours": ours[1].medians(), "trl": trl,
        "ours_over_trl": round(ours[1].medians()["total"] / trl["step_seconds"], 3),
        **environment(device), "trl_dtype": "float32", "trl_version": version,
        "transformers_version": transformers.__version__,
    }
    if default is not None:
        set_precision("auto")
        report["ours_default"] = {**default[1].medians(),
                                  "dtype": "bf16-autocast" if uses_bf16(device) else "float32"}
        report["ours_default_over_trl"] = round(
            default[1].medians()["total"] / trl["step_seconds"], 3)
        set_precision(cfg.precision)
    print(json.dumps(report) if cfg.json else json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
