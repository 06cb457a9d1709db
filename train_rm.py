"""Reward modelling: learn a scalar reward r_φ(x, y) from pairwise preferences (lecture ch. 6).

    python train_rm.py --make-pairs                 # sample pairs from out/sft, label, train
    python train_rm.py --make-pairs --pairs-only    # only write OUT/prefs*.jsonl
    python train_rm.py --data my_prefs.jsonl        # train on your own preference JSONL
    python train_rm.py --resume                     # continue a stopped run
    python train_rm.py --noise-free-labels          # built-in world: labels without the coin flip
    python train_rm.py --data out/rm/prefs.jsonl --labeller ai:out/judge --out out/rm_ai
                                                    # RLAIF: a judge model labels the pairs (ch. 8)
    torchrun --standalone --nproc_per_node 4 train_rm.py --make-pairs   # 4 GPUs

Stage two of the pipeline (lecture ch. 7). Preference data is made the lecture's way: for each
training prompt the SFT policy writes responses (k = 4 by default; the lecture's "sample two" is
k = 2) and a labeller picks one of every two — here the world's Bradley–Terry labeller on the
gold score, noisy the way people are. The reward model is the SFT model with its language-model
head swapped for a scalar head, read at the last real token, and trained with the Bradley–Terry
loss −log σ(r_w − r_l) on (prompt, chosen, rejected) triples.

Writes OUT/prefs.jsonl, prefs_val.jsonl, prefs_test.jsonl (with --make-pairs), OUT/checkpoint.pt
(the best model by validation loss, rewards centred on the SFT policy), OUT/metrics.jsonl and
OUT/eval.json: test accuracy beside the Bayes limit of the labels (and the accuracy expected
over the labels' coin flips, the noise-free number to compare with that limit), and a
calibration table (also drawn as OUT/calibration.png).

`--noise-free-labels` (built-in world only) trains on the labeller's probability P(y_w ≻ y_l)
instead of its coin flip: the same loss averaged over the label's noise (`reward_loss` with
p_chosen). It measures what the noise costs (docs/results.md, "Reward model").

`--labeller ai:DIR` is RLAIF (lecture ch. 8: "AI preferences — scalable, cheap; limited by judge
model quality"): a judge, the reward model in DIR (say one trained on a few thousand human
labels), relabels the training and validation pairs, drawing each label from its own
σ(r_a − r_b) (`judge_labels`; the higher reward with --judge-greedy). The test pairs keep their
human labels, so the reward model trained on the judge's labels faces the same Bayes limit.
Writes OUT/prefs_ai.jsonl and prefs_val_ai.jsonl, the relabelled pairs, and how often the judge
agreed with the given labels, next to how often two human labellers agree, in eval.json.

Left out on purpose: ensembles, margin losses, more than two responses per comparison.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlhf.checkpoint import (CHECKPOINT, CheckpointError, check_compatible, load_checkpoint,
                                 load_stage, model_from_checkpoint)
from minirlhf.config import check_ranges, parse_config
from minirlhf.data import DataError, hold_out, read_prefs, write_jsonl
from minirlhf.device import autocast
from minirlhf.distributed import barrier, broadcast, mean_over_ranks, wrap
from minirlhf.evaluate import evaluate, evaluation_prompts, final_evaluation, reward_model_scorer
from minirlhf.model import ScalarHeadModel
from minirlhf.plots import plot_calibration
from minirlhf.sampler import generate
from minirlhf.tokenizer import TokenizerError
from minirlhf.training import (NonFiniteError, checkpoint_to_resume, clear_run, distinct_rows,
                               due, fail, guarded_run, lr_at, make_optimizer, open_log,
                               optimizer_step, pad_batch, pair_batches_from, progress_bar,
                               resume_state, save_run, set_lr, shown, start_run, write_json)
from minirlhf.world import (World, bayes_accuracy, expected_accuracy, is_world_prompt,
                            label_pair, pair_label_prob, shortfall_by_kind)


def preference_probability(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: P(a ≻ b) = exp(r_a) / (exp(r_a) + exp(r_b)) = σ(r_a − r_b) (lecture ch. 6).

    r_a, r_b: (B,) -> (B,).
    """
    return torch.sigmoid(r_a - r_b)  # σ(Δ), lecture ch. 6


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                p_chosen: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Bradley–Terry negative log-likelihood L_RM = −(1/B) Σ log σ(r_w − r_l) (lecture ch. 6).

    r_chosen:   (B,) reward of the preferred response y_w
    r_rejected: (B,) reward of the other response y_l
    p_chosen:   (B,) optional: the probability that y_w is preferred, instead of the label's
                certainty 1; the loss is then the cross-entropy −[p log σ(Δ) + (1 − p) log σ(−Δ)],
                which is the lecture's loss averaged over a labeller who picks y_w with
                probability p (`--noise-free-labels`). p = 1 gives the loss above exactly.
    returns     loss (scalar), stats {"loss", "accuracy", "margin", "chosen_reward",
                "rejected_reward"} (batch means; accuracy counts r_w > r_l strictly)

    Written with logsigmoid, −log σ(Δ) = softplus(−Δ), which is finite for any Δ; the lecture's
    `-torch.log(torch.sigmoid(Δ))` gives log(0) = −inf once Δ < −104 in float32.
    """
    delta = r_chosen - r_rejected  # (B,) Δ = r_w − r_l
    if p_chosen is None:
        loss = -F.logsigmoid(delta).mean()  # L_RM = −mean log σ(Δ), lecture ch. 6
    else:  # E over the labeller's coin: p·(−log σ(Δ)) + (1 − p)·(−log σ(−Δ))
        if p_chosen.shape != delta.shape:
            raise ValueError(f"p_chosen has shape {tuple(p_chosen.shape)}, the rewards "
                             f"{tuple(delta.shape)}")
        p_chosen = p_chosen.to(delta)  # the rewards' dtype and device
        loss = -(p_chosen * F.logsigmoid(delta) + (1 - p_chosen) * F.logsigmoid(-delta)).mean()
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "accuracy": (delta > 0).float().mean(),
            "margin": delta.mean(),
            "chosen_reward": r_chosen.mean(),
            "rejected_reward": r_rejected.mean(),
        }
    return loss, stats


def judge_labels(r_a: torch.Tensor, r_b: torch.Tensor, rng: np.random.Generator,
                 greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RLAIF (lecture ch. 8, "AI preferences — scalable, cheap; limited by judge model quality"):
    a judge model labels pairs (a, b) the way the Bradley–Terry labeller does, from its own
    rewards: a is chosen with probability P(a ≻ b) = σ(r_a − r_b), one uniform draw of `rng` per
    pair; greedy: a is chosen when r_a ≥ r_b (a tie keeps the pair's order), no draw.

    r_a, r_b: (N,) the judge's rewards of a and b
    returns   a_chosen (N,) bool, and p (N,) float64: the judge's P(a ≻ b), 1 or 0 when greedy
    """
    if r_a.shape != r_b.shape or r_a.dim() != 1:
        raise ValueError(f"r_a and r_b must be (N,) alike, not {tuple(r_a.shape)} and "
                         f"{tuple(r_b.shape)}")
    r_a, r_b = r_a.detach().cpu().double(), r_b.detach().cpu().double()
    if greedy:
        a_chosen = r_a >= r_b
        return a_chosen, a_chosen.double()
    p = preference_probability(r_a, r_b)  # σ(r_a − r_b), lecture ch. 6
    u = torch.from_numpy(rng.random(len(p)))  # (N,) uniform in [0, 1)
    return u < p, p


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

