"""The lecture's interactive simulations (ch. 2-7) as small programs that print their numbers and
draw one figure each, computed with the project's own functions (not copies of them).

    python -m minirlhf.lecture list                               # the simulations
    python -m minirlhf.lecture returns --gamma 0.5                # ch. 2 discounted returns
    python -m minirlhf.lecture returns --rewards 0 0 1 0 5
    python -m minirlhf.lecture reinforce --episodes 200           # ch. 3 REINFORCE, 1-D world
    python -m minirlhf.lecture clip --eps 0.2 --sign -            # ch. 4 PPO clipped objective
    python -m minirlhf.lecture kl --beta 0.1                      # ch. 5 reward vs KL
    python -m minirlhf.lecture bradley-terry --r-winner 1.5 --r-loser -0.5   # ch. 6
    python -m minirlhf.lecture rlhf-step                          # ch. 7 one RLHF iteration

Every command writes OUT/<name>.png (`--out`, default out/lecture) and takes a second or two on a
CPU. Each simulation is one function returning its numbers as a dict, so tests can check them.

What each one reuses: `returns` and `reinforce` compute G_t with `minirlhf.rl.discounted_returns`;
`clip` evaluates `train_ppo.policy_loss` and differentiates it with autograd; `kl` measures KL with
`minirlhf.rl.kl_k1`/`kl_k3` and checks DPO's implicit reward with `train_dpo.dpo_loss`;
`bradley-terry` calls `train_rm.preference_probability` and `train_rm.reward_loss`; `rlhf-step`
runs `sampler.generate`, `train_ppo.per_token_logprobs`/`state_values`, `rl.token_kl`,
`rl.kl_penalised_rewards`, `rl.gae`, `masking.masked_whiten` and `train_ppo.ppo_loss` on tiny
random models.

Simplified on purpose:
- reinforce: one softmax over {left, stay, right} shared by every position (the lecture's single
  bar chart). Going right is best from every position of this world, so one distribution can
  represent the optimal policy; a world whose best action depends on the position would need a
  table of logits per state. The baseline b is a running mean of the returns.
- kl: a one-step bandit with 6 arms, where π* = π_ref·exp(r/β)/Z is exact (CS224N notes); a
  language model is the same problem with one "arm" per possible response.
- rlhf-step: the four models are random and tiny, so the text is gibberish; the policy is the
  reference plus a little noise ("a few iterations in") so that the KL is not exactly 0.
"""
from __future__ import annotations

import copy
import math
import os
import sys

import numpy as np
import torch

from minirlhf.config import OneLineParser
from minirlhf.masking import masked_mean, masked_whiten
from minirlhf.rl import discounted_returns, gae, kl_k1, kl_k3, kl_penalised_rewards, token_kl

ACTIONS = ("left", "stay", "right")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: str, name: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    print(f"figure: {path}")
    return path


def _bar(p: float, width: int = 30) -> str:
    return "█" * round(p * width) + "·" * (width - round(p * width))


# ============================================================================ ch. 2: returns

def returns_calculator(rewards=(1.0, 0.0, 0.0, 0.0, 10.0), gamma: float = 0.9,
                       out: str = "out/lecture") -> dict:
    """The discounted-return calculator: G_t = Σ_k γ^k r_{t+k} for every step of one episode,
    and G_0 as a function of γ (γ = 0 myopic, γ = 1 far-sighted)."""
    r = torch.tensor([list(rewards)], dtype=torch.float64)  # (1, T) one episode
    mask = torch.ones_like(r)  # (1, T) every step is real
    G = discounted_returns(r, mask, gamma)[0]  # (T,) G_t, lecture ch. 2
    gammas = np.linspace(0.0, 1.0, 101)
    g0_curve = [float(discounted_returns(r, mask, float(g))[0, 0]) for g in gammas]

    print(f"discounted returns, γ = {gamma} (lecture ch. 2: G_t = r_t + γ·G_(t+1))")
    print(f"{'t':>3} {'r_t':>8} {'G_t':>10}")
    for t, (rt, gt) in enumerate(zip(r[0].tolist(), G.tolist())):
        print(f"{t:>3} {rt:>8.3f} {gt:>10.4f}")
    print(f"G_0 at γ = 0: {g0_curve[0]:.4f} (only r_0) | γ = 1: {g0_curve[-1]:.4f} (Σ r_t)")

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    t = np.arange(len(rewards))
    ax1.bar(t - 0.2, r[0].numpy(), 0.4, label="reward $r_t$", color="#999999")
    ax1.bar(t + 0.2, G.numpy(), 0.4, label="return $G_t$", color="#1b9e77")
    ax1.set(xlabel="step t", title=f"rewards and returns, γ = {gamma}", xticks=t)
    ax1.legend()
    ax2.plot(gammas, g0_curve, color="#1b9e77")
    ax2.plot([gamma], [float(G[0])], "o", color="#d95f02", label=f"γ = {gamma}: G_0 = {G[0]:.3f}")
    ax2.set(xlabel="discount γ", ylabel="$G_0$", title="return of the episode vs γ")
    ax2.legend()
    path = _save(fig, out, "returns")
    return {"rewards": list(map(float, rewards)), "gamma": gamma, "returns": G.tolist(),
            "G0": float(G[0]), "gammas": gammas.tolist(), "G0_curve": g0_curve, "figure": path}


