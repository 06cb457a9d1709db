"""Supervised finetuning (SFT): teach the model to imitate demonstrations (lecture ch. 1).

    python train_sft.py                                   # the built-in world
    python train_sft.py --data my_sft.jsonl --init out/sft --out out/sft2
    python train_sft.py --explain out/sft "Which is larger, 3 or 8?" "8 is larger than 3."
    python train_sft.py --resume                          # continue a stopped run
    torchrun --standalone --nproc_per_node 4 train_sft.py # 4 GPUs (minirlhf/distributed.py)

The loss is masked next-token cross-entropy: the model reads prompt and response but is trained
to predict the response tokens only; prompt and padding positions are ignored. From scratch on the
built-in world it learns the chat format, the five task tables and the demonstrators' styles —
and their mistakes, which is what the later stages fix.

Writes OUT/checkpoint.pt (+ tokenizer.tiktoken, config.json), OUT/best.pt (the model of the lowest
validation loss; checkpoint.pt is the latest), OUT/metrics.jsonl and, at the end, OUT/eval.json:
gold score and accuracy on the held-out test prompts, sampled at temperature 1 and greedily, and
the best validation step. `--explain` prints the lecture's token-by-token view of the loss for
one example.

Left out on purpose: packing several examples into one sequence, LoRA, multi-turn loss masks.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from minirlhf.checkpoint import (CHECKPOINT, TOKENIZER, CheckpointError, check_compatible,
                                 load_stage, load_tokenizer_for, model_from_checkpoint)
from minirlhf.config import check_ranges, parse_config
from minirlhf.data import DataError, read_sft
from minirlhf.device import autocast, maybe_compile
from minirlhf.distributed import all_reduce_sum, mean_over_ranks, wrap
from minirlhf.evaluate import evaluate, evaluation_prompts, final_evaluation, stage_scorer
from minirlhf.gpt2 import gpt2_tokenizer
from minirlhf.masking import masked_mean, token_logprobs
from minirlhf.model import GPT, GPTConfig
from minirlhf.tokenizer import Tokenizer, TokenizerError
from minirlhf.training import (NonFiniteError, batches_from, checkpoint_to_resume, due,
                               epoch_batches, fail, guarded_run, lr_at, make_optimizer, open_log,
                               optimizer_step, pad_batch, progress_bar, resume_state, save_run,
                               set_lr, start_run, write_json)
from minirlhf.world import World, world_tokenizer


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor,
             loss_mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Masked next-token cross-entropy, L_SFT = −(1/N) Σ_t log p(x_{t+1} | x_{1:t}) (lecture ch. 1).

    logits:    (B, T, V) model output; logits[:, t] predicts tokens[:, t + 1]
    tokens:    (B, T)    prompt + response + padding
    loss_mask: (B, T)    1 on target tokens (response, end token included), 0 elsewhere
    returns    loss (scalar), stats {"loss", "n_tokens", "accuracy", "per_token_loss" (B, T−1)}

    The average is over all N response tokens of the batch (a token mean), not a mean of
    per-sequence means: a 40-token response weighs 40 times as much as a 1-token one. This is the
    lecture's L_SFT summed over tokens, the maximum-likelihood objective of the whole dataset
    (Σ_i log p(y_i|x_i) = Σ_i Σ_t log p(y_i,t | ...)), and exactly the pretraining loss with the
    prompt tokens taken out. A per-sequence mean would make each token of a short answer count
    more, an extra weighting of its own.
    """
    logits = logits[:, :-1]  # (B, T-1, V) predictions for positions 1..T-1
    targets = tokens[:, 1:]  # (B, T-1)    tokens shifted left by one
    mask = loss_mask[:, 1:].bool()  # (B, T-1) which targets count
    # ignored targets may hold anything (pad ids, -100): point them at token 0 so gather works
    targets = torch.where(mask, targets, torch.zeros_like(targets))  # (B, T-1)
    logp = token_logprobs(logits, targets)  # (B, T-1) log p(x_{t+1} | x_{1:t})
    per_token_loss = -logp  # (B, T-1) ℓ_t = −log p(x_{t+1} | x_{1:t}), lecture ch. 1 step 1
    loss = masked_mean(per_token_loss, mask)  # scalar L_SFT, lecture ch. 1 step 2
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).float()  # (B, T-1)
        stats = {
            "loss": loss.detach(),
            "n_tokens": mask.sum(),
            "accuracy": masked_mean(correct, mask),
            "per_token_loss": torch.where(mask, per_token_loss, 0.0).detach(),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

@dataclass
class SFTConfig:
    out: str = "out/sft"              # folder for checkpoint.pt, metrics.jsonl, eval.json
    data: str | None = None           # SFT JSONL (prompt/completion, messages or HH); none =
                                      # the built-in world
    val_data: str | None = None       # validation JSONL; none = world val prompts, or 5% of --data
    init: str | None = None           # start from this stage folder's weights, or gpt2:DIR (GPT-2)
    resume: bool = False              # continue OUT/checkpoint.pt where a stopped run left off
    overwrite: bool = False           # start over in a used --out: its run files are replaced
    verbose: bool = False             # print the whole config at start
    seed: int = 0                     # seeds data order, initialisation and sampling
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda if there is one
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA and bf16-native CPUs
    compile: bool = False             # torch.compile the model (CUDA only)
    # model, when training from scratch (ignored with --init)
    n_layer: int = 4                  # transformer blocks
    n_head: int = 4                   # attention heads
    n_embd: int = 128                 # channels of the residual stream
    block_size: int = 96              # longest prompt + response, in tokens
    vocab_size: int = 512             # BPE tokens of the world tokenizer (specials on top)
    tokenizer: str | None = None      # a tokenizer folder (or .tiktoken file) from python -m
                                      # minirlhf.tokenizer train, or gpt2:DIR; none = the world's
    # data
    n_examples: int = 20000           # demonstrations drawn from the world's writers
    truncate: bool = False            # skip over-long examples instead of stopping with an error
    # optimisation
    max_steps: int = 1000             # optimizer steps
    batch_size: int = 64              # sequences per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 3e-3                  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1         # cosine decays to lr * this
    warmup: int = 50                  # linear warmup steps
    weight_decay: float = 0.1         # AdamW decoupled weight decay on matrices
    grad_clip: float = 1.0            # max global gradient norm
    # logging and evaluation
    log_every: int = 50               # steps between log lines / metrics rows
    eval_every: int = 250             # steps between validation loss + printed samples
    ckpt_every: int = 250             # steps between checkpoints (also written at the end)
    n_show: int = 3                   # samples printed at each evaluation
    max_new_tokens: int = 64          # response budget when sampling
    eval_temperature: float = 1.0     # final evaluation samples at this temperature (and greedy)
    eval_prompts: str | None = None   # prompts JSONL for the final evaluation; none = the world's
                                      # test prompts (world data) or the validation prompts
    eval_samples: int = 16            # samples per evaluation prompt (plus one greedy)
    rm: str | None = None             # a reward model stage: score the evaluation samples with it

    def check(self):
        check_ranges(self, positive=("max_steps", "batch_size", "grad_accum", "log_every",
                                     "eval_every", "ckpt_every", "n_examples", "max_new_tokens",
                                     "n_layer", "n_head", "n_embd", "block_size", "lr",
                                     "grad_clip", "eval_samples"),
                     non_negative=("warmup", "weight_decay", "n_show", "eval_temperature"))
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--min-lr-ratio must be in [0, 1]")
        if self.vocab_size < 256:
            raise ValueError("--vocab-size must be at least 256 (the byte tokens)")
        if self.n_embd % self.n_head:
            raise ValueError("--n-embd must be divisible by --n-head")
        if self.tokenizer and self.init:
            raise ValueError("--tokenizer and --init both choose the tokenizer: give one")


@guarded_run  # OUT is this run's until train() ends (minirlhf/training.py)
def train(cfg: SFTConfig, prog: str = "train_sft.py") -> dict:
    """Data, model and optimizer; then per step: a batch, L_SFT, backward, an optimizer step,
    and on schedule a log line, the validation loss and a checkpoint; then the final evaluation."""
    dist = start_run(cfg, prog)  # one process, or one of torchrun's (minirlhf/distributed.py)
    device, world = dist.device, World(cfg.seed)

    # --- data, model and optimizer: fresh, from --init, or where a stopped run left off ---
    ck = checkpoint_to_resume(cfg)  # OUT/checkpoint.pt with --resume, else None
    model, tok = load_model(cfg, ck, device)
    cfg.block_size = model.config.block_size
    train_set, val_set, prompts = load_examples(cfg, tok, world)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, vocabulary {tok.vocab_size}; "
          f"{len(train_set)} training and {len(val_set)} validation examples", flush=True)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    start = resume_state(cfg, ck, optimizer)  # the checkpoint's step; None for a fresh run
    log = open_log(cfg, start, dist)  # OUT/metrics.jsonl (and config.json)
    best = best_so_far(ck)  # the step and loss of the lowest validation loss: OUT/best.pt
    fwd = maybe_compile(model, device, cfg.compile)
    train_fwd = wrap(fwd, dist)  # under torchrun DDP: backward averages gradients over processes
    step = start or 0
    batches = micro_batch_indices(cfg, train_set, step, dist)

    # --- the loop: forward, masked cross-entropy, backward, clip, step ---
    model.train()
    t0, tokens_seen, step_seconds = time.time(), 0, 0.0
    bar = progress_bar(cfg.max_steps, step, "sft", dist)
    while step < cfg.max_steps:
        t_step = time.time()
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
        set_lr(optimizer, lr)
        micro_batches = [collate(train_set, next(batches), tok, device)
                         for _ in range(cfg.grad_accum)]
        loss, accuracy, n_read = forward_backward(train_fwd, micro_batches, device, dist)
        grad_norm = optimizer_step(optimizer, model, cfg.grad_clip, step + 1, loss)
        step += 1
        tokens_seen += n_read
        step_seconds += time.time() - t_step
        bar.update(1)
        if due(step, cfg.log_every, cfg.max_steps):
            tok_s = all_reduce_sum(tokens_seen, dist) / step_seconds
            log_train(log, step, loss, accuracy, lr, grad_norm, tok_s, dist)
        if due(step, cfg.eval_every, cfg.max_steps):  # every process; rank 0 prints and writes
            best = validate(fwd, val_set, tok, device, cfg, step, log, best)
            if dist.is_main and best["best_step"] == step:  # best.pt: the lowest val loss yet
                save_run(cfg, step, model, optimizer, tok, extra=best,
                         path=os.path.join(cfg.out, "best.pt"))
            show_samples(model, tok, world, cfg, step)
        if dist.is_main and due(step, cfg.ckpt_every, cfg.max_steps):
            save_run(cfg, step, model, optimizer, tok, extra=best)  # the latest, for --resume
    bar.close()

    # --- evaluation on held-out prompts: sampled (temperature 1) and greedy ---
    result = {"train_seconds": time.time() - t0, **best}
    if dist.is_main:
        model.eval()
        result.update(held_out_evaluation(cfg, model, tok, prompts, device))
        write_json(os.path.join(cfg.out, "eval.json"), result)
    return result