@dataclass
class RMConfig:
    out: str = "out/rm"               # folder for checkpoint.pt, prefs*.jsonl, metrics, eval.json
    sft: str = "out/sft"              # SFT stage (or gpt2:DIR): the reward model's trunk
                                      # starts there
    make_pairs: bool = False          # sample preference pairs from --policy first (then train)
    pairs_only: bool = False          # with --make-pairs: write the pairs and stop
    policy: str | None = None         # policy that writes the pairs (default: --sft)
    data: str | None = None           # preference JSONL to train on (default: OUT/prefs.jsonl)
    val_data: str | None = None       # validation pairs (default: OUT/prefs_val.jsonl if present)
    test_data: str | None = None      # test pairs (default: OUT/prefs_test.jsonl if present)
    max_pairs: int | None = None      # train on the first N pairs of the data only (none: all)
    resume: bool = False              # continue OUT/checkpoint.pt where a stopped run left off
    overwrite: bool = False           # start over in a used --out: its run files are replaced
    verbose: bool = False             # print the whole config at start
    seed: int = 0                     # seeds pair sampling, labels, data order
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if there is one
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA and bf16-native CPUs
    # pairs: 48000 from 32000 responses (k = 4); docs/results.md, "Reward model"
    n_pairs: int = 48000              # training pairs to sample
    n_val_pairs: int = 1000           # validation pairs (from validation prompts)
    n_test_pairs: int = 2000          # test pairs (from test prompts; ±0.9 points of label noise)
    responses_per_prompt: int = 4     # k responses per training prompt, all k(k-1)/2 pairs labelled
    pair_temperature: float = 1.0     # sampling temperature of the pair-writing policy
    max_new_tokens: int = 64          # response budget when sampling pairs
    # optimisation: 2000 steps: 4.5 points under the Bayes limit; docs/results.md, "Reward model"
    max_steps: int = 2000             # optimizer steps (early stopping may end sooner)
    batch_size: int = 64              # pairs per step
    lr: float = 5e-4                  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1         # cosine decays to lr * this
    warmup: int = 20                  # linear warmup steps
    weight_decay: float = 0.1         # AdamW decoupled weight decay on matrices
    grad_clip: float = 1.0            # max global gradient norm
    eval_every: int = 500             # steps between validation loss/accuracy (and checkpoints)
    patience: int = 3                 # stop after this many evaluations without a better val loss
    normalize: bool = True            # shift rewards so the SFT policy's responses average 0
    eval_prompts: str | None = None   # prompts JSONL on which --policy's samples are scored at
                                      # the end; none = the world's test prompts or the
                                      # validation pairs' prompts
    eval_samples: int = 16            # samples per evaluation prompt (plus one greedy)
    noise_free_labels: bool = False   # built-in world: the labeller's P(y_w ≻ y_l) as target
    labeller: str = "human"           # who labels the training and validation pairs: human (the
                                      # pairs' own labels) or ai:DIR, the reward-model stage in DIR
                                      # as judge (RLAIF, lecture ch. 8); test pairs keep theirs
    judge_greedy: bool = False        # with --labeller ai:DIR: the judge takes the higher score
                                      # instead of drawing from σ(r_a − r_b)

    def check(self):
        check_ranges(self, positive=("n_pairs", "n_val_pairs", "n_test_pairs", "max_steps",
                                     "batch_size", "eval_every", "patience", "max_new_tokens",
                                     "lr", "grad_clip", "pair_temperature", "eval_samples"),
                     non_negative=("warmup", "weight_decay"))
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--min-lr-ratio must be in [0, 1]")
        if self.responses_per_prompt < 2:
            raise ValueError("--responses-per-prompt must be at least 2")
        if self.pairs_only and not self.make_pairs:
            raise ValueError("--pairs-only needs --make-pairs")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError("--max-pairs must be positive")
        self.check_labeller()

    def check_labeller(self):
        """--labeller is human or ai:DIR, and an ai labeller goes with nothing that needs the
        human labeller (--noise-free-labels) or skips training (--pairs-only)."""
        if self.labeller == "ai:":
            raise ValueError("--labeller ai: names no folder: ai:DIR, DIR a reward-model stage")
        if self.labeller != "human" and self.judge_dir() is None:
            raise ValueError(f"--labeller {shown(self.labeller)}: human, or ai:DIR with DIR a "
                             f"reward-model stage folder")
        if self.judge_greedy and self.judge_dir() is None:
            raise ValueError("--judge-greedy needs --labeller ai:DIR")
        if self.judge_dir() is not None and self.noise_free_labels:
            raise ValueError("--noise-free-labels trains on the human labeller's probability; "
                             "it does not go with --labeller ai:DIR")
        if self.judge_dir() is not None and self.pairs_only:
            raise ValueError("--labeller ai:DIR relabels the pairs a run trains on; --pairs-only "
                             "trains on none")
        judge = self.judge_dir()
        folder = os.path.dirname(judge) if judge and os.path.isfile(judge) else judge
        if folder is not None and os.path.realpath(folder or ".") == os.path.realpath(self.out):
            raise ValueError(f"--labeller {shown(self.labeller)}: the judge is in --out, which "
                             f"this run writes: copy it elsewhere or pick another --out")

    def judge_dir(self) -> str | None:
        """DIR of --labeller ai:DIR (the judge's stage folder); None for human labels."""
        return (self.labeller[3:] or None) if self.labeller.startswith("ai:") else None

    def inner_paths(self) -> dict:
        """Paths inside other flags' values, for `training.check_paths`: --labeller ai:DIR's
        judge, a stage folder."""
        return {"labeller": (self.judge_dir(), "stage")} if self.judge_dir() else {}

    def unused_paths(self):
        """The path flags this run never reads (`training.check_paths` skips them): --sft when
        --pairs-only has --policy write the pairs."""
        return ("sft",) if self.pairs_only and self.policy else ()