# ============================================================================ ch. 3: REINFORCE

def run_episode(logits: torch.Tensor, n_positions: int, max_steps: int,
                generator: torch.Generator) -> tuple[list[int], list[float]]:
    """One episode of the 1-D world: start in the middle, move left/stay/right, +1 and the end on
    reaching the right edge; walls at both ends; cut off after max_steps with nothing."""
    pos, goal = n_positions // 2, n_positions - 1
    actions, rewards = [], []
    probs = logits.detach().softmax(-1)  # (3,) π(a), the same in every position
    for _ in range(max_steps):
        a = int(torch.multinomial(probs, 1, generator=generator))
        pos = min(max(pos + a - 1, 0), goal)  # a = 0, 1, 2 moves -1, 0, +1
        actions.append(a)
        rewards.append(1.0 if pos == goal else 0.0)
        if pos == goal:
            break
    return actions, rewards


def reinforce(episodes: int = 200, n_positions: int = 5, gamma: float = 0.9, lr: float = 0.1,
              max_steps: int = 20, seed: int = 0, every: int = 20,
              out: str = "out/lecture") -> dict:
    """REINFORCE with a baseline on the 1-D world (lecture ch. 3). After each episode:
        loss = −Σ_t log π(a_t)·(G_t − b),   θ ← θ − lr·∇loss
    (the log-derivative trick: autograd gives Σ_t ∇log π(a_t)·(G_t − b)). Returns the policy's
    probabilities after every episode, and the steps each episode took."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.zeros(3, requires_grad=True)  # θ: one logit per action, uniform at start
    opt = torch.optim.SGD([logits], lr=lr)
    baseline = 0.0  # b, a running mean of G_t (lecture ch. 3, "baseline subtraction")
    history, steps, G0s = [logits.detach().softmax(-1).tolist()], [], []

    print(f"REINFORCE on a 1-D world of {n_positions} positions: start at {n_positions // 2}, "
          f"goal at {n_positions - 1} (+1, episode ends), γ = {gamma}, lr = {lr}, "
          f"at most {max_steps} steps")
    for ep in range(1, episodes + 1):
        actions, rewards = run_episode(logits, n_positions, max_steps, g)
        r = torch.tensor([rewards])  # (1, T)
        G = discounted_returns(r, torch.ones_like(r), gamma)[0]  # (T,) G_t, lecture ch. 2
        logp = logits.log_softmax(-1)[torch.tensor(actions)]  # (T,) log π(a_t)
        loss = -(logp * (G - baseline)).sum()  # −Σ log π(a_t)·(G_t − b), lecture ch. 3
        opt.zero_grad()
        loss.backward()
        opt.step()
        baseline = 0.9 * baseline + 0.1 * G.mean().item()
        history.append(logits.detach().softmax(-1).tolist())
        steps.append(len(actions))
        G0s.append(G[0].item())
        if ep % every == 0 or ep == 1:
            recent = steps[-every:]
            print(f"episode {ep:4d} | steps {np.mean(recent):5.1f} (mean of last {len(recent)})"
                  f" | G_0 {G0s[-1]:.3f} | b {baseline:.3f}")
            for name, p in zip(ACTIONS, history[-1]):
                print(f"    {name:<5} {_bar(p)} {p:.3f}")

    probs = np.array(history)  # (episodes + 1, 3)
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, color) in enumerate(zip(ACTIONS, ("#7570b3", "#999999", "#1b9e77"))):
        ax1.plot(probs[:, i], label=f"P({name})", color=color)
    ax1.set(xlabel="episode", ylabel="probability", ylim=(0, 1),
            title="REINFORCE: π(a) per episode")
    ax1.legend()
    ax2.bar(ACTIONS, probs[-1], color=("#7570b3", "#999999", "#1b9e77"))
    ax2.set(ylim=(0, 1), title=f"policy after {episodes} episodes")
    path = _save(fig, out, "reinforce")
    final = dict(zip(ACTIONS, probs[-1].tolist()))
    return {"final": final, "history": probs.tolist(), "steps": steps, "G0": G0s,
            "figure": path}


# ============================================================================ ch. 4: PPO clip

def ppo_clip(eps: float = 0.2, advantage: float = 1.0, out: str = "out/lecture") -> dict:
    """L(r) = min(r·A, clip(r, 1−ε, 1+ε)·A) and dL/dr over the ratio r, each point computed with
    train_ppo.policy_loss on a single token with log π_θ − log π_θold = log r (lecture ch. 4)."""
    from train_ppo import policy_loss

    def at(r: float) -> tuple[float, float, float]:
        ratio = torch.tensor([[r]], dtype=torch.float64, requires_grad=True)  # (1, 1) r_t(θ)
        logp = ratio.log()  # (1, 1) log π_θ, with log π_θold = 0 below
        A = torch.tensor([[advantage]], dtype=torch.float64)  # (1, 1)
        loss, stats = policy_loss(logp, torch.zeros_like(logp), A, torch.ones_like(A), eps)
        objective = -loss  # L^CLIP
        objective.backward()
        return objective.item(), ratio.grad.item(), stats["clipfrac"].item()

    rs = np.linspace(0.005, 1.995, 200)  # steps of 0.01 between the r = 1 ± ε kinks of 0.x0 ε
    curve = [at(float(r)) for r in rs]
    side = "above 1+ε" if advantage > 0 else "below 1−ε"
    print(f"PPO clipped objective, ε = {eps}, A = {advantage:+g} (lecture ch. 4); flat {side}")
    print(f"{'r':>5} {'r·A':>8} {'clip(r)·A':>10} {'L^CLIP':>8} {'dL/dr':>7}  |r−1|>ε")
    table = []
    for r in (0.5, 0.7, 0.75, 0.9, 1.0, 1.1, 1.25, 1.3, 1.5):
        obj, grad, outside = at(r)
        clipped = min(max(r, 1 - eps), 1 + eps) * advantage
        table.append({"r": r, "objective": obj, "grad": grad})
        print(f"{r:>5.2f} {r * advantage:>+8.3f} {clipped:>+10.3f} {obj:>+8.3f} {grad:>+7.3f}  "
              f"{'yes' if outside else 'no'}")
    print("(|r−1|>ε is what clipfrac counts; the gradient is 0 only on the side A favours)")

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.5, 6), sharex=True)
    flat = (rs > 1 + eps) if advantage > 0 else (rs < 1 - eps)
    for ax in (ax1, ax2):
        ax.axvspan(*((1 + eps, rs[-1]) if advantage > 0 else (rs[0], 1 - eps)), color="#fdb863",
                   alpha=0.35, label="clipped: gradient 0")
        ax.axvline(1 - eps, color="#999999", ls=":")
        ax.axvline(1 + eps, color="#999999", ls=":")
    ax1.plot(rs, rs * advantage, color="#1b9e77", ls="--", label="unclipped r·A")
    ax1.plot(rs, [c[0] for c in curve], color="#238b45", lw=2.5, label="$L^{CLIP}$")
    ax1.set(ylabel="objective", title=f"PPO clipped objective, ε = {eps}, A = {advantage:+g}")
    ax1.legend(fontsize=8)
    ax2.plot(rs, [c[1] for c in curve], color="#238b45", lw=2)
    ax2.set(xlabel="ratio r = π_θ/π_θold", ylabel="dL/dr (autograd)")
    path = _save(fig, out, "clip")
    return {"eps": eps, "advantage": advantage, "r": rs.tolist(),
            "objective": [c[0] for c in curve], "unclipped": (rs * advantage).tolist(),
            "grad": [c[1] for c in curve], "flat": flat.tolist(), "table": table,
            "figure": path}


# ============================================================================ ch. 5: reward vs KL

BANDIT_REWARDS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.2)  # r(a) of each arm
BANDIT_REF = (0.30, 0.25, 0.20, 0.13, 0.08, 0.04)  # π_ref(a): the best arms are the rarest


def optimal_policy(ref_probs: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """π* = π_ref·exp(r/β)/Z, the maximiser of E_π[r] − β·KL(π‖π_ref) (CS224N notes; DPO eq. 4).
    (K,), (K,) -> (K,); a softmax of log π_ref + r/β, so that a small β does not overflow."""
    return (ref_probs.log() + rewards / beta).softmax(-1)


def kl_tradeoff(beta: float = 0.1, rewards=BANDIT_REWARDS, ref_probs=BANDIT_REF,
                n_samples: int = 4000, seed: int = 0, out: str = "out/lecture") -> dict:
    """The KL-penalised objective J(π) = E_π[r] − β·KL(π‖π_ref) on a K-arm bandit (lecture ch. 5):
    its closed-form optimum for `beta` and the reward / KL / objective of π* over a range of β."""
    from train_dpo import dpo_loss

    r = torch.tensor(rewards, dtype=torch.float64)  # (K,)
    ref = torch.tensor(ref_probs, dtype=torch.float64)  # (K,)
    ref = ref / ref.sum()

    def numbers(b: float) -> tuple[torch.Tensor, float, float]:
        pi = optimal_policy(ref, r, b)  # (K,) π*
        kl = (pi * kl_k1(pi.log(), ref.log())).sum().item()  # KL(π*‖π_ref) = E_π*[log π*/π_ref]
        return pi, (pi * r).sum().item(), kl

    pi, reward, kl = numbers(beta)
    objective = reward - beta * kl  # J(π*) = E[r] − β·KL, lecture ch. 5
    log_z = torch.logsumexp(ref.log() + r / beta, 0).item()  # log Z = log E_ref[exp(r/β)]
    # the per-sample estimators PPO uses, from samples of π*: both unbiased for the exact KL
    a = torch.multinomial(pi, n_samples, replacement=True,
                          generator=torch.Generator().manual_seed(seed))  # (N,) arms
    k1 = kl_k1(pi.log()[a], ref.log()[a]).mean().item()
    k3 = kl_k3(pi.log()[a], ref.log()[a]).mean().item()
    # DPO's implicit reward β·log π*/π_ref recovers r up to β·log Z: its margin between the best
    # and the worst arm is r_best − r_worst (train_dpo.dpo_loss, eq. 5)
    best, worst = int(r.argmax()), int(r.argmin())
    _, dpo_stats = dpo_loss(pi.log()[[best]], pi.log()[[worst]], ref.log()[[best]],
                            ref.log()[[worst]], beta)
    betas = np.logspace(-2, 1, 121)
    curve = [numbers(float(b))[1:] for b in betas]

    print(f"reward vs KL on a {len(r)}-arm bandit, β = {beta} (lecture ch. 5)")
    print(f"{'arm':>4} {'r(a)':>6} {'π_ref':>7} {'π*':>7}")
    for i in range(len(r)):
        print(f"{i:>4} {r[i].item():>6.2f} {ref[i].item():>7.3f} {pi[i].item():>7.3f}")
    print(f"E_π*[r] = {reward:.4f} (π_ref: {(ref * r).sum().item():.4f}, best arm: "
          f"{r.max().item():.4f}) | KL(π*‖π_ref) = {kl:.4f} nats")
    print(f"J(π*) = E[r] − β·KL = {objective:.4f} = β·log Z = {beta * log_z:.4f}")
    print(f"KL from {n_samples} samples of π*: k1 {k1:.4f}, k3 {k3:.4f} (exact {kl:.4f})")
    print(f"DPO implicit reward margin β·log(π*/π_ref), arm {best} vs arm {worst}: "
          f"{dpo_stats['margin'].item():.4f} = r({best}) − r({worst}) = "
          f"{(r[best] - r[worst]).item():.4f}")
    print(f"over β in [{betas[0]:g}, {betas[-1]:g}]: KL {curve[0][1]:.3f} -> {curve[-1][1]:.3f}, "
          f"E[r] {curve[0][0]:.3f} -> {curve[-1][0]:.3f}")

    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(r))
    ax1.bar(x - 0.2, ref.numpy(), 0.4, label="π_ref", color="#999999")
    ax1.bar(x + 0.2, pi.numpy(), 0.4, label=f"π* (β = {beta})", color="#1b9e77")
    ax1.set(xticks=x, xticklabels=[f"{i}\nr={v:g}" for i, v in enumerate(rewards)],
            ylabel="probability", title="π* = π_ref·exp(r/β)/Z")
    ax1.legend()
    rew, kls = np.array([c[0] for c in curve]), np.array([c[1] for c in curve])
    ax2.plot(betas, rew, color="#1b9e77", label="E_π*[r]")
    ax2.plot(betas, kls, color="#d95f02", label="KL(π*‖π_ref)")
    ax2.plot(betas, rew - betas * kls, color="#7570b3", label="J = E[r] − β·KL")
    ax2.axvline(beta, color="black", ls=":", label=f"β = {beta}")
    ax2.set(xscale="log", xlabel="KL weight β", title="reward vs KL trade-off")
    ax2.legend(fontsize=8)
    path = _save(fig, out, "kl")
    return {"beta": beta, "rewards": r.tolist(), "ref": ref.tolist(), "pi_star": pi.tolist(),
            "expected_reward": reward, "kl": kl, "objective": objective, "log_z": log_z,
            "kl_k1_sampled": k1, "kl_k3_sampled": k3,
            "dpo_margin": dpo_stats["margin"].item(), "betas": betas.tolist(),
            "reward_curve": rew.tolist(), "kl_curve": kls.tolist(), "figure": path}


# ============================================================================ ch. 6: Bradley-Terry

def bradley_terry(r_winner: float = 1.5, r_loser: float = -0.5, out: str = "out/lecture") -> dict:
    """P(y_w ≻ y_l) = σ(r_w − r_l) and the reward-model loss −log σ(r_w − r_l) (lecture ch. 6),
    from train_rm.preference_probability and train_rm.reward_loss."""
    from train_rm import preference_probability, reward_loss

    r_w = torch.tensor([r_winner], dtype=torch.float64)  # (1,)
    r_l = torch.tensor([r_loser], dtype=torch.float64)  # (1,)
    p = preference_probability(r_w, r_l).item()
    loss, _ = reward_loss(r_w, r_l)
    delta = r_winner - r_loser
    print(f"Bradley–Terry (lecture ch. 6): r(winner) = {r_winner:g}, r(loser) = {r_loser:g}, "
          f"Δ = {delta:g}")
    print(f"P(y_w ≻ y_l) = σ(Δ) = {p:.4f} | L_RM = −log σ(Δ) = {loss.item():.4f}")
    print(f"(Δ = 0 gives P = 0.5 and L = log 2 = {math.log(2):.4f})")

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    d = torch.linspace(-6, 6, 241, dtype=torch.float64)
    ax.plot(d, preference_probability(d, torch.zeros_like(d)), color="#1b9e77",
            label="P(y_1 ≻ y_2) = σ(Δ)")
    ax.plot(d, -torch.nn.functional.logsigmoid(d), color="#d95f02", ls="--",
            label="loss −log σ(Δ)")
    ax.plot([delta], [p], "o", color="black", label=f"Δ = {delta:g}: P = {p:.3f}")
    ax.axhline(0.5, color="#999999", ls=":")
    ax.set(xlabel="Δ = r(y_1) − r(y_2)", ylim=(0, 3), title="Bradley–Terry preference model")
    ax.legend(fontsize=8)
    path = _save(fig, out, "bradley_terry")
    return {"r_winner": r_winner, "r_loser": r_loser, "delta": delta, "p": p,
            "loss": loss.item(), "figure": path}


# ============================================================================ ch. 7: one RLHF step

RLHF_TEXT = ("What is 2 plus 3? 2 plus 3 is 5. What is the capital of France? The capital of "
             "France is Paris. Sure! What is the opposite of hot? The opposite of hot is cold.")
RLHF_PROMPTS = ("What is 2 plus 3?", "What is the capital of France?",
                "What is the opposite of hot?", "Sure!")


def _shape(x: torch.Tensor) -> str:
    return str(tuple(x.shape))


def _fmt(x: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:+.3f}" for v in x.tolist()) + "]"


def tiny_four_models(seed: int):
    """The four models of lecture ch. 7, tiny and random, and a BPE tokenizer for them."""
    from minirlhf.model import GPT, GPTConfig, ScalarHeadModel
    from minirlhf.tokenizer import Tokenizer
    torch.manual_seed(seed)
    tok = Tokenizer.train(RLHF_TEXT, vocab_size=300)  # byte-level BPE on three sentences
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=32)
    ref = GPT(cfg)  # π_ref: the "SFT model", frozen
    policy = copy.deepcopy(ref)  # π_θ: starts as a copy of it ...
    with torch.no_grad():  # ... and has drifted a little, as if a few iterations had run
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reward_model = ScalarHeadModel(cfg)  # r_φ: frozen
    value_model = copy.deepcopy(reward_model)  # V_ψ: starts as the reward model (train_ppo default)
    for frozen in (ref, reward_model):
        frozen.eval().requires_grad_(False)
    models = {"policy π_θ": policy, "reference π_ref": ref, "reward r_φ": reward_model,
              "value V_ψ": value_model}
    print(f"one RLHF iteration on tiny random models (lecture ch. 7): vocabulary V = "
          f"{tok.vocab_size}, C = {cfg.n_embd}, {cfg.n_layer} layer")
    for name, m in models.items():
        trainable = any(p.requires_grad for p in m.parameters())
        print(f"  {name:<16} {type(m).__name__:<16} {m.num_params():>7,d} params  "
              f"{'trainable' if trainable else 'frozen'}")
    return models, tok


def _step_generate(policy, tok, max_new_tokens: int, seed: int):
    """1. y ~ π_θ(·|x), no grad: the rollout's tokens and response mask."""
    from minirlhf.sampler import generate
    prompts = [tok.render_prompt(p) for p in RLHF_PROMPTS]
    gen = generate(policy, prompts, max_new_tokens, eos_id=tok.end_id, pad_id=tok.pad_id,
                   generator=torch.Generator().manual_seed(seed))
    B = gen.tokens.shape[0]
    print("\n1. generate  y ~ π_θ(·|x)                                  [π_θ, no grad]")
    print(f"   tokens        {_shape(gen.tokens)}: B = {B} prompts left-padded to P = "
          f"{gen.prompt_len}, then up to {max_new_tokens} response tokens")
    print(f"   response_mask {_shape(gen.response_mask)}: 1 on generated tokens (end token "
          f"included), 0 on prompt and padding")
    for b in range(B):
        row = "".join(str(int(v)) for v in gen.response_mask[b])
        ids = gen.responses()[b]
        print(f"     {row}  {RLHF_PROMPTS[b]!r} -> {ids} {tok.decode(ids)!r}")
    return gen


