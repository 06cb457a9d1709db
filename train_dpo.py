"""Direct Preference Optimization (DPO): learn from preference pairs with no reward model and no
sampling during training (lecture ch. 8; CS224N notes, "Removing the RL from RLHF").

    python train_dpo.py --sft out/sft --data out/rm/prefs.jsonl    # the pipeline's pairs
    python train_dpo.py --rpo-alpha 0 --beta 1                      # plain DPO
    python train_dpo.py --loss-type ipo                             # IPO's squared loss
    python train_dpo.py --label-smoothing 0.1                       # conservative DPO
    python train_dpo.py --rounds 3                                  # online DPO: 2 more rounds
    python train_dpo.py --rounds 3 --labeller ai:out/rm             # ... labelled by a judge
    python train_dpo.py --resume                                    # continue a stopped run
    torchrun --standalone --nproc_per_node 4 train_dpo.py           # 4 GPUs (data parallel)

The policy's own log-ratio β·log π_θ/π_ref plays the reward in the Bradley–Terry loss of the
reward model (train_rm.py), so preference data trains the policy directly. The reference is
frozen, so its log-probs are computed once before training; each step is then one policy forward
over the chosen and rejected responses, batched together. Batches hold whole groups of pairs (a
prompt's k responses make k(k−1)/2 pairs) and run each distinct response once, as train_rm.py does.

By default the loss also carries the chosen responses' language-model loss, α·NLL(y_w) (RPO,
Pang et al. 2024; `--rpo-alpha 0` is plain DPO): the chosen answers then hold their probability
while the rejected ones are pushed down, so a smaller β can act without the probability mass
going to garbled text (plain DPO against RPO: docs/results.md, "DPO").

Offline DPO never sees its own answers: the pairs were written by the SFT model, and the
policy's mistakes that no pair shows go uncorrected ("no iterative improvement", lecture ch. 8).
Online (iterative) DPO, --rounds R: after the first round on --data, each round samples new
pairs from the policy as it is then, has them labelled (the world's labeller, or a reward
model as judge: --labeller ai:DIR, which works on any prompts), and trains on them, with π_ref
the SFT model or (--reference previous) the round's starting policy.

Writes OUT/checkpoint.pt, OUT/metrics.jsonl and OUT/eval.json (implicit-reward accuracy on test
pairs; gold score, accuracy and KL to the SFT model on the test prompts); online, each round's
pairs with π_ref's log-probs in OUT/round_<r>.jsonl.

Left out on purpose: the many other DPO variants (one flag each would hide the idea), length
normalisation.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlhf.checkpoint import CheckpointError, load_stage
from minirlhf.config import check_ranges, parse_config
from minirlhf.data import DataError, hold_out, read_prefs, write_jsonl
from minirlhf.device import autocast, maybe_compile
from minirlhf.distributed import all_reduce_sum, mean_over_ranks, wrap
from minirlhf.evaluate import evaluation_prompts, final_evaluation, stage_scorer
from minirlhf.masking import masked_sum, token_logprobs
from minirlhf.tokenizer import TokenizerError
from minirlhf.training import (NonFiniteError, checkpoint_to_resume, distinct_rows, due, fail,
                               guarded_run, lr_at, make_optimizer, open_log, optimizer_step,
                               pad_batch, pair_batches_from, pair_groups, progress_bar,
                               read_metrics, resume_state, save_run, set_lr, shown, start_run,
                               write_json)
from minirlhf.world import correct, gold_reward, is_world_prompt, label_pair
from train_rm import load_judge, make_pairs, relabel_with_judge


def dpo_loss(policy_chosen_logp: torch.Tensor, policy_rejected_logp: torch.Tensor,
             ref_chosen_logp: torch.Tensor, ref_rejected_logp: torch.Tensor, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid", rpo_alpha: float = 0.0,
             chosen_tokens: torch.Tensor | None = None,
             nll_norm: float | None = None) -> tuple[torch.Tensor, dict]:
    """DPO loss (Rafailov et al. 2023, eq. 7), derived as in the CS224N notes:

    (1) The KL-penalised objective  max_π E_{y~π}[r(x,y)] − β·KL(π‖π_ref)  (lecture ch. 5) has
        the closed-form optimum  π*(y|x) = π_ref(y|x)·exp(r(x,y)/β) / Z(x)  (DPO paper eq. 4).
    (2) Taking logs and solving for the reward:  r(x,y) = β·log π*(y|x)/π_ref(y|x) + β·log Z(x)
        (eq. 5).
    (3) Bradley–Terry only sees reward differences, P(y_w ≻ y_l) = σ(r(y_w) − r(y_l))
        (lecture ch. 6), so β·log Z(x) cancels: the preference probability is written with the
        policy alone (eq. 6), and its negative log-likelihood is the loss (eq. 7)
            L_DPO = −E log σ(β·log π_θ(y_w)/π_ref(y_w) − β·log π_θ(y_l)/π_ref(y_l)).

    policy_chosen_logp, policy_rejected_logp: (B,) log π_θ(y|x), summed over response tokens
    ref_chosen_logp, ref_rejected_logp:       (B,) log π_ref(y|x), summed likewise (no grad)
    beta: β, the KL strength of (1); small β lets π_θ move far from π_ref
    label_smoothing: ε of "conservative DPO": a label is assumed flipped with probability ε,
        loss = −(1−ε)·log σ(β·m) − ε·log σ(−β·m)   (sigmoid loss only)
    loss_type: "sigmoid" (DPO) or "ipo" (Azar et al. 2023): (m − 1/(2β))², which pulls the
        margin to a finite value instead of pushing it to infinity on separable data. Its
        log-ratios are sums over the response's tokens, as DPO's are: the IPO paper's h is built
        from sequence log-likelihoods log π(y|x), a sum over tokens, and summing keeps IPO and
        DPO on one log-ratio scale, so --beta means the same for both loss types. TRL averages
        IPO's log-ratios over the completion's tokens instead, which makes its β independent
        of length: a β is not comparable between the two.
    rpo_alpha: α of RPO (Pang et al. 2024): adds α·NLL(y_w), the chosen responses' negative
        log-likelihood as a token mean over the batch (train_sft.py's loss on the chosen
        responses), so that pushing y_l down cannot drag y_w down with it
    chosen_tokens: (B,) response tokens of each y_w (needed when rpo_alpha > 0; given, the NLL
        is measured, and reported in stats, also when α = 0)
    nll_norm: what the NLL's sum is divided by, default chosen_tokens.sum(); under torchrun the
        whole batch's count over the number of processes, so that averaging the processes'
        gradients gives the whole batch's token mean
    returns loss (scalar), stats {"loss", "dpo_loss", "chosen_reward", "rejected_reward",
        "accuracy", "margin", "nll"}: the loss, its DPO term alone (loss = dpo_loss + α·nll),
        batch means of the implicit rewards β·log π_θ/π_ref of (2) without β·log Z, the
        fraction of pairs with chosen reward > rejected reward, their difference β·m, and the
        per-token NLL of y_w (0 without chosen_tokens).

    Here m = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)).
    """
    chosen_logratio = policy_chosen_logp - ref_chosen_logp  # (B,) log π_θ(y_w)/π_ref(y_w)
    rejected_logratio = policy_rejected_logp - ref_rejected_logp  # (B,) log π_θ(y_l)/π_ref(y_l)
    margin = chosen_logratio - rejected_logratio  # (B,) m
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)  # L_DPO, eq. 7 / CS224N
                  - label_smoothing * F.logsigmoid(-beta * margin))  # (B,)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to loss_type='sigmoid' only")
        losses = (margin - 1 / (2 * beta)) ** 2  # (B,) IPO, Azar et al. 2023
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected 'sigmoid' or 'ipo'")
    loss = dpo_term = losses.mean()
    nll = loss.new_zeros(())
    if rpo_alpha and chosen_tokens is None:
        raise ValueError("rpo_alpha needs chosen_tokens, the length of each chosen response")
    if chosen_tokens is not None:
        norm = chosen_tokens.sum() if nll_norm is None else nll_norm
        nll = -policy_chosen_logp.sum() / norm  # NLL(y_w), a token mean as in SFT
    if rpo_alpha:
        loss = loss + rpo_alpha * nll  # L_RPO = L_DPO + α·NLL(y_w), Pang et al. 2024
    with torch.no_grad():
        chosen_reward = beta * chosen_logratio  # (B,) r̂(y_w) = β log π_θ/π_ref, step (2) / eq. 5
        rejected_reward = beta * rejected_logratio  # (B,) r̂(y_l)
        stats = {
            "loss": loss.detach(),
            "dpo_loss": dpo_term.detach(),
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "accuracy": (chosen_reward > rejected_reward).float().mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
            "nll": nll.detach(),
        }
    return loss, stats


def dpo_loss_single_ratio(policy_chosen_logp: torch.Tensor, policy_rejected_logp: torch.Tensor,
                          ref_chosen_logp: torch.Tensor, ref_rejected_logp: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """The second form of L_DPO in the CS224N notes, with one ratio inside the log:

        L_DPO = −E log σ(β·log [π_θ(y_w)·π_ref(y_l)] / [π_θ(y_l)·π_ref(y_w)])

    Same inputs as `dpo_loss` (all (B,)); returns the scalar loss only. It equals
    `dpo_loss(..., loss_type="sigmoid")` (tested), and is kept to show the two forms agree.
    """
    log_numerator = policy_chosen_logp + ref_rejected_logp  # (B,) log π_θ(y_w)·π_ref(y_l)
    log_denominator = policy_rejected_logp + ref_chosen_logp  # (B,) log π_θ(y_l)·π_ref(y_w)
    return -F.logsigmoid(beta * (log_numerator - log_denominator)).mean()  # CS224N notes, form 2


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

@dataclass
class DPOConfig:
    out: str = "out/dpo"              # folder for checkpoint.pt, metrics.jsonl, eval.json
    sft: str = "out/sft"              # SFT stage (or gpt2:DIR): the initial policy and frozen π_ref
    data: str = "out/rm/prefs.jsonl"  # preference JSONL (prompt/chosen/rejected, or HH)
    val_data: str | None = None       # validation pairs (default: prefs_val.jsonl beside --data)
    test_data: str | None = None      # test pairs (default: prefs_test.jsonl beside --data)
    resume: bool = False              # continue OUT/checkpoint.pt where a stopped run left off
    overwrite: bool = False           # start over in a used --out: its run files are replaced
    verbose: bool = False             # print the whole config at start
    seed: int = 0                     # seeds data order and evaluation sampling
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if there is one
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA and bf16-native CPUs
    compile: bool = False             # torch.compile the policy (CUDA only)
    # objective: β = 0.3 with α = 2 at lr 4e-4 closes 44% of the gap; docs/results.md, "DPO"
    beta: float = 0.3                 # β: strength of the KL anchor implied by the loss
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid = DPO, ipo = squared loss
                                                      # toward 1/(2β)
    label_smoothing: float = 0.0      # ε of conservative DPO (labels flipped with prob. ε)
    rpo_alpha: float = 2.0            # α: weight of the chosen responses' per-token NLL (RPO);
                                      # 0 = plain DPO
    # optimisation
    max_steps: int = 600              # optimizer steps (~0.8 epoch of 48000 pairs)
    batch_size: int = 64              # pairs per step
    lr: float = 4e-4                  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1         # cosine decays to lr * this
    warmup: int = 20                  # linear warmup steps
    weight_decay: float = 0.0         # AdamW weight decay (0: the KL anchor is the regulariser)
    grad_clip: float = 1.0            # max global gradient norm
    eval_every: int = 50              # steps between validation implicit-reward accuracy
    ckpt_every: int = 50              # steps between checkpoints (and at the end)
    max_new_tokens: int = 48          # response budget for the final evaluation
    eval_prompts: str | None = None   # prompts JSONL for the final evaluation; none = the world's
                                      # test prompts (world pairs) or the validation pairs' prompts
    eval_samples: int = 16            # samples per evaluation prompt (plus one greedy)
    rm: str | None = None             # a reward model stage: score the evaluation samples with it
    # online DPO: 4 rounds close 64% of the gap (offline: 44%); docs/results.md, "Online DPO"
    rounds: int = 1                   # rounds of DPO: the first on --data, each later one on
                                      # pairs the policy of the time writes, labelled (online DPO)
    round_steps: int = 150            # optimizer steps of each round after the first
    round_pairs: int = 4000           # pairs sampled and labelled per round after the first
    round_samples: int = 4            # responses per prompt in a round (k(k-1)/2 pairs each)
    labeller: str = "world"           # who labels a round's pairs: world (the built-in world's
                                      # labeller) or ai:DIR, the reward-model stage in DIR as judge
    reference: Literal["sft", "previous"] = "previous"  # π_ref of a later round: the SFT
                                                        # model, or the policy that wrote the
                                                        # round's pairs

    def check(self):
        check_ranges(self, positive=("max_steps", "batch_size", "eval_every", "ckpt_every",
                                     "max_new_tokens", "grad_clip", "eval_samples"),
                     non_negative=("warmup", "weight_decay", "rpo_alpha"))
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--min-lr-ratio must be in [0, 1]")
        if self.beta <= 0 or self.lr <= 0:
            raise ValueError("--beta and --lr must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("--label-smoothing must be in [0, 0.5)")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("--label-smoothing applies to the sigmoid loss, not to ipo")
        check_ranges(self, positive=("rounds", "round_steps", "round_pairs"))
        if self.round_samples < 2:
            raise ValueError("--round-samples must be at least 2: a pair needs two responses")
        if self.labeller == "ai:":
            raise ValueError("--labeller ai: names no folder: ai:DIR, DIR a reward-model stage")
        if self.labeller != "world" and not self.judge_dir():
            raise ValueError(f"--labeller {shown(self.labeller)}: world, or ai:DIR with DIR a "
                             f"reward-model stage folder")
        if self.judge_dir() and self.rounds == 1:
            raise ValueError("--labeller labels the pairs of online DPO's later rounds: it "
                             "needs --rounds of at least 2")

    def judge_dir(self) -> str | None:
        """DIR of --labeller ai:DIR (the judge's stage folder); None for the world's labeller."""
        return (self.labeller[3:] or None) if self.labeller.startswith("ai:") else None

    def inner_paths(self) -> dict:
        """--labeller ai:DIR's judge, a stage folder (`training.check_paths`), when a round
        needs it."""
        judged = self.judge_dir() and self.rounds > 1
        return {"labeller": (self.judge_dir(), "stage")} if judged else {}

    @property
    def total_steps(self) -> int:
        return self.max_steps + (self.rounds - 1) * self.round_steps


@guarded_run  # OUT is this run's until train() ends (minirlhf/training.py)
def train(cfg: DPOConfig, prog: str = "train_dpo.py") -> dict:
    """π_θ and the frozen π_ref (both start as the SFT model), the pairs and π_ref's log-probs of
    them, computed once; then per step: a batch of pairs, one policy forward, L_DPO, backward, an
    optimizer step, and on schedule validation and a checkpoint; then the final evaluation.
    With --rounds R > 1 (online DPO), rounds 2..R each first sample new pairs from the policy
    as it is then and have them labelled (`round_pairs`), then run the same loop on them."""
    dist = start_run(cfg, prog)  # one process, or one of torchrun's (minirlhf/distributed.py)
    device = dist.device
    ck = checkpoint_to_resume(cfg)  # OUT/checkpoint.pt with --resume, else None

    # --- the policy, the frozen reference and its log-probs of every pair (lecture ch. 8) ---
    policy, tok, _ = load_stage(cfg.sft, "gpt", device)   # π_θ, starts at the SFT model
    ref, _, _ = load_stage(cfg.sft, "gpt", device)        # π_ref, frozen
    ref.eval().requires_grad_(False)
    train_pairs, val_pairs, test_pairs, prompts = load_pairs(cfg, tok, policy.config.block_size)
    label = round_labeller(cfg, tok, prompts["train"], policy.config.block_size, device)
    t_ref = time.time()
    ref_train = precompute_reference(ref, train_pairs, tok, device, cfg.batch_size)  # (N, 2)
    ref_val = precompute_reference(ref, val_pairs, tok, device, cfg.batch_size)
    print(f"{len(train_pairs)} training pairs, {len(val_pairs)} validation pairs; reference "
          f"log-probs precomputed in {time.time() - t_ref:.1f}s", flush=True)
    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    start = resume_state(cfg, ck, optimizer, policy, tok)  # the checkpoint's step; None: fresh
    fwd = maybe_compile(policy, device, cfg.compile)
    train_fwd = wrap(fwd, dist)  # under torchrun DDP: backward averages gradients over processes
    log = open_log(cfg, start, dist)  # OUT/metrics.jsonl (and config.json)
    step = start or 0

    # --- round 1 trains on --data; each later round on pairs the policy writes (online DPO) ---
    t0 = time.time()
    bar = progress_bar(cfg.total_steps, step, "dpo", dist)
    for rnd in range(round_at(step, cfg), cfg.rounds + 1):
        first, last = round_span(rnd, cfg)
        pairs, ref_logp = train_pairs, ref_train
        if rnd > 1:  # new pairs from the policy as it is now, π_ref's log-probs of them
            pairs, ref_logp = round_pairs(cfg, rnd, policy, ref, tok, prompts["train"], label,
                                          log, dist)
            if step == first:  # each round is a DPO run of its own: a fresh optimizer
                optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
        policy.train()
        batches = pair_batches_from(step - first, pairs, cfg.seed + rnd - 1, cfg.batch_size,
                                    dist)
        while step < last:
            lr = lr_at(step - first, last - first, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
            stats = dpo_step(train_fwd, policy, optimizer, pairs, ref_logp, next(batches), lr,
                             step, tok, cfg, dist)
            step += 1
            bar.update(1)
            if due(step, cfg.eval_every, last):  # every process; rank 0 prints and writes
                validate(policy, val_pairs, ref_val, stats, lr, step, log, tok, cfg, dist)
            if dist.is_main and due(step, cfg.ckpt_every, last):
                save_run(cfg, step, policy, optimizer, tok)
    bar.close()
    result = {"train_seconds": time.time() - t0, "steps": step}
    if not dist.is_main:  # rank 0 evaluates and writes eval.json
        return result
    if cfg.rounds > 1:  # what each later round's pairs were: their size, their answers' gold
        result["rounds"] = [r for r in read_metrics(os.path.join(cfg.out, "metrics.jsonl"))
                            if r["split"] == "round"]

    # --- evaluation: implicit-reward accuracy on test pairs; gold score and KL to SFT ---
    result.update(test_evaluation(cfg, policy, ref, test_pairs, prompts, tok, device))
    write_json(os.path.join(cfg.out, "eval.json"), result)
    return result


def dpo_step(train_fwd, policy, optimizer, pairs, ref_logp, idx, lr, step, tok, cfg, dist):
    """One optimizer step on the batch idx of pairs: one policy forward on chosen + rejected,
    the DPO loss against π_ref's precomputed log-probs, backward, step. Returns the stats."""
    set_lr(optimizer, lr)
    batch = [pairs[i] for i in idx]  # this process's share of the batch's pairs
    chosen_logp, rejected_logp = response_logprobs(train_fwd, batch, tok, dist.device)  # log π_θ
    ref_chosen, ref_rejected = ref_logp[idx].to(dist.device).unbind(1)                 # log π_ref
    chosen_tokens, nll_norm = chosen_lengths(batch, dist.device, dist)  # RPO's NLL: a token mean
    loss, stats = dpo_loss(chosen_logp, rejected_logp, ref_chosen, ref_rejected, cfg.beta,
                           cfg.label_smoothing, cfg.loss_type, cfg.rpo_alpha, chosen_tokens,
                           nll_norm)
    loss.backward()
    optimizer_step(optimizer, policy, cfg.grad_clip, step + 1, loss)
    return stats


# ----------------------------------------------------------------------------------------------
# The phases of train(), in the order it calls them
# ----------------------------------------------------------------------------------------------

def load_pairs(cfg: DPOConfig, tok, block_size: int):
    """(train, val, test) lists of pairs (chosen ids, rejected ids, n_prompt), and the prompts of
    the training and validation pairs. Validation and test pairs default to prefs_val.jsonl and
    prefs_test.jsonl beside --data; without validation pairs, the pairs of 5% of the prompts
    are held out (`hold_out`); without test pairs test is None."""
    if not os.path.exists(cfg.data):
        raise DataError(cfg.data, "preference file not found (make it with train_rm.py "
                                  "--make-pairs)")
    train_rows = read_prefs(cfg.data, tok, block_size)
    val_path = cfg.val_data or sibling(cfg.data, "prefs_val.jsonl")
    test_path = cfg.test_data or sibling(cfg.data, "prefs_test.jsonl")
    if os.path.exists(val_path):
        val_rows = read_prefs(val_path, tok, block_size)
    else:
        train_rows, val_rows = hold_out(train_rows, cfg.seed)
    test_pairs = None
    if os.path.exists(test_path):
        test_pairs = encode_pairs(read_prefs(test_path, tok, block_size), tok)
    prompts = {"train": [r["prompt"] for r in train_rows], "val": [r["prompt"] for r in val_rows]}
    return encode_pairs(train_rows, tok), encode_pairs(val_rows, tok), test_pairs, prompts


# Online DPO (--rounds): which steps belong to which round, who labels, and a round's pairs.

def round_span(rnd: int, cfg: DPOConfig) -> tuple[int, int]:
    """(first, last) global steps of round rnd: it trains steps first + 1 .. last. Round 1 is
    --max-steps long (with one round: today's offline DPO, step for step), later ones
    --round-steps."""
    if rnd == 1:
        return 0, cfg.max_steps
    first = cfg.max_steps + (rnd - 2) * cfg.round_steps
    return first, first + cfg.round_steps


def round_at(step: int, cfg: DPOConfig) -> int:
    """The round that trains the step after `step` (rounds + 1 once the run is done)."""
    if step < cfg.max_steps:
        return 1
    return min(cfg.rounds + 1, 2 + (step - cfg.max_steps) // cfg.round_steps)


def round_labeller(cfg: DPOConfig, tok, train_prompts: list[str], block_size: int, device):
    """labels(rows, seed) -> rows for online DPO's rounds (None with one round): each row's
    (chosen, rejected) = the pair as sampled, relabelled by the built-in world's labeller
    (Bradley–Terry on the gold score, as the --data pairs were) or by a reward-model judge
    (--labeller ai:DIR, RLAIF: σ(r_a − r_b), as train_rm.py's)."""
    if cfg.rounds == 1:
        return None
    if cfg.judge_dir() is None:
        if not all(is_world_prompt(p) for p in train_prompts):
            raise DataError(cfg.data, "--labeller world labels the built-in world's prompts "
                                      "only: give these prompts a judge, --labeller ai:DIR")

        def world_labels(rows, seed):
            rng = np.random.default_rng(seed)
            labelled = []
            for r in rows:
                chosen, rejected = label_pair(r["prompt"], r["chosen"], r["rejected"], rng)
                labelled.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
            return labelled
        return world_labels
    judge = load_judge(cfg, tok, block_size, device)
    return lambda rows, seed: relabel_with_judge(judge, tok, rows, device, seed)[0]


def round_pairs(cfg: DPOConfig, rnd: int, policy, ref, tok, train_prompts: list[str], labels,
                log, dist):
    """Round rnd's pairs (chosen ids, rejected ids, n_prompt) and π_ref's log-probs of them
    (N, 2): --round-pairs pairs from --round-samples responses per training prompt, written by
    the policy as it is now at temperature 1, then labelled (`round_labeller`); π_ref is the
    SFT model or (--reference previous) this round's starting policy. Saved with the log-probs
    as OUT/round_<rnd>.jsonl, so that --resume trains on the same pairs without the policy that
    wrote them; read back from there when it exists."""
    path = os.path.join(cfg.out, f"round_{rnd}.jsonl")
    if os.path.exists(path):
        return read_round(path, tok)
    t0, seed = time.time(), cfg.seed + 1000 * rnd
    policy.eval()
    distinct = list(dict.fromkeys(train_prompts))
    rows = make_pairs(policy, tok, distinct, cfg.round_pairs, seed, 1.0, cfg.max_new_tokens,
                      cfg.round_samples, label=lambda p, a, b, rng: (a, b))  # unlabelled
    rows = labels(rows, seed)
    pairs = encode_pairs(rows, tok)
    fits = [max(len(c), len(r)) <= policy.config.block_size for c, r, _ in pairs]
    rows = [r for r, ok in zip(rows, fits) if ok]  # a re-encoded response may run longer
    pairs = [p for p, ok in zip(pairs, fits) if ok]
    reference = policy if cfg.reference == "previous" else ref
    ref_logp = precompute_reference(reference, pairs, tok, dist.device, cfg.batch_size)
    if dist.is_main:
        write_jsonl(path, [{**r, "ref_chosen_logp": c, "ref_rejected_logp": j}
                           for r, (c, j) in zip(rows, ref_logp.tolist())])
    info = round_info(rows)
    first = round_span(rnd, cfg)[0]
    log.write(first, split="round", round=rnd, pairs=len(rows), seconds=time.time() - t0,
              **info)
    print(f"round {rnd}: {len(rows)} pairs from the policy at step {first}, labelled in "
          f"{time.time() - t0:.1f}s" + "".join(f" | {k} {v:.3f}" for k, v in info.items()),
          flush=True)
    return pairs, ref_logp


def round_info(rows: list[dict]) -> dict:
    """On the built-in world: the gold score and accuracy of the round's distinct responses,
    the policy's own as it wrote them (nothing on other prompts)."""
    answers = {(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")}
    if not answers or not all(is_world_prompt(p) for p, _ in answers):
        return {}
    return {"sample_gold": float(np.mean([gold_reward(p, a) for p, a in answers])),
            "sample_accuracy": float(np.mean([correct(p, a) for p, a in answers]))}


def read_round(path: str, tok):
    """A round's pairs and π_ref's log-probs, as `round_pairs` saved them."""
    rows, logp = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                logp.append([float(r["ref_chosen_logp"]), float(r["ref_rejected_logp"])])
                rows.append({k: str(r[k]) for k in ("prompt", "chosen", "rejected")})
            except (ValueError, KeyError, TypeError):
                raise DataError(path, f"line {lineno}: not a row of online DPO's pairs (delete "
                                      f"the file to sample the round again)") from None
    return encode_pairs(rows, tok), torch.tensor(logp, dtype=torch.float32)


def sibling(path: str, name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), name)


def encode_pairs(rows, tok):
    """Each pair -> (chosen ids, rejected ids, n_prompt)."""
    out = []
    for r in rows:
        c, n_prompt = tok.render(r["prompt"], r["chosen"])
        rj, _ = tok.render(r["prompt"], r["rejected"])
        out.append((c, rj, n_prompt))
    return out


def response_logprobs(model, pairs, tok, device):
    """Summed log π(y|x) over the response tokens (end token included) of chosen and rejected,
    in one forward pass over the pairs' N ≤ 2B distinct sequences (the k responses of one prompt
    make k(k−1)/2 pairs; each is run once). Returns (chosen (B,), rejected (B,))."""
    seqs, rows = distinct_rows([(c, n) for c, _, n in pairs] + [(r, n) for _, r, n in pairs])
    tokens, attn_mask, loss_mask = pad_batch([s for s, _ in seqs], [n for _, n in seqs],
                                             tok.pad_id, device)                     # (N, T)
    with autocast(device):
        logits = model(tokens, attn_mask)[:, :-1]                                    # (N, T-1, V)
    logp = token_logprobs(logits.float(), tokens[:, 1:])                              # (N, T-1)
    summed = masked_sum(logp, loss_mask[:, 1:], dim=-1)                     # (N,) log π(y|x)
    rows = torch.tensor(rows, device=summed.device)
    return summed[rows[:len(pairs)]], summed[rows[len(pairs):]]


@torch.no_grad()
def precompute_reference(ref, pairs, tok, device, batch_size=256) -> torch.Tensor:
    """log π_ref(y_w|x), log π_ref(y_l|x) for every pair: (N, 2). The reference is frozen, so
    these numbers never change — computing them once halves the cost of every step. Batches of
    whole groups (`pair_groups`), so a response shared by several pairs is run once, taken in
    order of length, so a batch is padded to about its own rows' length."""
    result = torch.empty(len(pairs), 2)
    chunk: list[int] = []
    groups = sorted(pair_groups(pairs), key=lambda g: max(len(pairs[i][0]) + len(pairs[i][1])
                                                          for i in g))
    bar = tqdm(total=len(pairs), desc="reference log-probs", leave=False, disable=None)
    for j, g in enumerate(groups):
        chunk += g
        if len(chunk) >= batch_size or j == len(groups) - 1:
            c, r = response_logprobs(ref, [pairs[i] for i in chunk], tok, device)
            result[chunk] = torch.stack([c, r], dim=1).float().cpu()
            bar.update(len(chunk))
            chunk = []
    bar.close()
    return result


def chosen_lengths(pairs, device, dist) -> tuple[torch.Tensor, float]:
    """|y_w| of each pair's chosen response, end token included, (B,); and what RPO's NLL sum is
    divided by: the whole batch's count over the number of processes (`dpo_loss`'s nll_norm)."""
    lengths_w = [len(c) - n_prompt for c, _, n_prompt in pairs]
    nll_norm = all_reduce_sum(sum(lengths_w), dist) / dist.world_size  # the whole batch's mean
    return torch.tensor(lengths_w, device=device), nll_norm


@torch.no_grad()
def evaluate_pairs(policy, pairs, ref_logp, tok, cfg, device, batch_size=256) -> dict:
    """The loss on held-out pairs as training takes it, and its parts: "loss" = "dpo_loss" +
    α·"rpo_nll" (the DPO term a mean over pairs, the chosen responses' NLL a mean over all their
    tokens), and the implicit-reward "accuracy" and "margin"."""
    policy.eval()
    dpo, accs, margins, nll_sum, n_tokens = 0.0, 0.0, 0.0, 0.0, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        c, r = response_logprobs(policy, chunk, tok, device)
        ref_c, ref_r = ref_logp[i:i + batch_size].to(device).unbind(1)
        _, stats = dpo_loss(c, r, ref_c, ref_r, cfg.beta, cfg.label_smoothing, cfg.loss_type)
        dpo += stats["dpo_loss"].item() * len(chunk)
        accs += stats["accuracy"].item() * len(chunk)
        margins += stats["margin"].item() * len(chunk)
        nll_sum -= c.sum().item()  # −Σ log π_θ(y_w|x): RPO's NLL before its token mean
        n_tokens += sum(len(w) - n_prompt for w, _, n_prompt in chunk)
    policy.train()
    dpo, nll = dpo / len(pairs), nll_sum / n_tokens
    return {"loss": dpo + cfg.rpo_alpha * nll, "dpo_loss": dpo, "rpo_nll": nll,
            "accuracy": accs / len(pairs), "margin": margins / len(pairs)}


def validate(policy, val_pairs, ref_val, stats, lr, step, log, tok, cfg, dist) -> None:
    """Print and log the training batch's loss, its parts and implicit rewards, and the same on
    the validation pairs (every process evaluates, rank 0 prints and writes). "loss" is the
    total, dpo_loss + α·rpo_nll, in both rows."""
    means = mean_over_ranks({k: v.item() for k, v in stats.items()}, dist)  # the whole batch's
    val = evaluate_pairs(policy, val_pairs, ref_val, tok, cfg, dist.device, cfg.batch_size)
    print(f"step {step:5d} | {loss_parts(means['loss'], means['dpo_loss'], means['nll'], cfg)} | "
          f"implicit acc {means['accuracy']:.3f} | margin {means['margin']:+.3f} | "
          f"chosen {means['chosen_reward']:+.3f} | rejected {means['rejected_reward']:+.3f} | "
          f"val {loss_parts(val['loss'], val['dpo_loss'], val['rpo_nll'], cfg)} | "
          f"val acc {val['accuracy']:.3f} | lr {lr:.2e}", flush=True)
    log.write(step, split="train", loss=means["loss"], dpo_loss=means["dpo_loss"],
              rpo_nll=means["nll"], accuracy=means["accuracy"], margin=means["margin"],
              chosen_reward=means["chosen_reward"], rejected_reward=means["rejected_reward"],
              lr=lr)
    log.write(step, split="val", **val)


def loss_parts(loss: float, dpo: float, nll: float, cfg: DPOConfig) -> str:
    """'loss 7.4812 = dpo 0.6931 + 2·nll 3.3941', the total and its two terms."""
    return f"loss {loss:.4f} = dpo {dpo:.4f} + {cfg.rpo_alpha:g}·nll {nll:.4f}"


def test_evaluation(cfg: DPOConfig, policy, ref, test_pairs, prompts, tok, device) -> dict:
    """Implicit-reward accuracy on the test pairs, and the policy's answers to the evaluation
    prompts (`evaluation_prompts`) sampled and greedy, with their KL to the SFT model, the gold
    judge's score on world prompts and --rm's reward; the answers go to OUT/samples.jsonl."""
    result = {}
    if test_pairs:
        ref_test = precompute_reference(ref, test_pairs, tok, device, cfg.batch_size)
        result["test_pairs"] = evaluate_pairs(policy, test_pairs, ref_test, tok, cfg, device,
                                              cfg.batch_size)
        print(f"test pairs: implicit-reward accuracy {result['test_pairs']['accuracy']:.3f}")
    eval_set, source = evaluation_prompts(cfg.eval_prompts, prompts["train"], prompts["val"], tok,
                                          policy.config.block_size - cfg.max_new_tokens, cfg.seed)
    print(f"final evaluation on {source}", flush=True)
    reward = stage_scorer(cfg.rm, tok, device) if cfg.rm else None
    result["eval_prompts"] = source
    result.update(final_evaluation(policy, tok, eval_set, ref=ref, reward=reward,
                                   max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                   repeats=cfg.eval_samples, out_dir=cfg.out))
    return result


def main(argv=None):
    prog = "train_dpo.py"
    cfg = parse_config(DPOConfig, argv, prog, description=__doc__.split("\n\n")[0])
    try:
        train(cfg, prog)
    except (DataError, CheckpointError, TokenizerError, NonFiniteError,
            OSError) as e:  # OSError: a full disk, a read-only folder
        fail(prog, str(e))


if __name__ == "__main__":
    main()