@guarded_run  # OUT is this run's until train() ends (minirlhf/training.py)
def train(cfg: RMConfig, prog: str = "train_rm.py") -> dict:
    """Preference pairs (with --make-pairs); the reward model and optimizer; then per step: a
    batch of pairs, L_RM, backward, an optimizer step, and on schedule the validation loss, a
    checkpoint and early stopping; then the best model, centred, and its test accuracy."""
    dist = start_run(cfg, prog)  # one process, or one of torchrun's (minirlhf/distributed.py)
    device, result = dist.device, {}
    if cfg.make_pairs:
        if dist.is_main:  # one process writes the pairs, the same as alone; the others wait
            result["make_pairs"] = make_pairs_main(cfg, device)
        barrier(dist)
        if cfg.pairs_only:
            return result
    t0 = time.time()

    # --- the reward model: the SFT trunk + a fresh scalar head (lecture ch. 6), or resumed ---
    ck = checkpoint_to_resume(cfg)  # OUT/checkpoint.pt with --resume, else None
    rm, tok = load_reward_model(cfg, ck, device)
    train_pairs, p_chosen, val_pairs, test_rows, prompts, labels = load_pairs(
        cfg, tok, rm.config.block_size, device)  # with --labeller ai:DIR: the judge's labels
    print(f"reward model: {rm.num_params() / 1e6:.2f}M parameters; {len(train_pairs)} training "
          f"pairs, {len(val_pairs)} validation pairs", flush=True)
    optimizer = make_optimizer(rm, cfg.lr, cfg.weight_decay)
    start = resume_state(cfg, ck, optimizer)  # the checkpoint's step; None for a fresh run
    best, bad_evals = float("inf"), 0  # early stopping: best validation loss, evals since it
    if ck is not None:
        best, bad_evals = ck["extra"]["best_val_loss"], ck["extra"]["bad_evals"]
    log = open_log(cfg, start, dist)  # OUT/metrics.jsonl (and config.json)
    write_labels(cfg, labels, dist)  # the judge's pairs: OUT/prefs_ai.jsonl, prefs_val_ai.jsonl
    step = start or 0
    batches = pair_batches_from(step, train_pairs, cfg.seed, cfg.batch_size, dist)
    train_score = wrap(rm, dist, "score")  # under torchrun DDP: backward averages gradients

    # --- the loop: score chosen and rejected, Bradley–Terry loss, step ---
    rm.train()
    bar = progress_bar(cfg.max_steps, step, "rm", dist)
    stopped_early = bad_evals >= cfg.patience  # resumed after early stopping: train no further
    while step < cfg.max_steps and not stopped_early:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        idx = next(batches)  # this process's share of the batch's pairs
        r_chosen, r_rejected = score_pairs(train_score, [train_pairs[i] for i in idx], tok, device)
        p = None if p_chosen is None else p_chosen[idx]  # reward_loss moves it to the device
        # −log σ(r_w − r_l), lecture ch. 6 (averaged over the label's coin: --noise-free-labels)
        loss, stats = reward_loss(r_chosen, r_rejected, p)
        loss.backward()
        optimizer_step(optimizer, rm, cfg.grad_clip, step + 1, loss)
        step += 1
        bar.update(1)
        if due(step, cfg.eval_every, cfg.max_steps):  # every process; rank 0 prints and writes
            val_loss = validate(rm, val_pairs, stats, lr, step, log, tok, cfg, dist)
            best, bad_evals, stopped_early = early_stopping(cfg, val_loss, best, bad_evals, dist)
            if dist.is_main:  # best.pt keeps the best model seen; checkpoint.pt the latest
                save_checkpoints(cfg, step, rm, optimizer, tok, best, bad_evals)
    bar.close()
    if not dist.is_main:  # rank 0 finishes the model, evaluates and writes eval.json
        return result

    # --- the final model: the best checkpoint, rewards centred on the SFT policy ---
    with torch.random.fork_rng(devices=[]):  # building it draws no number the run saves
        policy = load_stage(cfg.policy or cfg.sft, "gpt", device)[0]  # PPO starts from it
    shift, centre = best_model_centred(cfg, rm, train_pairs, prompts, policy, tok, device)
    extra = {"best_val_loss": best, "bad_evals": bad_evals, "reward_shift": shift, "finished": True}
    save_run(cfg, step, rm, optimizer, tok, "scalar", extra)
    result.update({"train_seconds": time.time() - t0, "steps": step,
                   "stopped_early": stopped_early, "reward_shift": shift,
                   "centred_on": centre, "n_train_pairs": len(train_pairs),
                   "labels": labels.info})
    result.update(score_policy_samples(cfg, rm, policy, prompts, tok, device))
    if test_rows:  # test accuracy next to the Bayes limit, and calibration
        result.update(test_report(cfg, rm, test_rows, tok, device))
    write_json(os.path.join(cfg.out, "eval.json"), result)
    return result