@torch.no_grad()
def _step_score(models: dict, gen, mask: torch.Tensor) -> dict:
    """2. r_φ(x, y), log π_θold, log π_ref, V(s_t), and the KL per token (lecture ch. 7 step 2),
    with the functions train_ppo.py scores its rollouts with."""
    from train_ppo import per_token_logprobs, state_values
    cpu, tokens, attn_mask = torch.device("cpu"), gen.tokens, gen.attn_mask
    s = {"score": models["reward r_φ"].score(tokens, attn_mask),  # (B,) at the last real token
         "old_logp": per_token_logprobs(models["policy π_θ"], tokens, attn_mask, cpu),
         "ref_logp": per_token_logprobs(models["reference π_ref"], tokens, attn_mask, cpu),
         "values": state_values(models["value V_ψ"], tokens, attn_mask, cpu)}  # (B, T-1) each
    s["kl"] = token_kl(s["old_logp"], s["ref_logp"], mask)  # (B, T-1) log π_θ − log π_ref
    print("\n2. score")
    print(f"   score r_φ(x, y)           {_shape(s['score'])} {_fmt(s['score'])}   [r_φ frozen]")
    print(f"   old_logp log π_θold       {_shape(s['old_logp'])}, response mean "
          f"{masked_mean(s['old_logp'], mask).item():+.3f}          [π_θ, no grad]")
    print(f"   ref_logp log π_ref        {_shape(s['ref_logp'])}, response mean "
          f"{masked_mean(s['ref_logp'], mask).item():+.3f}          [π_ref frozen]")
    print(f"   old_values V_ψ(s_t)       {_shape(s['values'])}"
          f"                                [V_ψ, no grad]")
    print(f"   kl = log π_θ − log π_ref  {_shape(s['kl'])} per token; per response "
          f"{_shape(s['kl'].sum(-1))} {_fmt(s['kl'].sum(-1))}")
    print("     (k1 of one sample can be negative; its mean over samples of π_θ is the KL)")
    return s