# ----------------------------------------------------------------------------------------------
# The phases of train(), in the order it calls them
# ----------------------------------------------------------------------------------------------

def load_model(cfg: SFTConfig, ck: dict | None, device) -> tuple[GPT, object]:
    """(model, tokenizer): the checkpoint's on --resume, else --init's, else a fresh GPT of the
    flags' size with the built-in world's tokenizer."""
    path = os.path.join(cfg.out, CHECKPOINT)
    if ck is not None:
        if not cfg.init:  # the run's own model flags must describe the saved model
            check_compatible(ck, path, model_config=GPTConfig(
                vocab_size=ck["model_config"]["vocab_size"], block_size=cfg.block_size,
                n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
        return model_from_checkpoint(ck, path, "gpt").to(device), load_tokenizer_for(ck, cfg.out)
    if cfg.init:
        model, tok, _ = load_stage(cfg.init, "gpt", device)
        return model, tok
    tok = own_tokenizer(cfg.tokenizer) if cfg.tokenizer else world_tokenizer(cfg.vocab_size)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=cfg.block_size,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))
    return model.to(device), tok


def own_tokenizer(path: str) -> Tokenizer:
    """--tokenizer: a folder holding tokenizer.tiktoken, or the rank file itself; gpt2:DIR is
    GPT-2's, from a Hugging Face folder (as every stage flag reads gpt2:DIR)."""
    if path.startswith("gpt2:"):
        return gpt2_tokenizer(path[len("gpt2:"):])
    return Tokenizer.load(os.path.join(path, TOKENIZER) if os.path.isdir(path) else path)