# ----------------------------------------------------------------------------------------------
# The phases of train(), in the order it calls them. First the preference pairs, the lecture's
# way (ch. 6 and 7, stage 2): sample responses per prompt from the SFT policy and let the
# world's noisy Bradley–Terry labeller pick one of every two.
# ----------------------------------------------------------------------------------------------

class PairsError(RuntimeError):
    """The policy could not write enough usable pairs (it rarely ends its responses)."""


def make_pairs(policy, tok, prompts, n_pairs: int, seed: int, temperature: float = 1.0,
               max_new_tokens: int = 32, k: int = 2, batch_size: int = 512,
               label=label_pair) -> list[dict]:
    """`n_pairs` {"prompt", "chosen", "rejected"} rows, cycling through `prompts` (the world's
    Prompts, or prompt texts when `label` needs no world).

    For each prompt the policy writes k responses and every two of them become a pair, each
    labelled by its own draw of the Bradley–Terry labeller (InstructGPT had labellers rank K = 4
    to 9 responses for the same reason: K responses give K(K−1)/2 comparisons, many of them
    between responses that differ in one respect only). k = 2 is the plain "sample two" of the
    lecture. Training scores each response once for all its pairs (`pair_batch`, batches of
    whole groups), so a prompt's k(k−1)/2 pairs cost k forward passes (how k was chosen:
    docs/results.md, "Reward model"). Responses that lack the end token or are empty are
    dropped, and so are pairs of identical texts: the JSONL format cannot mark a cut-off
    response or hold an empty one, and an identical pair carries no preference.
    label(prompt, a, b, rng) -> (chosen, rejected): the world's labeller by default; online DPO
    (train_dpo.py --rounds) passes its own.
    """
    rng = np.random.default_rng(seed)  # the labeller's coin flips
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    rows, barren, cursor = [], 0, 0
    order = [prompts[i] for i in rng.permutation(len(prompts))]
    bar = tqdm(total=n_pairs, desc="pairs", leave=False, disable=None)  # on a terminal only
    while len(rows) < n_pairs:
        if barren >= 10:  # ten batches in a row without one usable pair: the policy is stuck
            raise PairsError(f"could not make {n_pairs} distinct ended pairs (made {len(rows)}): "
                             f"does the policy end its responses within --max-new-tokens "
                             f"{max_new_tokens}?")
        made = len(rows)
        chunk = [order[(cursor + i) % len(order)] for i in range(max(1, batch_size // k))]
        cursor += len(chunk)
        group = [p for p in chunk for _ in range(k)]  # k samples per prompt, side by side
        g = generate(policy, [tok.render_prompt(text_of(p)) for p in group], max_new_tokens,
                     eos_id=tok.end_id, pad_id=tok.pad_id, temperature=temperature, generator=gen)
        texts = [tok.decode(ids) if ended else None
                 for ids, ended in zip(g.responses(), g.ended.tolist())]
        for i, p in enumerate(chunk):
            answers = [t for t in texts[i * k:(i + 1) * k] if t is not None and t.strip()]
            for x in range(len(answers)):
                for y in range(x + 1, len(answers)):
                    a, b = answers[x], answers[y]
                    if a == b or len(rows) == n_pairs:
                        continue
                    chosen, rejected = label(p, a, b, rng)
                    rows.append({"prompt": text_of(p), "chosen": chosen, "rejected": rejected})
        barren = barren + 1 if len(rows) == made else 0
        bar.update(len(rows) - made)
    bar.close()
    return rows


def text_of(prompt) -> str:
    """A prompt's text: a world Prompt's .text, or the string itself."""
    return getattr(prompt, "text", prompt)


def make_pairs_main(cfg: RMConfig, device) -> dict:
    """--make-pairs: write OUT/prefs.jsonl, prefs_val.jsonl, prefs_test.jsonl from --policy
    (default: --sft)."""
    t0 = time.time()
    policy, tok, _ = load_stage(cfg.policy or cfg.sft, "gpt", device)
    policy.eval()
    world = World(cfg.seed)
    # held-out pairs are plain independent pairs (k = 2), so their Bayes limit is the lecture's
    splits = {"prefs.jsonl": (world.train_prompts, cfg.n_pairs, cfg.seed,
                              cfg.responses_per_prompt),
              "prefs_val.jsonl": (world.val_prompts, cfg.n_val_pairs, cfg.seed + 1, 2),
              "prefs_test.jsonl": (world.test_prompts, cfg.n_test_pairs, cfg.seed + 2, 2)}
    rows = {name: make_pairs(policy, tok, prompts, n, seed, cfg.pair_temperature,
                             cfg.max_new_tokens, k)
            for name, (prompts, n, seed, k) in splits.items()}
    clear_run(cfg)  # --overwrite: the old run's files go before the new pairs join them
    counts = {name: write_jsonl(os.path.join(cfg.out, name), r) for name, r in rows.items()}
    seconds = time.time() - t0
    print(f"wrote {counts} to {cfg.out} in {seconds:.1f}s", flush=True)
    return {"pairs": counts, "seconds": seconds}


# ----------------------------------------------------------------------------------------------
# The reward model and its data
# ----------------------------------------------------------------------------------------------

def load_reward_model(cfg: RMConfig, ck: dict | None, device) -> tuple[ScalarHeadModel, object]:
    """(reward model, tokenizer): the SFT model with its language-model head swapped for a fresh
    scalar head (lecture ch. 6), or on --resume the checkpoint's, once it fits the SFT model."""
    sft_model, tok, _ = load_stage(cfg.sft, "gpt", device)
    if ck is None:
        return ScalarHeadModel.from_gpt(sft_model), tok
    path = os.path.join(cfg.out, CHECKPOINT)
    check_compatible(ck, path, model_config=sft_model.config, tokenizer=tok)
    return model_from_checkpoint(ck, path, "scalar").to(device), tok


def load_pairs(cfg: RMConfig, tok, block_size: int, device):
    """(training pairs, p_chosen, validation pairs, test rows, prompts, labels). Pairs are
    (chosen ids, rejected ids); p_chosen is each training pair's P(chosen ≻ rejected) with
    --noise-free-labels, else None; without validation pairs, the pairs of 5% of the prompts are
    held out (`hold_out`); test rows may be None; prompts = {"train": [...], "val": [...]};
    labels: who labelled the training and validation pairs (`Labels`): the file's labels, or
    with --labeller ai:DIR the judge's, drawn after the hold-out (`ai_labels`)."""
    train_path = cfg.data or os.path.join(cfg.out, "prefs.jsonl")
    if not os.path.exists(train_path):
        raise DataError(train_path, "no preference data: run with --make-pairs or pass --data")
    train_rows = read_prefs(train_path, tok, block_size)[:cfg.max_pairs]
    val_path = cfg.val_data or os.path.join(cfg.out, "prefs_val.jsonl")
    val_rows = read_pairs(val_path, tok, block_size)
    if not val_rows:
        train_rows, val_rows = hold_out(train_rows, cfg.seed)
    labels = Labels({"labeller": "human"})
    if cfg.judge_dir() is not None:  # RLAIF: the judge's labels replace the file's (ch. 8)
        train_rows, val_rows, labels = ai_labels(cfg, tok, block_size, train_rows, val_rows,
                                                 device)
    p_chosen = label_probabilities(train_rows, train_path) if cfg.noise_free_labels else None
    test_path = cfg.test_data or os.path.join(cfg.out, "prefs_test.jsonl")
    test_rows = read_pairs(test_path, tok, block_size)  # never relabelled: the human yardstick
    prompts = {"train": [r["prompt"] for r in train_rows], "val": [r["prompt"] for r in val_rows]}
    return (encode_pairs(train_rows, tok), p_chosen, encode_pairs(val_rows, tok), test_rows,
            prompts, labels)


def read_pairs(path, tok, block_size):
    return read_prefs(path, tok, block_size) if path and os.path.exists(path) else None


def encode_pairs(rows, tok) -> list[tuple[list[int], list[int]]]:
    return [(tok.render(r["prompt"], r["chosen"])[0], tok.render(r["prompt"], r["rejected"])[0])
            for r in rows]


# ----------------------------------------------------------------------------------------------
# RLAIF (lecture ch. 8): a judge model, a reward model trained on a few human labels, labels
# the pairs instead of people. "AI preferences — scalable, cheap; limited by judge model
# quality": the labels' agreement with the human labeller's says how limited.
# ----------------------------------------------------------------------------------------------

@dataclass
class Labels:
    """Who labelled the training and validation pairs: `info` for eval.json's "labels", and the
    pairs a judge relabelled, by file name (OUT/prefs_ai.jsonl, prefs_val_ai.jsonl; none for
    human labels), which `write_labels` writes once the run writes in OUT."""
    info: dict
    files: dict = field(default_factory=dict)  # file name -> [{"prompt", "chosen", "rejected"}]


def ai_labels(cfg: RMConfig, tok, block_size: int, train_rows, val_rows,
              device) -> tuple[list, list, Labels]:
    """--labeller ai:DIR: the judge relabels the training and the validation pairs (after
    the hold-out, so each split's labels are drawn from its own pairs), each split with its own
    rng stream of --seed, so --resume draws the same labels. The test pairs keep their labels:
    the reward model trained on the judge's is measured against the human labeller's.
    Returns (training rows, validation rows, Labels)."""
    judge = load_judge(cfg, tok, block_size, device)
    train_rows, stats = relabel_with_judge(judge, tok, train_rows, device, [cfg.seed, 8],
                                           cfg.judge_greedy)
    val_rows, val_stats = relabel_with_judge(judge, tok, val_rows, device, [cfg.seed, 9],
                                             cfg.judge_greedy)
    human = (f" (expected {stats['expected_agreement']:.3f}; two human labellers agree "
             f"{stats['human_agreement']:.3f} on the same pairs)"
             if "human_agreement" in stats else "")
    print(f"labels: ai judge {cfg.judge_dir()}{' (greedy)' if cfg.judge_greedy else ''}: "
          f"agreement with the given labels {stats['agreement']:.3f}{human} on "
          f"{stats['n_pairs']} pairs", flush=True)
    info = {"labeller": cfg.labeller, "greedy": cfg.judge_greedy, **stats,
            "n_val_pairs": val_stats["n_pairs"], "val_agreement": val_stats["agreement"]}
    return train_rows, val_rows, Labels(info, {"prefs_ai.jsonl": train_rows,
                                               "prefs_val_ai.jsonl": val_rows})


def load_judge(cfg: RMConfig, tok, block_size: int, device) -> ScalarHeadModel:
    """The judge of --labeller ai:DIR, in eval mode: a reward-model stage on the SFT model's
    tokenizer that reads sequences as long as the reward model does; else one CheckpointError
    naming the flag."""
    flag = f"--labeller {shown(cfg.labeller)}"
    try:
        with torch.random.fork_rng(devices=[]):  # building it draws no number the run saves
            judge, judge_tok, _ = load_stage(cfg.judge_dir(), "scalar", device)
    except CheckpointError as e:
        raise CheckpointError(f"{flag}: {e}") from None
    if judge_tok.fingerprint() != tok.fingerprint():
        raise CheckpointError(f"{flag}: the judge uses another tokenizer than SFT")
    if judge.config.block_size < block_size:
        raise CheckpointError(f"{flag}: the judge reads at most {judge.config.block_size} "
                              f"tokens, the reward model {block_size}")
    return judge.eval()


def relabel_with_judge(judge, tok, rows: list[dict], device, seed, greedy: bool = False,
                       batch_size: int = 256) -> tuple[list[dict], dict]:
    """Rows {"prompt", "chosen", "rejected"} labelled by the judge: for each pair (a, b) =
    (chosen, rejected) as given, its rewards r_a, r_b and a label from `judge_labels`, with
    np.random.default_rng(seed). The new rows hold the same prompt and the same two texts.
    judge: anything with `.score(tokens (N, T), attn_mask (N, T)) -> (N,)`.
    Returns (new rows, `label_agreement`'s stats)."""
    r_a, r_b = judge_scores(judge, encode_pairs(rows, tok), tok, device, batch_size)
    bad = (~torch.isfinite(r_a) | ~torch.isfinite(r_b)).nonzero()
    if len(bad):
        i = bad[0].item()
        raise NonFiniteError(f"the judge's rewards of pair {i + 1} are {r_a[i].item()} and "
                             f"{r_b[i].item()}: it cannot label")
    a_chosen, p_judge = judge_labels(r_a, r_b, np.random.default_rng(seed), greedy)
    new_rows = [{"prompt": r["prompt"], "chosen": r["chosen"] if a else r["rejected"],
                 "rejected": r["rejected"] if a else r["chosen"]}
                for r, a in zip(rows, a_chosen.tolist())]
    return new_rows, label_agreement(rows, a_chosen, p_judge)


@torch.no_grad()
def judge_scores(judge, pairs, tok, device, batch_size: int = 256):
    """(r_a (N,), r_b (N,)) on the CPU: the judge's rewards of each pair's two responses, scored
    as training scores pairs (`score_pairs`: each distinct sequence of a batch once)."""
    r_a, r_b = [], []
    for i in tqdm(range(0, len(pairs), batch_size), desc="judge", leave=False, disable=None):
        a, b = score_pairs(judge.score, pairs[i:i + batch_size], tok, device)
        r_a.append(a.cpu())
        r_b.append(b.cpu())
    return torch.cat(r_a), torch.cat(r_b)


def label_agreement(rows: list[dict], a_chosen: torch.Tensor, p_judge: torch.Tensor) -> dict:
    """How a judge's labels compare with the rows' own. a_chosen (N,) bool: the judge chose the
    row's "chosen"; p_judge (N,): its P(chosen ≻ rejected) (0 or 1 when greedy).
    {"n_pairs", "agreement": the fraction of rows whose label the judge kept}, and on the
    built-in world's prompts, with p_h the human labeller's P(chosen ≻ rejected):
    "expected_agreement" = mean p_j·p_h + (1 − p_j)(1 − p_h), what agreement averages to when the
    rows' labels are the human labeller's draws (--make-pairs), and "human_agreement" = mean
    p_h² + (1 − p_h)², how often two human labellers agree on the same pairs: the mark to
    compare the judge with."""
    stats = {"n_pairs": len(rows), "agreement": a_chosen.double().mean().item()}
    if rows and all(is_world_prompt(r["prompt"]) for r in rows):
        p_h = torch.tensor([pair_label_prob((r["prompt"], r["chosen"], r["rejected"]))
                            for r in rows], dtype=torch.float64)
        p_j = p_judge.double()
        stats["expected_agreement"] = (p_j * p_h + (1 - p_j) * (1 - p_h)).mean().item()
        stats["human_agreement"] = (p_h ** 2 + (1 - p_h) ** 2).mean().item()
    return stats


def write_labels(cfg: RMConfig, labels: Labels, dist) -> None:
    """The pairs a judge relabelled, in OUT (rank 0), for a look or another use (DPO on AI
    labels: train_dpo.py --data OUT/prefs_ai.jsonl --val-data OUT/prefs_val_ai.jsonl)."""
    if dist.is_main:
        for name, rows in labels.files.items():
            write_jsonl(os.path.join(cfg.out, name), rows)


def label_probabilities(rows, path) -> torch.Tensor:
    """(N,) the built-in world's labeller probability P(chosen ≻ rejected) = σ((g_w − g_l)/T) of
    each row: the label's expectation, with the coin flip taken out (`--noise-free-labels`)."""
    probs = []
    for i, r in enumerate(rows):
        try:
            probs.append(pair_label_prob((r["prompt"], r["chosen"], r["rejected"])))
        except ValueError:  # a prompt from outside the world: its labeller is unknown
            raise DataError(path, f"record {i + 1}: --noise-free-labels needs the built-in "
                                  f"world's prompts, not {r['prompt']!r}") from None
    return torch.tensor(probs, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Scoring, validation, checkpoints
# ----------------------------------------------------------------------------------------------

def pair_batch(pairs, tok, device):
    """B pairs -> one right-padded batch of their N ≤ 2B distinct sequences, and for each pair
    the rows of its chosen and its rejected sequence: tokens (N, T), attn_mask (N, T),
    chosen (B,), rejected (B,). A sequence in several pairs (the k responses of one prompt make
    k(k−1)/2 pairs) is scored once, as InstructGPT batched its K-way comparisons."""
    seqs, rows = distinct_rows([c for c, _ in pairs] + [r for _, r in pairs])
    tokens, attn_mask, _ = pad_batch(seqs, [0] * len(seqs), tok.pad_id, device)
    return tokens, attn_mask, torch.tensor(rows[:len(pairs)]), torch.tensor(rows[len(pairs):])


def score_pairs(score, pairs, tok, device):
    """(r_chosen (B,), r_rejected (B,)): each reward read at the last real token (ch. 6).
    score: the reward model's `score`, or what `distributed.wrap(rm, dist, "score")` returns."""
    tokens, attn_mask, chosen, rejected = pair_batch(pairs, tok, device)
    with autocast(device):
        r = score(tokens, attn_mask).float()                                       # (N,)
    return r[chosen.to(r.device)], r[rejected.to(r.device)]


@torch.no_grad()
def evaluate_pairs(rm, pairs, tok, device, batch_size=256) -> dict:
    """L_RM, accuracy and mean margin of the reward model on pairs, and the rewards themselves
    ("r_chosen", "r_rejected", each (N,))."""
    rm.eval()
    rc, rr = [], []
    for i in range(0, len(pairs), batch_size):
        c, r = score_pairs(rm.score, pairs[i:i + batch_size], tok, device)
        rc.append(c)
        rr.append(r)
    rm.train()
    rc, rr = torch.cat(rc), torch.cat(rr)
    loss, stats = reward_loss(rc, rr)
    return {"loss": loss.item(), "accuracy": stats["accuracy"].item(),
            "margin": stats["margin"].item(), "r_chosen": rc, "r_rejected": rr}


def validate(rm, val_pairs, stats, lr, step, log, tok, cfg, dist) -> float:
    """Print and log the training batch's and the validation pairs' loss and accuracy (every
    process evaluates, rank 0 prints and writes). Returns the validation loss."""
    means = mean_over_ranks({k: v.item() for k, v in stats.items()}, dist)  # the whole batch's
    val = evaluate_pairs(rm, val_pairs, tok, dist.device, cfg.batch_size)
    print(f"step {step:5d} | loss {means['loss']:.4f} | acc {means['accuracy']:.3f} | "
          f"val loss {val['loss']:.4f} | val acc {val['accuracy']:.3f} | lr {lr:.2e}",
          flush=True)
    log.write(step, split="train", loss=means["loss"], accuracy=means["accuracy"],
              margin=means["margin"], lr=lr)
    log.write(step, split="val", loss=val["loss"], accuracy=val["accuracy"])
    return val["loss"]


def early_stopping(cfg: RMConfig, val_loss: float, best: float, bad_evals: int,
                   dist) -> tuple[float, int, bool]:
    """Count the evaluations since the best validation loss; stop after `patience` of them.
    Returns (best, bad_evals, stop), stop being rank 0's verdict so that all processes agree."""
    if val_loss < best:
        best, bad_evals = val_loss, 0
    else:
        bad_evals += 1
    if bad_evals >= cfg.patience:
        print(f"early stop: no better validation loss in {cfg.patience} evaluations")
    return best, bad_evals, broadcast(bad_evals >= cfg.patience, dist)


def save_checkpoints(cfg: RMConfig, step, rm, optimizer, tok, best, bad_evals) -> None:
    """After an evaluation: OUT/checkpoint.pt, and OUT/best.pt as well when this evaluation set
    the best validation loss (bad_evals == 0), the model that early stopping keeps."""
    extra = {"best_val_loss": best, "bad_evals": bad_evals}
    if bad_evals == 0:
        save_run(cfg, step, rm, optimizer, tok, "scalar", extra, os.path.join(cfg.out, "best.pt"))
    save_run(cfg, step, rm, optimizer, tok, "scalar", extra)


def best_model_centred(cfg: RMConfig, rm, train_pairs, prompts, policy, tok,
                       device) -> tuple[float, str]:
    """Load OUT/best.pt into rm and, with --normalize, shift its rewards so that the responses
    of the policy PPO starts from average 0: PPO then sees rewards around 0 at its start, the
    value model's targets start centred, and the KL penalty, not an offset, sets the scale of
    the per-token rewards. Pairs sampled by --make-pairs are that policy's responses, so their
    mean is used; for other pairs (written by people, or by another model) the policy answers
    up to 512 training prompts once, and the mean of those answers is used.
    Returns (the shift, what it was centred on)."""
    rm.load_state_dict(load_checkpoint(os.path.join(cfg.out, "best.pt"))["model"])
    rm.eval()
    if not cfg.normalize:
        return 0.0, "nothing (--no-normalize)"
    if cfg.make_pairs or cfg.data is None:  # the pairs are the policy's own samples
        ev = evaluate_pairs(rm, train_pairs[:2000], tok, device, cfg.batch_size)
        shift = torch.cat([ev["r_chosen"], ev["r_rejected"]]).mean().item()
        centre = f"the training pairs' responses ({min(len(train_pairs), 2000)} pairs)"
    else:
        sample_prompts = list(dict.fromkeys(prompts["train"]))[:512]
        shift = evaluate(policy, tok, sample_prompts, max_new_tokens=cfg.max_new_tokens,
                         seed=cfg.seed, reward=reward_model_scorer(rm, device))["reward"]
        centre = f"{cfg.policy or cfg.sft}'s answers to {len(sample_prompts)} training prompts"
    with torch.no_grad():
        rm.head.bias -= shift
    print(f"rewards centred on {centre}: shift {shift:+.3f}", flush=True)
    return shift, centre


def score_policy_samples(cfg: RMConfig, rm, policy, prompts, tok, device) -> dict:
    """The reward model's scores of the policy's answers (sampled and greedy) to the evaluation
    prompts (`evaluation_prompts`), with the gold judge's on world prompts: OUT/samples.jsonl."""
    eval_set, source = evaluation_prompts(cfg.eval_prompts, prompts["train"], prompts["val"],
                                          tok, policy.config.block_size - cfg.max_new_tokens,
                                          cfg.seed)
    print(f"scoring {cfg.policy or cfg.sft}'s answers to {source}", flush=True)
    samples = final_evaluation(policy, tok, eval_set, reward=reward_model_scorer(rm, device),
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                               repeats=cfg.eval_samples, out_dir=cfg.out)
    return {"eval_prompts": source, "policy_samples": samples}


def test_report(cfg: RMConfig, rm, test_rows, tok, device) -> dict:
    """Test accuracy next to the Bayes limit of the labels (built-in world only) and the
    calibration table, printed and drawn (OUT/calibration.png); returns them for eval.json."""
    ev = evaluate_pairs(rm, encode_pairs(test_rows, tok), tok, device, cfg.batch_size)
    rows = calibration_table(ev["r_chosen"], ev["r_rejected"])
    result = {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
              "n_test_pairs": len(test_rows), "calibration": rows}
    triples = [(r["prompt"], r["chosen"], r["rejected"]) for r in test_rows]
    try:
        result["bayes_accuracy"] = bayes_accuracy(triples)
        margins = (ev["r_chosen"] - ev["r_rejected"]).tolist()
        result["test_expected_accuracy"] = expected_accuracy(triples, margins)
        result["test_shortfall"] = shortfall_by_kind(triples, margins)
    except ValueError:
        pass  # pairs from outside the built-in world have no known Bayes limit
    try:
        fig = plot_calibration(rows, os.path.join(cfg.out, "calibration.png"))
    except ImportError:  # plotting is optional
        fig = None
    bayes = result.get("bayes_accuracy")
    print(f"test pairs: accuracy {ev['accuracy']:.3f}"
          + (f" (expected over the labels' noise {result['test_expected_accuracy']:.3f})"
             f" | Bayes limit {bayes:.3f}" if bayes is not None else "")
          + f" | loss {ev['loss']:.4f}")
    if "test_shortfall" in result:
        print("points under the Bayes limit, by kind of test pair: " + ", ".join(
            f"{kind} {v['points_lost']:.2f}" for kind, v in result["test_shortfall"].items()))
    print("calibration:  bin       n   predicted  observed")
    for r in rows:
        print(f"              {r['bin']}  {r['n']:4d}   {r['predicted']:.3f}      "
              f"{r['observed']:.3f}")
    if fig:
        print(f"figure: {fig}")
    return result


def calibration_table(r_chosen, r_rejected, n_bins: int = 10) -> list[dict]:
    """Reliability of the reward model as a preference predictor: each pair is seen in both
    orders (a, b) with predicted P(a ≻ b) = σ(r_a − r_b) and outcome 1 if a was chosen, so the
    table is symmetric and every bin compares a mean prediction with an observed rate."""
    p = torch.sigmoid(r_chosen - r_rejected)
    pred = torch.cat([p, 1 - p])
    outcome = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    rows = []
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = (pred >= lo) & ((pred < hi) if b < n_bins - 1 else (pred <= hi))
        if sel.any():
            rows.append({"bin": f"{lo:.1f}-{hi:.1f}", "n": int(sel.sum()),
                         "predicted": pred[sel].mean().item(),
                         "observed": outcome[sel].mean().item()})
    return rows


def main(argv=None):
    prog = "train_rm.py"
    cfg = parse_config(RMConfig, argv, prog, description=__doc__.split("\n\n")[0])
    try:
        train(cfg, prog)
    except (DataError, CheckpointError, TokenizerError, NonFiniteError, PairsError,
            OSError) as e:  # OSError: a full disk, a read-only folder
        fail(prog, str(e))


if __name__ == "__main__":
    main()