def _step_advantages(s: dict, mask: torch.Tensor, beta: float, gamma: float, lam: float):
    """3. per-token reward r_φ − β·KL (minirlhf.rl.kl_penalised_rewards), GAE, whitening."""
    rewards = kl_penalised_rewards(s["score"], s["old_logp"], s["ref_logp"], mask, beta)
    advantages, returns = gae(rewards, s["values"], mask, gamma, lam)  # (B, T-1) each
    white = masked_whiten(advantages, mask)  # (B, T-1)
    print("\n3. advantages")
    print(f"   rewards      {_shape(rewards)}: −β·kl on every response token (β = {beta}), "
          f"+ r_φ on the last one")
    print(f"   advantages   {_shape(advantages)}, returns {_shape(returns)}: GAE, γ = {gamma}, "
          f"λ = {lam}")
    print(f"   whitened     mean {masked_mean(white, mask).item():+.3f}, std "
          f"{masked_mean(white ** 2, mask).sqrt().item():.3f} over the real tokens")
    return rewards, advantages, returns, white


def _step_update(models: dict, gen, mask, s: dict, white, returns, clip_eps: float, lr: float):
    """4. one PPO update of π_θ and V_ψ on L_PPO = L^CLIP − c1·L^VF + c2·H (train_ppo.ppo_loss)."""
    from train_ppo import per_token_logprobs, ppo_loss, state_values
    cpu, tokens, attn_mask = torch.device("cpu"), gen.tokens, gen.attn_mask
    policy, value_model = models["policy π_θ"], models["value V_ψ"]
    policy.train()
    value_model.train()
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in (policy, value_model)]
    logp, entropy = per_token_logprobs(policy, tokens, attn_mask, cpu, with_entropy=True)
    values = state_values(value_model, tokens, attn_mask, cpu)  # (B, T-1), with grad
    loss, stats = ppo_loss(logp, s["old_logp"], white, values, s["values"], returns, mask,
                           entropy, clip_eps)
    loss.backward()
    got_grad = {name: any(p.grad is not None for p in m.parameters())
                for name, m in models.items()}
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        new_logp = per_token_logprobs(policy, tokens, attn_mask, cpu)  # (B, T-1)
    _, after = ppo_loss(new_logp, s["old_logp"], white, values.detach(), s["values"], returns,
                        mask, clip_eps=clip_eps)
    print(f"\n4. PPO update  (one Adam step, lr = {lr}, ε = {clip_eps})")
    print(f"   logp {_shape(logp)} and entropy {_shape(entropy)} from π_θ with grad; "
          f"values {_shape(values)} from V_ψ with grad")
    print(f"   loss {stats['loss'].item():+.4f} | policy_loss {stats['policy_loss'].item():+.4f}"
          f" | value_loss {stats['value_loss'].item():.4f} | entropy {stats['entropy'].item():.3f}"
          f" | ratio {stats['ratio'].item():.3f} | clipfrac {stats['clipfrac'].item():.3f}")
    print("   gradients reached: " + ", ".join(f"{n} {'yes' if g else 'no'}"
                                               for n, g in got_grad.items()))
    print(f"   after the step: ratio π_θ/π_θold {after['ratio'].item():.3f} | approx_kl "
          f"{after['approx_kl'].item():.5f} | clipfrac {after['clipfrac'].item():.3f}")
    return {"logp": logp, "entropy": entropy, "stats": stats, "after": after,
            "got_grad": got_grad}


