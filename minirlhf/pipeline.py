"""The whole lecture in one command: SFT → preference pairs → reward model → PPO → PPO with β = 0
→ DPO, on the built-in world, then a table, DIR/summary.json and figures.

    python -m minirlhf.pipeline --out out/pipeline             # ~10 min on 2 CPU cores
    python -m minirlhf.pipeline --out out/quick --quick        # a smoke run, under a minute
    python -m minirlhf.pipeline --out out/pipeline --overwrite # start over in a used folder
    python -m minirlhf.pipeline --out out/pipeline --sweep     # + several β for PPO and DPO

Every stage runs through the same `train(cfg)` function as its top-level script, and the
equivalent command line is printed before it starts, so any stage can be rerun alone. The
reward-model stage is two commands: `train_rm.py --make-pairs --pairs-only` writes the preference
pairs, then `train_rm.py` trains on them (so that a resumed run can keep finished pairs and still
start the reward model from the random state an uninterrupted run starts it from).
All policies are judged the same way: 16 samples per held-out test prompt at temperature 1
(what RLHF optimises; docs/design.md), with greedy numbers beside them in each stage's eval.json.

summary.json holds {"world", "sft", "rm", "ppo", "ppo_no_kl", "dpo", "total_seconds", "quick"}
(see the keys below; "quick" is true for a smoke run, whose numbers mean nothing), plus
"frontier" (gold vs KL points), "gap_closed" per method (the fraction of the SFT → optimum gold
gap a policy closes) and "kl_optimum": gold and KL of the closed-form optimum
π_SFT·exp(r/β)/Z of lecture ch. 5 at several β, r the labeller's own utility — where PPO and DPO
would end at their β with a perfect reward model (estimated by reweighting 32 SFT samples per
test prompt, minirlhf/evaluate.py `kl_optimum`), and the same optimum with the trained reward
model's score in place of the labeller's ("reward_model"): where PPO at its β would end with the
reward model it has, however well it optimised.
Left out: hyper-parameter search (the defaults were chosen by hand for this world and machine).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import train_dpo
import train_ppo
import train_rm
import train_sft

from .config import OneLineParser
from .report import draw_all
from .checkpoint import load_stage
from .device import autocast, resolve_device, set_precision
from .training import run_files, write_json
from .evaluate import kl_optimum
from .world import World
from .world import stats as world_stats

SCRIPTS = {train_sft.SFTConfig: "train_sft.py", train_rm.RMConfig: "train_rm.py",
           train_ppo.PPOConfig: "train_ppo.py", train_dpo.DPOConfig: "train_dpo.py"}


SMOKE = ("SMOKE RUN (--quick): tiny models and a few steps per stage, not trained to quality:\n"
         "its numbers mean nothing beyond 'every stage runs'. Drop --quick for the real pipeline\n"
         "(~10 min on 2 CPU cores).")


def command_line(cfg) -> str:
    """The shell command that runs this config alone: the script plus every non-default flag."""
    default = type(cfg)()
    flags = []
    for f in dataclasses.fields(cfg):
        value, base = getattr(cfg, f.name), getattr(default, f.name)
        if value == base:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags.append(f"{flag} {value}")
    return " ".join(["python", SCRIPTS[type(cfg)]] + flags)


def quick(cfg):
    """Tiny settings for a smoke run (used by the test suite): no quality targets. Every stage
    saves a checkpoint before its last one, so that the tests can stop each stage midway."""
    small = {"SFTConfig": dict(n_layer=2, n_head=2, n_embd=64, max_steps=60, n_examples=2000,
                               batch_size=32, log_every=20, eval_every=60, ckpt_every=30,
                               n_show=0, max_new_tokens=24),
             "RMConfig": dict(n_pairs=128, n_val_pairs=32, n_test_pairs=64, max_steps=16,
                              batch_size=16, eval_every=8, max_new_tokens=24),
             "PPOConfig": dict(iterations=3, prompts_per_iter=4, samples_per_prompt=2,
                               max_new_tokens=24, eval_every=3, ckpt_every=2, minibatch_size=8),
             "DPOConfig": dict(max_steps=10, batch_size=16, eval_every=5, ckpt_every=5,
                               max_new_tokens=24)}[type(cfg).__name__]
    return dataclasses.replace(cfg, **small)


def run_stage(name, module, cfg, results, timings):
    print(f"\n=== {name} ===", flush=True)
    t0, pairs = time.time(), {}
    if isinstance(cfg, train_rm.RMConfig):  # the pairs first, by the same script, then training
        pairs_cfg = dataclasses.replace(cfg, make_pairs=True, pairs_only=True)
        print(f"$ {command_line(pairs_cfg)}", flush=True)
        pairs = module.train(pairs_cfg, SCRIPTS[type(cfg)])
    print(f"$ {command_line(cfg)}", flush=True)
    results[name] = {**pairs, **module.train(cfg, SCRIPTS[type(cfg)])}
    timings[name] = time.time() - t0
    return results[name]


def parse_args(argv=None):
    """The flags, checked before any stage starts: --out must be a folder (or nothing yet), every
    stage's config must pass its script's own checks (`check()`: ranges, --seed in
    [0, 2**32)), a used --out needs --overwrite. Each failure: one line, exit 2."""
    parser = OneLineParser(prog="python -m minirlhf.pipeline",
                           description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/pipeline",
                        help="folder for every stage and the report")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny settings, under a minute; the numbers mean nothing")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a used --out: every stage's run files are replaced")
    parser.add_argument("--verbose", action="store_true",
                        help="every stage prints its whole config at start")
    parser.add_argument("--sweep", action="store_true", help="also PPO and DPO at several β")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 on CUDA and bf16-native CPUs (minirlhf/device.py)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("the pipeline runs in one process; run the train_*.py scripts under torchrun")
    try:
        check_configs(args, stage_configs(args))
    except ValueError as e:
        parser.error(str(e))
    used = [os.path.join(stage, name) for stage in MODULES
            for name in run_files(os.path.join(args.out, stage))]
    used += run_files(args.out, ("summary.json",))
    if used and not args.overwrite:
        parser.error(f"{args.out} already holds a pipeline run ({used[0]}); pass --overwrite to "
                     f"start over")
    return args


def check_configs(args, cfgs: dict) -> None:
    """ValueError for the first problem: --out (and each stage's folder) must be a folder or not
    exist yet; every stage's config must pass its script's `check()`, as on its command line."""
    if not args.out.strip():
        raise ValueError(f"--out must name a folder, not {args.out!r}")
    for path in [args.out] + [cfg.out for cfg in cfgs.values()]:
        existing = os.path.abspath(path)
        while not os.path.exists(existing):  # the nearest part of the path that exists
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            where = args.out if existing == os.path.abspath(args.out) else existing
            raise ValueError(f"--out {args.out}: {where} is a file, not a folder")
    for cfg in cfgs.values():
        if hasattr(cfg, "check"):
            cfg.check()


def stage_configs(args) -> dict:
    """Every stage's config, each reading the folders of the stages before it."""
    out = args.out
    common = dict(device=args.device, precision=args.precision, seed=args.seed,
                  overwrite=args.overwrite, verbose=args.verbose)
    shrink = quick if args.quick else (lambda c: c)
    ppo = shrink(train_ppo.PPOConfig(out=f"{out}/ppo", sft=f"{out}/sft", rm=f"{out}/rm",
                                     **common))
    # β = 0 stops at 40 iterations: by then proxy and gold have plainly diverged (docs/results.md)
    hack = dataclasses.replace(ppo, out=f"{out}/ppo_no_kl", kl_coef=0.0,
                               iterations=min(ppo.iterations, 40))
    return {"sft": shrink(train_sft.SFTConfig(out=f"{out}/sft", **common)),
            # the reward model trains on the pairs in its folder; `run_stage` makes them first
            "rm": shrink(train_rm.RMConfig(out=f"{out}/rm", sft=f"{out}/sft", **common)),
            "ppo": ppo, "ppo_no_kl": hack,
            "dpo": shrink(train_dpo.DPOConfig(out=f"{out}/dpo", sft=f"{out}/sft",
                                              data=f"{out}/rm/prefs.jsonl", **common))}


MODULES = {"sft": train_sft, "rm": train_rm, "ppo": train_ppo, "ppo_no_kl": train_ppo,
           "dpo": train_dpo}


def closed_form_optimum(args, ppo_cfg, dpo_cfg) -> list[dict]:
    """The closed-form optimum of max E[r] − β·KL(π‖π_SFT) at several β (minirlhf/evaluate.py
    `kl_optimum`), r the labeller's utility: what PPO and DPO could reach at their β with a
    perfect reward model; and with r = PPO's reward (the trained reward model plus the no-end
    penalty): what PPO can reach with the reward model it was given."""
    device = resolve_device(args.device)
    set_precision(args.precision)  # the reward model scores as it did in PPO's rollouts
    sft_policy, tok, _ = load_stage(f"{args.out}/sft", "gpt", device)
    reward_model = load_stage(f"{args.out}/rm", "scalar", device)[0].eval()

    def ppo_reward(tokens, attn_mask, ended):  # as PPO's rollout scores a response (train_ppo.py)
        with autocast(device):
            score = reward_model.score(tokens, attn_mask).float()
        return score + ppo_cfg.no_end_penalty * (~ended).float()

    betas = sorted({0.1, 0.2, 0.5, 1.0, 2.0, 4.0, ppo_cfg.kl_coef, dpo_cfg.beta})
    return kl_optimum(sft_policy, tok, World(args.seed).test_prompts, betas,
                      samples_per_prompt=8 if args.quick else 32,
                      max_new_tokens=ppo_cfg.max_new_tokens, seed=args.seed, reward=ppo_reward)


def summarize(results: dict, timings: dict, world: dict) -> dict:
    """summary.json's stage rows and the gap each method closes, from the stages' results."""
    sft, rm, ppo, hack, dpo = (results[k] for k in ("sft", "rm", "ppo", "ppo_no_kl", "dpo"))
    mixture = world["styles"]["mixture"]
    summary = {
        "world": {"demonstrators_gold": mixture["gold"],
                  "demonstrators_accuracy": mixture["accuracy"],
                  "optimum_gold": world["optimum"], "n_test_prompts": world["n_prompts"]["test"],
                  "demonstrator_pairs_bayes_accuracy": world["bayes_accuracy"]},
        "sft": {"gold": sft["sampled"]["gold"], "accuracy": sft["sampled"]["accuracy"],
                "greedy_gold": sft["greedy"]["gold"],
                "greedy_accuracy": sft["greedy"]["accuracy"], "kl": 0.0,
                "seconds": timings["sft"]},
        "rm": {"test_accuracy": rm.get("test_accuracy"),
               "bayes_accuracy": rm.get("bayes_accuracy"),
               "expected_accuracy": rm.get("test_expected_accuracy"),
               "shortfall": {k: v["points_lost"]
                             for k, v in rm.get("test_shortfall", {}).items()},
               "n_pairs": rm["n_train_pairs"], "seconds": timings["rm"]},
        "ppo": {"gold": ppo["sampled"]["gold"], "accuracy": ppo["sampled"]["accuracy"],
                "kl": ppo["sampled"]["kl"], "proxy": ppo["test_proxy"],
                "greedy_gold": ppo["greedy"]["gold"], "seconds": timings["ppo"]},
        "ppo_no_kl": {"gold": hack["sampled"]["gold"], "accuracy": hack["sampled"]["accuracy"],
                      "proxy": hack["test_proxy"], "kl": hack["sampled"]["kl"],
                      "seconds": timings["ppo_no_kl"]},
        "dpo": {"gold": dpo["sampled"]["gold"], "accuracy": dpo["sampled"]["accuracy"],
                "kl": dpo["sampled"]["kl"],
                "implicit_accuracy": dpo.get("test_pairs", {}).get("accuracy"),
                "greedy_gold": dpo["greedy"]["gold"], "seconds": timings["dpo"]},
    }
    summary["gap_closed"] = {m: gap_closed(summary, summary[m]["gold"])
                             for m in ("ppo", "ppo_no_kl", "dpo")}
    return summary


def gap_closed(summary: dict, gold: float) -> float | None:
    """(gold − gold_SFT) / (optimum − gold_SFT): the fraction of the SFT → optimum gap closed."""
    gap = summary["world"]["optimum_gold"] - summary["sft"]["gold"]
    return (gold - summary["sft"]["gold"]) / gap if gap > 0 else None


def frontier_points(summary: dict, cfgs: dict, args, results: dict, timings: dict) -> list:
    """Gold against KL for every policy; --sweep trains PPO and DPO at more β for it."""
    ppo_cfg, dpo_cfg = cfgs["ppo"], cfgs["dpo"]
    frontier = [{"method": "SFT", "kl": 0.0, "gold": summary["sft"]["gold"]},
                {"method": "PPO", "kl": summary["ppo"]["kl"], "gold": summary["ppo"]["gold"],
                 "label": f"β={ppo_cfg.kl_coef:g}"},
                {"method": "PPO β=0", "kl": summary["ppo_no_kl"]["kl"],
                 "gold": summary["ppo_no_kl"]["gold"]},
                {"method": "DPO", "kl": summary["dpo"]["kl"], "gold": summary["dpo"]["gold"],
                 "label": f"β={dpo_cfg.beta:g}"}]
    if not args.sweep:
        return frontier
    sweep = [("PPO", train_ppo, ppo_cfg, "kl_coef", beta) for beta in (0.01, 0.02, 0.1, 0.5)]
    sweep += [("DPO", train_dpo, dpo_cfg, "beta", beta) for beta in (0.1, 1.0, 3.0)]
    for method, module, base, field, beta in sweep:
        cfg = dataclasses.replace(base, out=f"{args.out}/sweep/{method.lower()}_beta{beta:g}",
                                  **{field: beta})
        r = run_stage(f"{method.lower()} β={beta:g}", module, cfg, results, timings)
        frontier.append({"method": method, "kl": r["sampled"]["kl"],
                         "gold": r["sampled"]["gold"], "label": f"β={beta:g}"})
    return frontier


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        print(SMOKE, flush=True)
    t_start, results, timings = time.time(), {}, {}
    cfgs = stage_configs(args)
    for name, cfg in cfgs.items():  # SFT -> RM -> PPO -> PPO β = 0 -> DPO
        run_stage(name, MODULES[name], cfg, results, timings)
    world = world_stats(args.seed, per_prompt=10 if args.quick else 50)
    t0 = time.time()
    curve = closed_form_optimum(args, cfgs["ppo"], cfgs["dpo"])
    timings["kl_optimum"] = time.time() - t0
    summary = summarize(results, timings, world)
    summary["quick"] = args.quick  # a smoke run: its numbers say the code runs, nothing more
    frontier = frontier_points(summary, cfgs, args, results, timings)
    summary["frontier"] = frontier
    summary["kl_optimum"] = {"points": curve, "seconds": timings["kl_optimum"],
                             "ppo": next(c for c in curve if c["beta"] == cfgs["ppo"].kl_coef),
                             "dpo": next(c for c in curve if c["beta"] == cfgs["dpo"].beta)}
    for point in (summary["kl_optimum"]["ppo"], summary["kl_optimum"]["dpo"],
                  summary["kl_optimum"]["ppo"]["reward_model"]):
        point["gap_closed"] = gap_closed(summary, point["gold"])
    summary["total_seconds"] = time.time() - t_start
    os.makedirs(args.out, exist_ok=True)
    figures = draw_all(args.out, summary, frontier, curve)
    write_json(os.path.join(args.out, "summary.json"), summary)
    print_table(summary)
    print("figures: " + ", ".join(figures))
    print(f"summary: {os.path.join(args.out, 'summary.json')}")
    return summary


def print_table(s: dict) -> None:
    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "—"
    w = s["world"]
    if s.get("quick"):
        print(f"\n{SMOKE}")
    print(f"\nbuilt-in world: {w['n_test_prompts']} test prompts | demonstrators gold "
          f"{w['demonstrators_gold']:.3f}, accuracy {w['demonstrators_accuracy']:.3f} | "
          f"optimum {w['optimum_gold']:.2f}   (policies sampled at temperature 1)")
    print(f"{'stage':<11} {'gold':>7} {'accuracy':>9} {'KL to SFT':>10} {'RM/implicit acc':>16} "
          f"{'gap closed':>11} {'seconds':>8}")
    rows = [("SFT", s["sft"], None, None),
            ("RM", {}, s["rm"]["test_accuracy"], None),
            ("PPO", s["ppo"], None, s["gap_closed"]["ppo"]),
            ("PPO β=0", s["ppo_no_kl"], None, s["gap_closed"]["ppo_no_kl"]),
            ("DPO", s["dpo"], s["dpo"].get("implicit_accuracy"), s["gap_closed"]["dpo"])]
    for name, r, acc2, gap in rows:
        extra = ""
        if name == "RM":
            extra = (f"  (expected {f(s['rm'].get('expected_accuracy'), '.3f')}, "
                     f"Bayes limit {f(s['rm']['bayes_accuracy'], '.3f')})")
        seconds = (s["rm"] if name == "RM" else r).get("seconds")
        print(f"{name:<11} {f(r.get('gold'), '7.3f'):>7} {f(r.get('accuracy'), '9.3f'):>9} "
              f"{f(r.get('kl'), '10.2f'):>10} {f(acc2, '16.3f'):>16} {f(gap, '11.2f'):>11} "
              f"{f(seconds, '8.0f'):>8}{extra}")
    print(f"proxy reward (RM) on test prompts: PPO {s['ppo']['proxy']:+.3f}, "
          f"PPO β=0 {s['ppo_no_kl']['proxy']:+.3f} | total {s['total_seconds']:.0f} s")
    if "kl_optimum" in s:
        o = s["kl_optimum"]
        print("closed-form optimum π_SFT·exp(r/β)/Z with the labeller's own reward (what a "
              "perfect reward model would allow):\n  " + " | ".join(
                  f"{name} β={o[m]['beta']:g}: gold {o[m]['gold']:.3f}, KL {o[m]['kl']:.2f}, "
                  f"gap closed {f(o[m]['gap_closed'], '.2f')}"
                  for name, m in (("PPO", "ppo"), ("DPO", "dpo"))))
        r = o["ppo"].get("reward_model")
        if r:
            print(f"  with PPO's reward (the trained reward model) instead: PPO "
                  f"β={o['ppo']['beta']:g}: gold {r['gold']:.3f}, KL {r['kl']:.2f}, gap closed "
                  f"{f(r['gap_closed'], '.2f')}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