def load_examples(cfg: SFTConfig, tok, world) -> tuple[list, list, dict]:
    """(train, val) lists of (ids, n_prompt), the world's demonstrations or --data JSONL, and
    the prompts of each ({"train": [...], "val": [...]}: what the final evaluation needs)."""
    if cfg.data is None:
        train = world.sft_examples(cfg.n_examples, cfg.seed)
        val = world.sft_examples(1000, cfg.seed + 1, split="val")
    else:
        train = read_sft(cfg.data, tok, cfg.block_size, cfg.truncate)
        if cfg.val_data:
            val = read_sft(cfg.val_data, tok, cfg.block_size, cfg.truncate)
        else:  # hold out 5% (at least one example) by seed
            order = np.random.default_rng(cfg.seed).permutation(len(train))
            n_val = max(1, len(train) // 20)
            val = [train[i] for i in order[:n_val]]
            train = [train[i] for i in order[n_val:]] or val
    prompts = {"train": [r["prompt"] for r in train], "val": [r["prompt"] for r in val]}
    encode = lambda rows: [tok.render(r["prompt"], r["completion"]) for r in rows]
    train, val = encode(train), encode(val)
    too_long = max(len(ids) for ids, _ in train + val)
    if too_long > cfg.block_size:
        raise DataError("the built-in world", f"an example has {too_long} tokens, over "
                                              f"--block-size {cfg.block_size}")
    return train, val, prompts


def micro_batch_indices(cfg: SFTConfig, train_set, step: int, dist):
    """The run's micro-batches from optimizer step `step` on (`grad_accum` per step), each as
    this process's example indices; epochs of batches of similar lengths (`epoch_batches`)."""
    lengths = np.array([len(ids) for ids, _ in train_set])
    batch_size = min(cfg.batch_size, len(train_set))
    return batches_from(step * cfg.grad_accum,
                        lambda epoch: epoch_batches(cfg.seed, epoch, lengths, batch_size), dist)


def collate(examples, idx, tok, device):
    """The examples at idx -> right-padded tokens, attn_mask, loss_mask, each (B, T)."""
    seqs, n_prompt = zip(*(examples[i] for i in idx))
    return pad_batch(list(seqs), list(n_prompt), tok.pad_id, device)


def forward_backward(fwd, micro_batches, device, dist) -> tuple[float, float, int]:
    """Backpropagate L_SFT of one optimizer step's micro-batches (gradient accumulation).
    Returns (loss, token accuracy) of the whole batch and the tokens this process read.

    The loss is the token mean over the whole accumulated batch, so each micro-batch's loss is
    weighed by its share of the tokens. Under torchrun DDP averages the processes' gradients, so
    the shares count the tokens of an average process: the mean is then exactly the whole
    batch's, however the tokens fall."""
    n_total = all_reduce_sum(sum(int(m[2][:, 1:].sum()) for m in micro_batches), dist)
    n_total = n_total / dist.world_size
    loss_sum, acc_sum, tokens_read = 0.0, 0.0, 0
    for tokens, attn_mask, loss_mask in micro_batches:
        with autocast(device):
            logits = fwd(tokens, attn_mask)                                         # (B, T, V)
        loss, stats = sft_loss(logits.float(), tokens, loss_mask)
        share = stats["n_tokens"].item() / n_total
        (loss * share).backward()
        loss_sum += loss.item() * share
        acc_sum += stats["accuracy"].item() * share
        tokens_read += int(attn_mask.sum())
    return loss_sum, acc_sum, tokens_read


def log_train(log, step, loss, accuracy, lr, grad_norm, tok_s, dist):
    """One printed line and one metrics row: loss and token accuracy of the whole batch."""
    means = mean_over_ranks({"loss": loss, "acc": accuracy}, dist)  # the whole batch's
    print(f"step {step:5d} | loss {means['loss']:.4f} | token acc {means['acc']:.3f} | "
          f"lr {lr:.2e} | grad norm {float(grad_norm):.2f} | {tok_s:,.0f} tok/s", flush=True)
    log.write(step, split="train", loss=means["loss"], token_accuracy=means["acc"], lr=lr,
              grad_norm=float(grad_norm))


def best_so_far(ck: dict | None) -> dict:
    """{"best_step", "best_val_loss"}: the step whose model OUT/best.pt holds and its
    validation loss; a resumed run's from its checkpoint, None before the first evaluation."""
    extra = ck["extra"] if ck is not None else {}
    return {"best_step": extra.get("best_step"), "best_val_loss": extra.get("best_val_loss")}


def validate(fwd, val_set, tok, device, cfg: SFTConfig, step: int, log, best: dict) -> dict:
    """Print and log the validation loss; return `best` (`best_so_far`), moved to this step if
    its loss is the lowest yet. Like the reward model's best.pt (train_rm.py): checkpoint.pt
    stays the latest model, which --resume continues and the final evaluation uses."""
    val = validation_loss(fwd, val_set, tok, device, cfg.batch_size)
    if best["best_val_loss"] is None or val < best["best_val_loss"]:
        best = {"best_step": step, "best_val_loss": val}
    note = ("lowest yet: best.pt" if best["best_step"] == step else
            f"best {best['best_val_loss']:.4f} at step {best['best_step']}")
    print(f"step {step:5d} | val loss {val:.4f} ({note})", flush=True)
    log.write(step, split="val", loss=val)
    return best


@torch.no_grad()
def validation_loss(model, val, tok, device, batch_size=256) -> float:
    """L_SFT over the validation examples: a token mean, as in training."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val), batch_size):
        seqs, n_prompt = zip(*val[i:i + batch_size])
        tokens, attn_mask, loss_mask = pad_batch(list(seqs), list(n_prompt), tok.pad_id, device)
        with autocast(device):
            logits = model(tokens, attn_mask)
        loss, stats = sft_loss(logits.float(), tokens, loss_mask)
        total += loss.item() * stats["n_tokens"].item()
        count += stats["n_tokens"].item()
    model.train()
    return total / max(count, 1)


def held_out_evaluation(cfg: SFTConfig, model, tok, prompts: dict, device) -> dict:
    """Sample the evaluation prompts (`evaluation_prompts`: --eval-prompts, the world's test
    prompts, or the validation examples' prompts) at temperature 1 and greedily; the gold judge
    scores world prompts, --rm every response. Writes OUT/samples.jsonl."""
    eval_set, source = evaluation_prompts(cfg.eval_prompts, prompts["train"], prompts["val"],
                                          tok, cfg.block_size - cfg.max_new_tokens, cfg.seed)
    print(f"final evaluation on {source}", flush=True)
    reward = stage_scorer(cfg.rm, tok, device) if cfg.rm else None
    return {"eval_prompts": source,
            **final_evaluation(model, tok, eval_set, seed=cfg.seed, reward=reward,
                               temperature=cfg.eval_temperature, repeats=cfg.eval_samples,
                               max_new_tokens=cfg.max_new_tokens, out_dir=cfg.out)}


def show_samples(model, tok, world, cfg, step):
    """Print a few sampled answers to validation prompts beside the gold judge's score."""
    if cfg.n_show <= 0 or cfg.data is not None:
        return
    prompts = world.val_prompts[:: max(1, len(world.val_prompts) // cfg.n_show)][:cfg.n_show]
    r = evaluate(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + step,
                 n_samples=cfg.n_show)
    for s in r["samples"]:
        print(f"    [{s['gold']:+.2f}] {s['prompt']!r} -> {s['response']!r}")


# ----------------------------------------------------------------------------------------------
# The token-by-token view (the lecture's "SFT loss: token-by-token" simulation)
# ----------------------------------------------------------------------------------------------

def explain(folder: str, prompt: str, response: str, color: bool | None = None) -> list[dict]:
    """Print each response token with p(token) and its loss −log p, green (sure) → red
    (surprised), then the mean: exactly what L_SFT averages."""
    model, tok, _ = load_stage(folder, "gpt")
    model.eval()
    ids, n_prompt = tok.render(prompt, response)
    if len(ids) > model.config.block_size:
        raise ValueError(f"prompt and response are {len(ids)} tokens; this model reads at most "
                         f"{model.config.block_size} (its block size)")
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens)                                                      # (1, T, V)
    loss_mask = torch.zeros_like(tokens, dtype=torch.bool)
    loss_mask[0, n_prompt:] = True
    _, stats = sft_loss(logits, tokens, loss_mask)
    per_token = stats["per_token_loss"][0, n_prompt - 1:]                           # (n_resp,)
    color = sys.stdout.isatty() if color is None else color
    rows = []
    print(f"prompt: {prompt!r}")
    for tid, loss in zip(ids[n_prompt:], per_token.tolist()):
        p = math.exp(-loss)
        piece = tok.decode([tid]) if tid != tok.end_id else "<|end|>"
        bar = "#" * round(p * 20)
        line = f"  {piece!r:>16}  p={p:6.3f}  loss={loss:6.3f}  {bar}"
        if color:  # 256-colour ramp from red (p=0) to green (p=1)
            r, g = round(5 * (1 - p)), round(5 * p)
            line = f"\033[38;5;{16 + 36 * r + 6 * g}m{line}\033[0m"
        print(line)
        rows.append({"token": piece, "p": p, "loss": loss})
    print(f"mean loss over {len(rows)} response tokens: {stats['loss'].item():.4f} "
          f"(this is L_SFT for this example)")
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    prog = "train_sft.py"
    if argv[:1] == ["--explain"]:
        if len(argv) != 4:
            fail(prog, 'usage: train_sft.py --explain OUT "prompt" "response"')
        try:
            explain(*argv[1:])
        except (CheckpointError, TokenizerError, ValueError) as e:  # ValueError: too long
            fail(prog, str(e))
        return
    cfg = parse_config(SFTConfig, argv, prog, description=__doc__.split("\n\n")[0] +
                       '  Also: train_sft.py --explain OUT "prompt" "response".')
    try:
        train(cfg, prog)
    except (DataError, CheckpointError, TokenizerError, NonFiniteError,
            OSError) as e:  # OSError: a full disk, a read-only folder
        fail(prog, str(e))


if __name__ == "__main__":
    main()