def rlhf_step(max_new_tokens: int = 8, beta: float = 0.05, gamma: float = 1.0, lam: float = 0.95,
              clip_eps: float = 0.2, lr: float = 2e-3, seed: int = 0,
              out: str = "out/lecture") -> dict:
    """One RLHF iteration through the four models of lecture ch. 7 — generate, score, advantages,
    one PPO update — on tiny random models, printing every tensor's shape."""
    models, tok = tiny_four_models(seed)
    gen = _step_generate(models["policy π_θ"], tok, max_new_tokens, seed)       # 1.
    mask = gen.response_mask[:, 1:]  # (B, T-1) targets that are response tokens
    s = _step_score(models, gen, mask)                                           # 2.
    rewards, advantages, returns, white = _step_advantages(s, mask, beta, gamma, lam)  # 3.
    u = _step_update(models, gen, mask, s, white, returns, clip_eps, lr)         # 4.

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    cols = mask[0].nonzero().squeeze(-1)  # response positions of row 0
    x = np.arange(len(cols))
    ax.bar(x - 0.2, rewards[0, cols].numpy(), 0.4, label="reward (−β·KL, + r_φ at the end)")
    ax.bar(x + 0.2, advantages[0, cols].numpy(), 0.4, label="GAE advantage")
    ax.plot(x, s["values"][0, cols].numpy(), "k.-", label="value V(s_t)")
    ax.set(xlabel="response token", ylabel="per-token value",
           title=f"response 0: {RLHF_PROMPTS[0]!r}")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    path = _save(fig, out, "rlhf_step")
    shapes = {name: tuple(t.shape) for name, t in (
        ("tokens", gen.tokens), ("response_mask", gen.response_mask), ("mask", mask),
        ("score", s["score"]), ("old_logp", s["old_logp"]), ("ref_logp", s["ref_logp"]),
        ("values", s["values"]), ("kl", s["kl"]), ("kl_per_response", s["kl"].sum(-1)),
        ("rewards", rewards), ("advantages", advantages), ("returns", returns),
        ("logp", u["logp"]), ("entropy", u["entropy"]))}
    return {"shapes": shapes, "B": gen.tokens.shape[0], "T": gen.tokens.shape[1],
            "prompt_len": gen.prompt_len, "score": s["score"].tolist(),
            "kl_per_response": s["kl"].sum(-1).tolist(), "rewards": rewards.tolist(),
            "loss": u["stats"]["loss"].item(),
            "stats": {k: v.item() for k, v in u["stats"].items()},
            "after": {k: v.item() for k, v in u["after"].items()}, "got_grad": u["got_grad"],
            "n_response_tokens": int(mask.sum()), "figure": path}


