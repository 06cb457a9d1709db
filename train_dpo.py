"""Direct Preference Optimization (DPO): learn from preference pairs with no reward model and no
sampling during training (lecture ch. 8; CS224N notes, "Removing the RL from RLHF").

    python train_dpo.py --sft out/sft --data out/rm/prefs.jsonl    # ~1.5 min on 2 CPU cores
    python train_dpo.py --rpo-alpha 0 --beta 1                      # plain DPO
    python train_dpo.py --loss-type ipo                             # IPO's squared loss
    python train_dpo.py --label-smoothing 0.1                       # conservative DPO
    python train_dpo.py --resume                                    # continue a stopped run
    torchrun --standalone --nproc_per_node 4 train_dpo.py           # 4 GPUs (data parallel)

The policy's own log-ratio β·log π_θ/π_ref plays the reward in the Bradley–Terry loss of the
reward model (train_rm.py), so preference data trains the policy directly. The reference is
frozen, so its log-probs are computed once before training; each step is then one policy forward
over the chosen and rejected responses, batched together. Batches hold whole groups of pairs (a
prompt's k responses make k(k−1)/2 pairs) and run each distinct response once, as train_rm.py does.

By default the loss also carries the chosen responses' language-model loss, α·NLL(y_w) (RPO,
Pang et al. 2024; `--rpo-alpha 0` is plain DPO). Measured on the built-in world (same SFT model
and 48000 pairs, 600 steps; gap = share of the SFT → optimum gold gap closed): plain DPO is best
at β = 1 (34%); at β = 0.5 it pushes the rejected answers down so hard that the mass goes to
garbled text (gold below SFT's, KL 4.7 nats). With α = 2 the chosen answers hold their
probability and a smaller β can act: β = 0.3 closes 41% at learning rate 2e-4 and 44% at 4e-4.

Writes OUT/checkpoint.pt, OUT/metrics.jsonl and OUT/eval.json (implicit-reward accuracy on test
pairs; gold score, accuracy and KL to the SFT model on the test prompts).

Left out on purpose: the many other DPO variants (one flag each would hide the idea), online
or iterative DPO, length normalisation.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from minirlhf.checkpoint import (CHECKPOINT, CheckpointError, check_compatible, load_checkpoint,
                                 load_stage, rng_state, save_stage, set_rng_state)
from minirlhf.config import check_ranges, parse_config
from minirlhf.data import DataError, read_prefs
from minirlhf.device import autocast, maybe_compile
from minirlhf.distributed import all_reduce_sum, mean_over_ranks, shard, wrap
from minirlhf.masking import masked_sum, token_logprobs
from minirlhf.tokenizer import TokenizerError
from minirlhf.training import (MetricsLog, NonFiniteError, check_finite, distinct_rows, fail,
                               group_batches, lr_at, make_optimizer, pad_batch, pair_groups, set_lr,
                               start_run, write_json)
from minirlhf.evaluate import final_evaluation
from minirlhf.world import World


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
        margin to a finite value instead of pushing it to infinity on separable data
    rpo_alpha: α of RPO (Pang et al. 2024): adds α·NLL(y_w), the chosen responses' negative
        log-likelihood as a token mean over the batch (train_sft.py's loss on the chosen
        responses), so that pushing y_l down cannot drag y_w down with it
    chosen_tokens: (B,) response tokens of each y_w (needed when rpo_alpha > 0)
    nll_norm: what the NLL's sum is divided by, default chosen_tokens.sum(); under torchrun the
        whole batch's count over the number of processes, so that averaging the processes'
        gradients gives the whole batch's token mean
    returns loss (scalar), stats {"loss", "chosen_reward", "rejected_reward", "accuracy",
        "margin", "nll"}: batch means of the implicit rewards β·log π_θ/π_ref of (2) without
        β·log Z, the fraction of pairs with chosen reward > rejected reward, their difference
        β·m, and the per-token NLL of y_w (0 without rpo_alpha).

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
    loss = losses.mean()
    nll = loss.new_zeros(())
    if rpo_alpha:
        if chosen_tokens is None:
            raise ValueError("rpo_alpha needs chosen_tokens, the length of each chosen response")
        norm = chosen_tokens.sum() if nll_norm is None else nll_norm
        nll = -policy_chosen_logp.sum() / norm  # NLL(y_w), a token mean as in SFT
        loss = loss + rpo_alpha * nll  # L_RPO = L_DPO + α·NLL(y_w), Pang et al. 2024
    with torch.no_grad():
        chosen_reward = beta * chosen_logratio  # (B,) r̂(y_w) = β log π_θ/π_ref, step (2) / eq. 5
        rejected_reward = beta * rejected_logratio  # (B,) r̂(y_l)
        stats = {
            "loss": loss.detach(),
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
    seed: int = 0                     # seeds data order and evaluation sampling
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if there is one
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA and bf16-native CPUs
    compile: bool = False             # torch.compile the policy (CUDA only)
    # objective
    beta: float = 0.3                 # β: strength of the KL anchor implied by the loss (values compared in README, Results)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid = DPO, ipo = squared loss toward 1/(2β)
    label_smoothing: float = 0.0      # ε of conservative DPO (labels flipped with prob. ε)
    rpo_alpha: float = 2.0            # α: weight of the chosen responses' per-token NLL (RPO); 0 = plain DPO
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
    max_new_tokens: int = 48          # response budget for the final gold evaluation

    def check(self):
        check_ranges(self, positive=("max_steps", "batch_size", "eval_every", "ckpt_every",
                                     "max_new_tokens", "grad_clip"),
                     non_negative=("warmup", "weight_decay", "rpo_alpha"))
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--min-lr-ratio must be in [0, 1]")
        if self.beta <= 0 or self.lr <= 0:
            raise ValueError("--beta and --lr must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("--label-smoothing must be in [0, 0.5)")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("--label-smoothing applies to the sigmoid loss, not to ipo")


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
    summed = masked_sum(logp, loss_mask[:, 1:], dim=-1)                               # (N,) log π(y|x)
    rows = torch.tensor(rows, device=summed.device)
    return summed[rows[:len(pairs)]], summed[rows[len(pairs):]]


@torch.no_grad()
def precompute_reference(ref, pairs, tok, device, batch_size=256) -> torch.Tensor:
    """log π_ref(y_w|x), log π_ref(y_l|x) for every pair: (N, 2). The reference is frozen, so
    these numbers never change — computing them once halves the cost of every step. Batches of
    whole groups (`pair_groups`), so a response shared by several pairs is run once."""
    result = torch.empty(len(pairs), 2)
    chunk: list[int] = []
    groups = pair_groups(pairs)
    for j, g in enumerate(groups):
        chunk += g
        if len(chunk) >= batch_size or j == len(groups) - 1:
            c, r = response_logprobs(ref, [pairs[i] for i in chunk], tok, device)
            result[chunk] = torch.stack([c, r], dim=1).float().cpu()
            chunk = []
    return result


@torch.no_grad()
def evaluate_pairs(policy, pairs, ref_logp, tok, cfg, device, batch_size=256) -> dict:
    """Implicit-reward accuracy and loss of the policy on held-out pairs."""
    policy.eval()
    losses, accs, margins, n = 0.0, 0.0, 0.0, 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        c, r = response_logprobs(policy, chunk, tok, device)
        ref_c, ref_r = ref_logp[i:i + batch_size].to(device).unbind(1)
        loss, stats = dpo_loss(c, r, ref_c, ref_r, cfg.beta, cfg.label_smoothing, cfg.loss_type)
        losses += loss.item() * len(chunk)
        accs += stats["accuracy"].item() * len(chunk)
        margins += stats["margin"].item() * len(chunk)
        n += len(chunk)
    policy.train()
    return {"loss": losses / n, "accuracy": accs / n, "margin": margins / n}


def sibling(path: str, name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)), name)


def train(cfg: DPOConfig, prog: str = "train_dpo.py") -> dict:
    dist = start_run(cfg, prog)  # one process, or one of torchrun's (minirlhf/distributed.py)
    device = dist.device
    world = World(cfg.seed)
    ck_path = os.path.join(cfg.out, CHECKPOINT)
    resume_ck = load_checkpoint(ck_path) if cfg.resume and os.path.exists(ck_path) else None

    policy, tok, _ = load_stage(cfg.sft, "gpt", device)   # π_θ, starts at the SFT model
    ref, _, _ = load_stage(cfg.sft, "gpt", device)        # π_ref, frozen
    ref.eval().requires_grad_(False)
    block = policy.config.block_size
    if not os.path.exists(cfg.data):
        raise DataError(cfg.data, "preference file not found (make it with train_rm.py --make-pairs)")
    train_pairs = encode_pairs(read_prefs(cfg.data, tok, block), tok)
    val_path = cfg.val_data or sibling(cfg.data, "prefs_val.jsonl")
    test_path = cfg.test_data or sibling(cfg.data, "prefs_test.jsonl")
    val_pairs = encode_pairs(read_prefs(val_path, tok, block), tok) if os.path.exists(val_path) else train_pairs[:256]
    test_pairs = encode_pairs(read_prefs(test_path, tok, block), tok) if os.path.exists(test_path) else None

    t_ref = time.time()
    ref_train = precompute_reference(ref, train_pairs, tok, device, cfg.batch_size)                # (N, 2)
    ref_val = precompute_reference(ref, val_pairs, tok, device, cfg.batch_size)
    print(f"{len(train_pairs)} training pairs, {len(val_pairs)} validation pairs; reference "
          f"log-probs precomputed in {time.time() - t_ref:.1f}s", flush=True)

    optimizer = make_optimizer(policy, cfg.lr, cfg.weight_decay)
    step = 0
    if resume_ck is not None:
        check_compatible(resume_ck, ck_path, model_config=policy.config, tokenizer=tok)
        policy.load_state_dict(resume_ck["model"])
        optimizer.load_state_dict(resume_ck["optimizer"])
        set_rng_state(resume_ck["rng"])
        step = resume_ck["step"]
        print(f"resumed from {ck_path} at step {step}")
    fwd = maybe_compile(policy, device, cfg.compile)
    train_fwd = wrap(fwd, dist)  # under torchrun DDP: backward averages gradients over processes
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"), step if resume_ck else None,
                     enabled=dist.is_main)

    # --- the loop: one policy forward on chosen + rejected, the DPO loss, step ---
    policy.train()
    n = len(train_pairs)
    # batches of whole groups (a prompt's k(k−1)/2 pairs together): each response is run once
    # per batch and seen once per epoch, ~batch_size pairs from k/(k−1)·batch_size sequences
    groups = pair_groups(train_pairs)
    lengths = np.array([max(len(c), len(r)) for c, r, _ in train_pairs])

    @functools.lru_cache(maxsize=2)
    def batches_of(epoch):
        return group_batches(cfg.seed, epoch, groups, lengths, min(cfg.batch_size, n))

    t0 = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="dpo", disable=None if dist.is_main else True,
               leave=False)
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        epoch, k = divmod(step, len(batches_of(0)))
        idx = shard(batches_of(epoch)[k].tolist(), dist)  # this process's share of the batch
        chosen_logp, rejected_logp = response_logprobs(train_fwd, [train_pairs[i] for i in idx], tok,
                                                       device)
        ref_chosen, ref_rejected = ref_train[idx].to(device).unbind(1)
        lengths_w = [len(train_pairs[i][0]) - train_pairs[i][2] for i in idx]  # |y_w|, end included
        chosen_tokens = torch.tensor(lengths_w, device=device)                      # (B,)
        nll_norm = all_reduce_sum(sum(lengths_w), dist) / dist.world_size  # the whole batch's mean
        loss, stats = dpo_loss(chosen_logp, rejected_logp, ref_chosen, ref_rejected, cfg.beta,
                               cfg.label_smoothing, cfg.loss_type, cfg.rpo_alpha, chosen_tokens,
                               nll_norm)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        check_finite(step + 1, loss=loss, grad_norm=grad_norm)  # numbered as the log numbers it
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        # every process evaluates (they would otherwise wait for rank 0); rank 0 prints and writes
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            means = mean_over_ranks({k: v.item() for k, v in stats.items()}, dist)  # whole batch
            val = evaluate_pairs(policy, val_pairs, ref_val, tok, cfg, device, cfg.batch_size)
            print(f"step {step:5d} | loss {means['loss']:.4f} | implicit acc "
                  f"{means['accuracy']:.3f} | margin {means['margin']:+.3f} | "
                  f"chosen {means['chosen_reward']:+.3f} | rejected "
                  f"{means['rejected_reward']:+.3f} | val acc {val['accuracy']:.3f} | "
                  f"val loss {val['loss']:.4f} | lr {lr:.2e}", flush=True)
            log.write(step, split="train", loss=means["loss"], accuracy=means["accuracy"],
                      margin=means["margin"], chosen_reward=means["chosen_reward"],
                      rejected_reward=means["rejected_reward"], lr=lr)
            log.write(step, split="val", **val)
        if dist.is_main and (step % cfg.ckpt_every == 0 or step == cfg.max_steps):
            save_stage(cfg.out, model=policy, model_kind="gpt", config=cfg, tokenizer=tok,
                       step=step, optimizer=optimizer, rng=rng_state())
    bar.close()
    result = {"train_seconds": time.time() - t0, "steps": step}
    if not dist.is_main:  # rank 0 evaluates and writes eval.json
        return result

    # --- evaluation: implicit-reward accuracy on test pairs; gold score and KL to SFT ---
    if test_pairs:
        ref_test = precompute_reference(ref, test_pairs, tok, device, cfg.batch_size)
        result["test_pairs"] = evaluate_pairs(policy, test_pairs, ref_test, tok, cfg, device,
                                             cfg.batch_size)
        print(f"test pairs: implicit-reward accuracy {result['test_pairs']['accuracy']:.3f}")
    if tok.kind == "world":  # the gold judge knows the built-in world only (not HH, TL;DR)
        result.update(final_evaluation(policy, tok, world.test_prompts, ref=ref,
                                       max_new_tokens=cfg.max_new_tokens, seed=cfg.seed))
    write_json(os.path.join(cfg.out, "eval.json"), result)
    return result


def main(argv=None):
    prog = "train_dpo.py"
    cfg = parse_config(DPOConfig, argv, prog, description=__doc__.split("\n\n")[0])
    try:
        train(cfg, prog)
    except (DataError, CheckpointError, TokenizerError, NonFiniteError) as e:
        fail(prog, str(e))


if __name__ == "__main__":
    main()