# ============================================================================ command line

SIMULATIONS = {
    "returns": (returns_calculator, "ch. 2  discounted returns G_t of an episode, and G_0 vs γ"),
    "reinforce": (reinforce, "ch. 3  REINFORCE on a 1-D world: left / stay / right"),
    "clip": (ppo_clip, "ch. 4  PPO's clipped objective and its gradient over the ratio r"),
    "kl": (kl_tradeoff, "ch. 5  reward vs KL: π* = π_ref·exp(r/β)/Z on a bandit, over β"),
    "bradley-terry": (bradley_terry, "ch. 6  P(y_w ≻ y_l) = σ(r_w − r_l) and the RM loss"),
    "rlhf-step": (rlhf_step, "ch. 7  one RLHF iteration through the four models, with shapes"),
}


def build_parser() -> OneLineParser:
    ap = OneLineParser(prog="python -m minirlhf.lecture", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="name", required=True, metavar="NAME")
    sub.add_parser("list", help="list the simulations")
    parsers = {name: sub.add_parser(name, help=help_) for name, (_, help_) in SIMULATIONS.items()}
    for p in parsers.values():
        p.add_argument("--out", default="out/lecture", help="folder for the figure")
    p = parsers["returns"]
    p.add_argument("--rewards", type=float, nargs="+", default=[1.0, 0.0, 0.0, 0.0, 10.0],
                   help="reward of each step")
    p.add_argument("--gamma", type=float, default=0.9, help="discount γ in [0, 1]")
    p = parsers["reinforce"]
    p.add_argument("--episodes", type=int, default=200, help="episodes, one update each")
    p.add_argument("--positions", type=int, default=5, help="N, positions 0..N-1 (N >= 3)")
    p.add_argument("--gamma", type=float, default=0.9, help="discount γ")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate on the logits")
    p.add_argument("--max-steps", type=int, default=20, help="an episode is cut off after this")
    p.add_argument("--seed", type=int, default=0, help="seeds the action sampling")
    p.add_argument("--every", type=int, default=20, help="print the policy every this many")
    p = parsers["clip"]
    p.add_argument("--eps", type=float, default=0.2, help="clip range ε")
    p.add_argument("--sign", choices=["+", "-"], default="+", help="sign of the advantage A")
    p.add_argument("--advantage", type=float, default=1.0, help="|A|")
    p = parsers["kl"]
    p.add_argument("--beta", type=float, default=0.1, help="KL weight β > 0")
    p = parsers["bradley-terry"]
    p.add_argument("--r-winner", type=float, default=1.5, help="r(x, y_w)")
    p.add_argument("--r-loser", type=float, default=-0.5, help="r(x, y_l)")
    p = parsers["rlhf-step"]
    p.add_argument("--max-new-tokens", type=int, default=8, help="response budget (1..30)")
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient β")
    p.add_argument("--seed", type=int, default=0, help="seeds the models and the sampling")
    return ap


def main(argv=None) -> dict | None:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.name == "list":
        for name, (_, help_) in SIMULATIONS.items():
            print(f"{name:<14} {help_}")
        return None
    if a.name == "returns":
        if not 0 <= a.gamma <= 1:
            ap.error("--gamma must be in [0, 1]")
        return returns_calculator(a.rewards, a.gamma, a.out)
    if a.name == "reinforce":
        if a.positions < 3 or a.episodes < 1 or a.max_steps < 1 or a.every < 1:
            ap.error("need --positions >= 3 and positive --episodes, --max-steps, --every")
        return reinforce(a.episodes, a.positions, a.gamma, a.lr, a.max_steps, a.seed, a.every,
                         a.out)
    if a.name == "clip":
        if not 0 < a.eps < 1 or a.advantage <= 0:
            ap.error("need 0 < --eps < 1 and --advantage > 0")
        return ppo_clip(a.eps, a.advantage if a.sign == "+" else -a.advantage, a.out)
    if a.name == "kl":
        if a.beta <= 0:
            ap.error("--beta must be > 0")
        return kl_tradeoff(a.beta, out=a.out)
    if a.name == "bradley-terry":
        return bradley_terry(a.r_winner, a.r_loser, a.out)
    if not 1 <= a.max_new_tokens <= 30:
        ap.error("--max-new-tokens must be in 1..30")
    return rlhf_step(a.max_new_tokens, a.beta, seed=a.seed, out=a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
