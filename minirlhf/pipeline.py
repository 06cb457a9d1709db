"""The whole lecture in one command: SFT → preference pairs → reward model → PPO → PPO with β = 0
→ DPO, on the built-in world, then a table, DIR/summary.json and figures.

    python -m minirlhf.pipeline --out out/pipeline             # ~10 min on 2 CPU cores
    python -m minirlhf.pipeline --out out/quick --quick        # a smoke run, under a minute
    python -m minirlhf.pipeline --out out/pipeline --resume    # continue a stopped run
    python -m minirlhf.pipeline --out out/pipeline --overwrite # start over in a used folder
    python -m minirlhf.pipeline --out out/pipeline --sweep     # + several β for PPO and DPO
    python -m minirlhf.pipeline --out out/pipeline --all       # + the methods beyond the RM
    python -m minirlhf.pipeline --out out/pipeline --all --judge-pairs 2000 4000 16000

Every stage runs through the same `train(cfg)` function as its top-level script, and the
equivalent command line is printed before it starts, so any stage can be rerun alone. The
reward-model stage samples its preference pairs and trains on them in one command
(`train_rm.py --make-pairs`); resumed from its checkpoint it keeps its pairs, and started over it
samples them again (the same pairs: the seed decides them), so that its reward model starts from
the random state an uninterrupted run starts it from.
All policies are judged the same way: 16 samples per held-out test prompt at temperature 1
(what RLHF optimises; docs/design.md), with greedy numbers beside them in each stage's eval.json.

--resume continues a run stopped at any moment (`plan_stages`). A stage whose outputs are
complete — its eval.json (written last), a checkpoint.pt that loads (its SHA-256 trailer is
checked, minirlhf/checkpoint.py) and, for the reward model, the three prefs*.jsonl at their full
length — is skipped, its results read back from eval.json; a stage stopped midway continues with
its script's own --resume; the rest run fresh. A stage whose checkpoint does not load (damaged)
is trained again from scratch, and so is every stage that reads it. Resuming with other flags
than the run was started with is refused (each stage's config.json must match). summary.json
then holds the numbers of an uninterrupted run, all but the wall-clock seconds.

summary.json holds {"world", "sft", "rm", "ppo", "ppo_no_kl", "dpo", "total_seconds", "quick"}
(see the keys below; "quick" is true for a smoke run, whose numbers mean nothing), plus
"frontier" (gold vs KL points), "gap_closed" per method (the fraction of the SFT → optimum gold
gap a policy closes) and "kl_optimum": gold and KL of the closed-form optimum
π_SFT·exp(r/β)/Z of lecture ch. 5 at several β, r the labeller's own utility — where PPO and DPO
would end at their β with a perfect reward model (estimated by reweighting 32 SFT samples per
test prompt, minirlhf/evaluate.py `kl_optimum`), and the same optimum with the trained reward
model's score in place of the labeller's ("reward_model"): where PPO at its β would end with the
reward model it has, however well it optimised.

Seconds in summary.json: a stage's "seconds" is the wall-clock time the pipeline spent on it,
which it also records in the stage's eval.json ("pipeline_seconds"). After --resume, a skipped
stage reports the seconds recorded there (a stage without them: its script's "train_seconds",
the training loop only), a continued stage only the time since it was resumed, and
"total_seconds" the time of this invocation alone.

--all adds, after the five stages, the methods beyond the reward model, each with the PPO
stage's settings but its own training signal: PPO with the gold judge as the reward ("ppo_gold":
a perfect labeller, the bound the reward model is measured against), RFT — PPO with the verifier,
1 for a right answer ("rft") —, GRPO with the verifier and with the reward model ("grpo",
"grpo_rm": no value model, the KL a k3 term in the loss), and RLAIF per --judge-pairs N: a judge
(a reward model trained on N human-labelled pairs) labels the reward model's 48000 pairs, a
reward model is trained on its labels and PPO optimises that ("judge_N", "rm_ai_N", "rlaif_N"
in rlaif_N/). summary.json then also holds those keys (gold, accuracy, kl, seconds, and the
median "update_seconds" of one update phase) and "rlaif" (the 4000-pair judge's, else the first:
judge_agreement with the human labels, human_agreement of two human labellers, the judge's and
the RLAIF reward model's test accuracy beside the Bayes limit) and "rlaif_curve", one such point
per judge; and "best_of_n": the reward model keeping the best of n SFT samples, n = 1 ... 64
(gold, accuracy, proxy and KL log n − (n − 1)/n per n; minirlhf/best_of_n.py).
--all also runs online DPO ("online_dpo": 4 rounds, each after the first on pairs the policy
writes and the world's labeller labels; its row adds each round's pairs and their answers'
gold, "rounds") and the overoptimization study ("overoptimization", minirlhf/overoptimization.py):
reward models on the first 6000 and 16000 of the RM stage's pairs ("rm_N" in overoptimization/),
and for those and the RM stage's own a PPO run at β = 0.02 ("ppo_rm_N") evaluated every 5
iterations; per reward model the gold and proxy against √KL for best-of-n and for PPO, Gao et
al.'s functional forms fitted to each, and the measured peaks; figures/overoptimization.png.

Left out: hyper-parameter search (the defaults were chosen by hand for this world and machine).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import train_dpo
import train_ppo
import train_rm
import train_sft

from .config import OneLineParser
from .report import draw_all
from .checkpoint import CHECKPOINT, check_stage, load_checkpoint, load_stage
from .device import resolve_device, set_precision
from .errors import CheckpointError, DataError, NonFiniteError, TokenizerError
from .training import PAIRS, RUN_FILES, USED_IF, fail, read_metrics, run_files, write_json
from .best_of_n import best_of_n_curve
from .evaluate import evaluate, kl_optimum, reward_model_scorer
from .overoptimization import study_summary
from .world import World
from .world import stats as world_stats

PROG = "python -m minirlhf.pipeline"
SCRIPTS = {train_sft.SFTConfig: "train_sft.py", train_rm.RMConfig: "train_rm.py",
           train_ppo.PPOConfig: "train_ppo.py", train_dpo.DPOConfig: "train_dpo.py"}
MODULE_OF = {train_sft.SFTConfig: train_sft, train_rm.RMConfig: train_rm,
             train_ppo.PPOConfig: train_ppo, train_dpo.DPOConfig: train_dpo}


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
                               max_new_tokens=24, round_steps=4, round_pairs=32)
             }[type(cfg).__name__]
    return dataclasses.replace(cfg, **small)


def parse_args(argv=None):
    """The flags, checked before any stage starts: --out must be a folder (or nothing yet), every
    stage's config must pass its script's own checks (`check()`: ranges, --seed in
    [0, 2**32)), a used --out needs --resume or --overwrite. Each failure: one line, exit 2."""
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="out/pipeline",
                        help="folder for every stage and the report")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny settings, under a minute; the numbers mean nothing")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped run in --out: finished stages are skipped, a "
                             "stopped one continues from its checkpoint, the rest run")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a used --out: every stage's run files are replaced")
    parser.add_argument("--verbose", action="store_true",
                        help="every stage prints its whole config at start")
    parser.add_argument("--sweep", action="store_true", help="also PPO and DPO at several β")
    parser.add_argument("--all", action="store_true",
                        help="also the methods beyond the reward model: PPO with the gold "
                             "reward, RFT and GRPO with the verifier, GRPO with the reward "
                             "model, RLAIF, online DPO, best-of-n, and the overoptimization "
                             "study (~27 min in all on 2 CPU cores)")
    parser.add_argument("--judge-pairs", type=int, nargs="+", default=[4000], metavar="N",
                        help="with --all: RLAIF judges trained on N human pairs each (default "
                             "4000); several N draw the curve of judge quality")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 on CUDA and bf16-native CPUs (minirlhf/device.py)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("the pipeline runs in one process; run the train_*.py scripts under torchrun")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out, --overwrite starts it over: give one")
    if args.judge_pairs != [4000] and not args.all:
        parser.error("--judge-pairs needs --all")
    if any(n < 1 for n in args.judge_pairs) or len(set(args.judge_pairs)) < len(args.judge_pairs):
        parser.error(f"--judge-pairs must be distinct positive counts, not {args.judge_pairs}")
    try:
        cfgs = stage_configs(args)
        check_configs(args, cfgs)
    except ValueError as e:
        parser.error(str(e))
    used = [os.path.join(os.path.relpath(cfg.out, args.out), name) for cfg in cfgs.values()
            for name in run_files(cfg.out)]
    used += run_files(args.out, ("summary.json",))
    if used and not (args.overwrite or args.resume):
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
    """Every stage's config, each reading the folders of the stages before it; with --sweep
    also PPO and DPO at several β (named "ppo β=0.01" and so on), after the five stages."""
    out = args.out
    common = dict(device=args.device, precision=args.precision, seed=args.seed,
                  overwrite=args.overwrite, verbose=args.verbose)
    shrink = quick if args.quick else (lambda c: c)
    ppo = shrink(train_ppo.PPOConfig(out=f"{out}/ppo", sft=f"{out}/sft", rm=f"{out}/rm",
                                     **common))
    # β = 0 stops at 40 iterations: by then proxy and gold have plainly diverged (docs/results.md)
    hack = dataclasses.replace(ppo, out=f"{out}/ppo_no_kl", kl_coef=0.0,
                               iterations=min(ppo.iterations, 40))
    dpo = shrink(train_dpo.DPOConfig(out=f"{out}/dpo", sft=f"{out}/sft",
                                     data=f"{out}/rm/prefs.jsonl", **common))
    rm = shrink(train_rm.RMConfig(out=f"{out}/rm", sft=f"{out}/sft", make_pairs=True, **common))
    cfgs = {"sft": shrink(train_sft.SFTConfig(out=f"{out}/sft", **common)), "rm": rm,
            "ppo": ppo, "ppo_no_kl": hack, "dpo": dpo}
    if args.all:
        cfgs.update(beyond_the_reward_model(args, ppo, rm))
        cfgs.update(online_dpo_and_overoptimization(args, ppo, rm, dpo))
    if args.sweep:
        for method, base, field, betas in (("ppo", ppo, "kl_coef", (0.01, 0.02, 0.1, 0.5)),
                                           ("dpo", dpo, "beta", (0.1, 1.0, 3.0))):
            for beta in betas:
                cfgs[f"{method} β={beta:g}"] = dataclasses.replace(
                    base, out=f"{out}/sweep/{method}_beta{beta:g}", **{field: beta})
    return cfgs


def beyond_the_reward_model(args, ppo, rm) -> dict:
    """--all's stages: PPO with the gold reward (a perfect labeller), RFT (PPO with the
    verifier), GRPO with the verifier and with the reward model, and for each --judge-pairs N
    RLAIF: a judge (a reward model on N human pairs) labels the reward model's pairs, a reward
    model learns from its labels, PPO optimises that reward model."""
    out = args.out
    cfgs = {"ppo_gold": dataclasses.replace(ppo, out=f"{out}/ppo_gold", reward="gold"),
            "rft": dataclasses.replace(ppo, out=f"{out}/rft", reward="verifier"),
            "grpo": dataclasses.replace(ppo, out=f"{out}/grpo", reward="verifier",
                                        advantage="grpo"),
            "grpo_rm": dataclasses.replace(ppo, out=f"{out}/grpo_rm", advantage="grpo")}
    for n in args.judge_pairs:
        folder = f"{out}/rlaif_{n}"
        # a judge of N human pairs overfits them early: validated every 100 steps, best kept
        n_judge = min(n, rm.n_pairs) if args.quick else n
        cfgs[f"judge_{n}"] = dataclasses.replace(rm, out=f"{folder}/judge", n_pairs=n_judge,
                                                 eval_every=min(rm.eval_every, 100))
        cfgs[f"rm_ai_{n}"] = dataclasses.replace(
            rm, out=f"{folder}/rm", make_pairs=False, data=f"{out}/rm/prefs.jsonl",
            val_data=f"{out}/rm/prefs_val.jsonl", test_data=f"{out}/rm/prefs_test.jsonl",
            labeller=f"ai:{folder}/judge")
        cfgs[f"rlaif_{n}"] = dataclasses.replace(ppo, out=f"{folder}/ppo", rm=f"{folder}/rm")
    return cfgs


# --all's overoptimization study: reward models on the first N of the RM stage's pairs (and the
# RM stage's own), each optimised by a long PPO run at a small β, evaluated every few iterations.
OVEROPT_PAIRS = (6000, 16000)
OVEROPT_PPO = dict(kl_coef=0.02, iterations=60, eval_every=5, eval_repeats=8, ckpt_every=20)


def online_dpo_and_overoptimization(args, ppo, rm, dpo) -> dict:
    """--all's online DPO (4 rounds, π_ref the policy that wrote each round's pairs) and the
    overoptimization study's stages: "rm_N", a reward model on the first N of the RM stage's
    pairs (about 4 epochs, validated 5 times, the best kept), and "ppo_rm_N" for each N and the
    RM stage's own, PPO at β = 0.02 evaluated every 5 iterations on 8 samples of each
    validation prompt."""
    out = args.out
    cfgs = {"online_dpo": dataclasses.replace(dpo, out=f"{out}/online_dpo", rounds=4)}
    long_run = {"kl_coef": OVEROPT_PPO["kl_coef"]} if args.quick else OVEROPT_PPO
    for n in overoptimization_sizes(args, rm):
        rm_dir = rm.out if n == rm.n_pairs else f"{out}/overoptimization/rm_{n}"
        if n != rm.n_pairs:
            steps = min(rm.max_steps, max(2, 4 * n // rm.batch_size))
            cfgs[f"rm_{n}"] = dataclasses.replace(
                rm, out=rm_dir, make_pairs=False, data=f"{out}/rm/prefs.jsonl",
                val_data=f"{out}/rm/prefs_val.jsonl", test_data=f"{out}/rm/prefs_test.jsonl",
                max_pairs=n, max_steps=steps, eval_every=max(1, steps // 5))
        cfgs[f"ppo_rm_{n}"] = dataclasses.replace(
            ppo, out=f"{out}/overoptimization/ppo_{n}", rm=rm_dir, **long_run)
    return cfgs


def overoptimization_sizes(args, rm) -> list[int]:
    """The training pairs of the study's reward models: 6000, 16000 and the RM stage's 48000
    (with --quick a quarter, a half and all of its pairs)."""
    small = (rm.n_pairs // 4, rm.n_pairs // 2) if args.quick else OVEROPT_PAIRS
    return sorted({n for n in small if n < rm.n_pairs} | {rm.n_pairs})


def reads(name: str, cfgs: dict) -> tuple[str, ...]:
    """The stages whose folders a stage reads: those its path flags name (--sft, --rm, the
    folders of --data and its kin, a judge's folder)."""
    cfg = cfgs[name]
    paths = [getattr(cfg, f, None) for f in ("sft", "policy")]
    if not isinstance(cfg, train_ppo.PPOConfig) or cfg.reward == "rm":
        paths.append(getattr(cfg, "rm", None))
    paths += [os.path.dirname(p) for p in (getattr(cfg, f, None) for f in
                                           ("data", "val_data", "test_data")) if p]
    labeller = getattr(cfg, "labeller", "human")
    if labeller.startswith("ai:"):
        paths.append(labeller[3:])
    paths = {os.path.normpath(p) for p in paths if p}
    return tuple(other for other, c in cfgs.items()
                 if other != name and os.path.normpath(c.out) in paths)


# ----------------------------------------------------------------------------------------------
# --resume: what each stage's folder holds, and so what to do with it
# ----------------------------------------------------------------------------------------------

# train_rm.py make_pairs_main writes PAIRS (minirlhf/training.py) in this order, each atomically
# (data.write_jsonl), with exactly the number of rows its flags ask for: complete pairs are three
# files of those lengths.
PAIR_COUNTS = dict(zip(PAIRS, ("n_pairs", "n_val_pairs", "n_test_pairs")))
# Fields the pipeline sets per run, or from --out: a run moved to another folder still resumes.
NOT_COMPARED = {"resume", "overwrite", "verbose", "make_pairs", "pairs_only", "out", "sft", "rm",
                "data", "val_data", "test_data", "labeller"}


@dataclasses.dataclass
class Plan:
    """What `run_stage` does with a stage: "skip" it (its results are read back from eval.json),
    or train it, continuing its checkpoint (resume) or starting over in its folder (overwrite);
    make_pairs: the reward-model stage samples its preference pairs first. note: printed first."""
    action: str = "train"
    resume: bool = False
    overwrite: bool = False
    make_pairs: bool = True
    note: str = ""


def plan_stages(args, cfgs: dict) -> dict[str, Plan]:
    """The plan of every stage. Without --resume: train each (--overwrite passed on). With it, in
    order: a stage is skipped when its outputs are complete (`stage_state`) and every stage it
    reads was skipped too; else it continues its checkpoint if there is one that loads; else it
    starts over — in a used folder with --overwrite, as it must when its checkpoint is damaged
    or a stage it reads is trained again. ValueError when a stage was run with other flags."""
    if not args.resume:
        return {name: Plan(overwrite=args.overwrite) for name in cfgs}
    plans: dict[str, Plan] = {}
    for name, cfg in cfgs.items():
        check_same_flags(cfg)
        redone = [d for d in reads(name, cfgs) if plans[d].action != "skip"]
        used = bool(run_files(cfg.out, USED_IF))
        state, why = stage_state(cfg)
        # the reward model's pairs, when complete and made from the SFT model that is kept
        makes_pairs = isinstance(cfg, train_rm.RMConfig) and cfg.make_pairs
        keep_pairs = makes_pairs and not redone and bool(pairs_complete(cfg))
        if redone:  # its inputs are made again: what its folder holds was made from the old ones
            plans[name] = Plan(overwrite=used, note=(
                f"{name} starts over: it reads {redone[0]}, which is trained again above"
                if state != "empty" else ""))
        elif state == "complete":
            plans[name] = Plan("skip", note=f"skipped: {why}")
        elif state == "damaged":
            plans[name] = Plan(overwrite=True, note=f"{why}: training {name} again from scratch")
        elif makes_pairs and used and not keep_pairs:
            plans[name] = Plan(overwrite=True, note=f"{cfg.out}: its preference pairs are "
                               f"incomplete: making them and training {name} again")
        else:  # stopped midway: continued from its checkpoint; or not started yet
            plans[name] = Plan(resume=used, make_pairs=not used, note=why)
    return plans


def check_same_flags(cfg) -> None:
    """ValueError if the stage's folder holds a run of another config (OUT/config.json, written
    at its start and with every checkpoint), naming the first field that differs."""
    try:
        with open(os.path.join(cfg.out, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return  # not started yet (or a config.json that its own run will write again)
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))
    for key, value in want.items():
        if key not in NOT_COMPARED and key in saved and saved[key] != value:
            raise ValueError(f"--resume: {cfg.out} was run with {key} = {saved[key]!r}, this run "
                             f"would use {value!r}: resume with the flags it was started with "
                             f"(--quick, --seed, ...), or pass --overwrite to start over")


def stage_state(cfg) -> tuple[str, str]:
    """(state, why) of a stage's folder: "complete" (eval.json, written last, is there and reads;
    checkpoint.pt loads, SHA-256 checked; the reward model's pairs are complete), "damaged" (a
    checkpoint.pt, or the reward model's best.pt, that does not load), "stopped" (a run without
    its eval.json: it continues from its checkpoint) or "empty"."""
    script, step = SCRIPTS[type(cfg)], None
    for name in (CHECKPOINT, "best.pt") if isinstance(cfg, train_rm.RMConfig) else (CHECKPOINT,):
        path = os.path.join(cfg.out, name)
        if os.path.exists(path):
            try:
                ck = load_checkpoint(path)
                check_stage(ck, path, script)
            except CheckpointError as e:
                return "damaged", str(e)
            step = ck["step"] if name == CHECKPOINT else step
    if not run_files(cfg.out, USED_IF):
        return "empty", ""
    if step is None:
        return "stopped", f"{cfg.out} holds a run stopped before its first checkpoint"
    if read_eval(cfg.out) is None:
        return "stopped", (f"resuming {cfg.out} from its {CHECKPOINT} (step {step}): the run "
                           f"stopped before it wrote eval.json")
    if isinstance(cfg, train_rm.RMConfig) and cfg.make_pairs and not pairs_complete(cfg):
        return "stopped", f"{cfg.out} is finished but its preference pairs are incomplete"
    return "complete", (f"{cfg.out} is complete (eval.json; {CHECKPOINT} loads): its results "
                        f"are read from eval.json")


def read_eval(folder: str) -> dict | None:
    """OUT/eval.json, or None if it is missing or does not read as a JSON object."""
    try:
        with open(os.path.join(folder, "eval.json")) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None


def pairs_complete(cfg) -> dict | None:
    """{file: rows} when the three preference files hold the rows the config asks for."""
    counts = {}
    for name, field in PAIR_COUNTS.items():
        try:
            with open(os.path.join(cfg.out, name), "rb") as f:
                counts[name] = sum(1 for line in f if line.strip())
        except OSError:
            return None
        if counts[name] != getattr(cfg, field):
            return None
    return counts


def recorded_seconds(result: dict) -> float | None:
    """A skipped stage's seconds: what the pipeline recorded in its eval.json, else its script's
    own training-loop seconds (plus the pair sampling of a reward model that made its own)."""
    if "pipeline_seconds" in result:
        return result["pipeline_seconds"]
    seconds = result.get("train_seconds")
    pairs = result.get("make_pairs", {}).get("seconds")
    return seconds + pairs if seconds is not None and pairs is not None else seconds


# ----------------------------------------------------------------------------------------------
# Running the stages
# ----------------------------------------------------------------------------------------------

def run_stage(name, cfg, plan: Plan, results, timings):
    """Train one stage as its plan says (or read a skipped one's results back), printing the
    command line that does the same alone; record its seconds in its eval.json."""
    print(f"\n=== {name} ===", flush=True)
    if plan.note:
        print(plan.note, flush=True)
    if plan.action == "skip":
        results[name] = read_eval(cfg.out)
        timings[name] = recorded_seconds(results[name])
        return results[name]
    cfg = dataclasses.replace(cfg, resume=plan.resume, overwrite=plan.overwrite)
    module, script = MODULE_OF[type(cfg)], SCRIPTS[type(cfg)]
    t0 = time.time()
    if isinstance(cfg, train_rm.RMConfig) and cfg.make_pairs:  # pairs made when it starts
        cfg = dataclasses.replace(cfg, make_pairs=plan.make_pairs)
        if not plan.make_pairs:
            print(f"preference pairs complete in {cfg.out} ({pairs_complete(cfg)}): kept, not "
                  f"sampled again", flush=True)
    print(f"$ {command_line(cfg)}", flush=True)
    results[name] = module.train(cfg, script)
    timings[name] = time.time() - t0
    ev = read_eval(cfg.out)
    if ev is not None:  # what a later --resume reports as this stage's seconds
        write_json(os.path.join(cfg.out, "eval.json"), {**ev, "pipeline_seconds": timings[name]})
    return results[name]


def clear_old_run(cfgs: dict, out: str) -> None:
    """--overwrite: remove the old run's files from every stage's folder (and its summary)
    before the first stage starts, so that a new run stopped midway resumes with nothing of the
    old one. The reward model's preference pairs go too: the pipeline makes them again."""
    for cfg in cfgs.values():
        makes_pairs = isinstance(cfg, train_rm.RMConfig) and cfg.make_pairs
        names = RUN_FILES + (PAIRS if makes_pairs else ())
        for name in run_files(cfg.out, names):
            os.remove(os.path.join(cfg.out, name))
    for name in run_files(out, ("summary.json",)):
        os.remove(os.path.join(out, name))


def sft_and_reward_model(args):
    """(SFT policy, tokenizer, reward model, device) of the run, for what is computed after the
    stages; the precision set as the stages ran, so the reward model scores as in PPO."""
    device = resolve_device(args.device)
    set_precision(args.precision)
    sft_policy, tok, _ = load_stage(f"{args.out}/sft", "gpt", device)
    reward_model = load_stage(f"{args.out}/rm", "scalar", device)[0].eval()
    return sft_policy.eval(), tok, reward_model, device


def closed_form_optimum(args, ppo_cfg, dpo_cfg, models) -> list[dict]:
    """The closed-form optimum of max E[r] − β·KL(π‖π_SFT) at several β (minirlhf/evaluate.py
    `kl_optimum`), r the labeller's utility: what PPO and DPO could reach at their β with a
    perfect reward model; and with r = PPO's reward (the trained reward model plus the no-end
    penalty, as PPO's rollout scores): what PPO can reach with the reward model it was given.
    models: `sft_and_reward_model`'s."""
    sft_policy, tok, reward_model, device = models
    betas = sorted({0.1, 0.2, 0.5, 1.0, 2.0, 4.0, ppo_cfg.kl_coef, dpo_cfg.beta})
    return kl_optimum(sft_policy, tok, World(args.seed).test_prompts, betas,
                      samples_per_prompt=8 if args.quick else 32,
                      max_new_tokens=ppo_cfg.max_new_tokens, seed=args.seed,
                      reward=reward_model_scorer(reward_model, device, ppo_cfg.no_end_penalty))


def best_of_n(args, ppo_cfg, models) -> dict:
    """--all: best-of-n of the SFT policy with the reward model as selector on the test prompts
    (minirlhf/best_of_n.py), n = 1, 2, 4, ..., 64 (1, 2, 4 with --quick); each point's gold,
    accuracy, the reward model's score of the kept sample and the KL log n − (n − 1)/n."""
    t0 = time.time()
    policy, tok, reward_model, device = models
    ns = [1, 2, 4] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    points = best_of_n_curve(policy, tok, World(args.seed).test_prompts, ns,
                             reward=reward_model_scorer(reward_model, device),
                             max_new_tokens=ppo_cfg.max_new_tokens, seed=args.seed)
    return {"selector": "rm", "points": points, "seconds": time.time() - t0}


def overoptimization(args, cfgs: dict, results: dict, models, main_bon: dict) -> dict:
    """--all's overoptimization study (minirlhf/overoptimization.py). For each reward model:
    best-of-n of the SFT policy with it as the selector (the RM stage's is `best_of_n`'s), and
    its PPO run's evaluations (gold, KL and the reward model's score of --eval-repeats samples
    per validation prompt), led by the SFT policy evaluated the same way as the run's step 0."""
    t0 = time.time()
    sft_policy, tok, main_rm, device = models
    rm_cfg, per_rm = cfgs["rm"], {}
    for n in overoptimization_sizes(args, rm_cfg):
        ppo_cfg = cfgs[f"ppo_rm_{n}"]
        own = n == rm_cfg.n_pairs
        rm_model = main_rm if own else load_stage(ppo_cfg.rm, "scalar", device)[0].eval()
        bon = main_bon if own else best_of_n(args, ppo_cfg, (sft_policy, tok, rm_model, device))
        reward = reward_model_scorer(rm_model, device, ppo_cfg.no_end_penalty)  # as PPO's
        ev = evaluate(sft_policy, tok, World(ppo_cfg.seed).val_prompts,
                      max_new_tokens=ppo_cfg.max_new_tokens, seed=ppo_cfg.seed + 7, reward=reward,
                      repeats=ppo_cfg.eval_repeats)
        start = {"step": 0, "gold": ev["gold"], "accuracy": ev["accuracy"], "kl": 0.0,
                 "reward": ev["reward"]}
        rows = [r for r in read_metrics(os.path.join(ppo_cfg.out, "metrics.jsonl"))
                if r["split"] == "val"]
        per_rm[n] = {"test_accuracy": results["rm" if own else f"rm_{n}"]["test_accuracy"],
                     "best_of_n": bon["points"], "rl": [start] + rows,
                     "beta": ppo_cfg.kl_coef}
    return {**study_summary(per_rm), "seconds": time.time() - t0}


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
                "greedy_gold": ppo["greedy"]["gold"], "seconds": timings["ppo"],
                "update_seconds": ppo["phase_seconds"]["update"]},
        "ppo_no_kl": {"gold": hack["sampled"]["gold"], "accuracy": hack["sampled"]["accuracy"],
                      "proxy": hack["test_proxy"], "kl": hack["sampled"]["kl"],
                      "seconds": timings["ppo_no_kl"]},
        "dpo": {"gold": dpo["sampled"]["gold"], "accuracy": dpo["sampled"]["accuracy"],
                "kl": dpo["sampled"]["kl"],
                "implicit_accuracy": dpo.get("test_pairs", {}).get("accuracy"),
                "greedy_gold": dpo["greedy"]["gold"], "seconds": timings["dpo"]},
    }
    summary.update(beyond_summary(results, timings))
    summary["gap_closed"] = {m: gap_closed(summary, summary[m]["gold"]) for m in
                             ("ppo", "ppo_no_kl", "dpo", "online_dpo") + BEYOND + ("rlaif",)
                             if m in summary}
    return summary


BEYOND = ("ppo_gold", "rft", "grpo", "grpo_rm")  # --all's PPO-family stages, besides RLAIF


def policy_row(r: dict, seconds: float) -> dict:
    """A trained policy's row of summary.json: sampled gold, accuracy, KL to SFT; greedy gold;
    what its own reward says of it on the test prompts; the median update-phase seconds."""
    return {"gold": r["sampled"]["gold"], "accuracy": r["sampled"]["accuracy"],
            "kl": r["sampled"]["kl"], "greedy_gold": r["greedy"]["gold"],
            "proxy": r.get("test_proxy"), "seconds": seconds,
            "update_seconds": r.get("phase_seconds", {}).get("update")}


def beyond_summary(results: dict, timings: dict) -> dict:
    """--all's rows: "ppo_gold", "rft", "grpo", "grpo_rm" (policy rows), and RLAIF per judge:
    "rlaif_curve" [{judge_pairs, judge_test_accuracy, judge_agreement, human_agreement,
    rm_test_accuracy, bayes_accuracy, gold, accuracy, kl, seconds}], "rlaif" its 4000-pair
    point (or its first). seconds: judge + reward model + PPO."""
    rows = {m: policy_row(results[m], timings[m]) for m in BEYOND if m in results}
    if "online_dpo" in results:
        r = results["online_dpo"]
        rows["online_dpo"] = {**policy_row(r, timings["online_dpo"]),
                              "implicit_accuracy": r.get("test_pairs", {}).get("accuracy"),
                              "train_seconds": r["train_seconds"], "rounds": r.get("rounds")}
    curve = []
    for name in results:
        if not name.startswith("judge_"):
            continue
        n = int(name[len("judge_"):])
        judge, rm_ai, ppo = (results[f"{k}_{n}"] for k in ("judge", "rm_ai", "rlaif"))
        labels = rm_ai.get("labels", {})
        curve.append({"judge_pairs": n, "judge_test_accuracy": judge.get("test_accuracy"),
                      "judge_agreement": labels.get("agreement"),
                      "human_agreement": labels.get("human_agreement"),
                      "rm_test_accuracy": rm_ai.get("test_accuracy"),
                      "rm_expected_accuracy": rm_ai.get("test_expected_accuracy"),
                      "bayes_accuracy": rm_ai.get("bayes_accuracy"),
                      **policy_row(ppo, sum(timings[f"{k}_{n}"] for k in
                                            ("judge", "rm_ai", "rlaif")))})
    if curve:
        rows["rlaif_curve"] = sorted(curve, key=lambda c: c["judge_pairs"])
        rows["rlaif"] = next((c for c in curve if c["judge_pairs"] == 4000), curve[0])
    return rows


def gap_closed(summary: dict, gold: float) -> float | None:
    """(gold − gold_SFT) / (optimum − gold_SFT): the fraction of the SFT → optimum gap closed."""
    gap = summary["world"]["optimum_gold"] - summary["sft"]["gold"]
    return (gold - summary["sft"]["gold"]) / gap if gap > 0 else None


def frontier_points(summary: dict, cfgs: dict, results: dict) -> list:
    """Gold against KL for every policy, with --sweep's PPO and DPO at more β."""
    ppo_cfg, dpo_cfg = cfgs["ppo"], cfgs["dpo"]
    frontier = [{"method": "SFT", "kl": 0.0, "gold": summary["sft"]["gold"]},
                {"method": "PPO", "kl": summary["ppo"]["kl"], "gold": summary["ppo"]["gold"],
                 "label": f"β={ppo_cfg.kl_coef:g}"},
                {"method": "PPO β=0", "kl": summary["ppo_no_kl"]["kl"],
                 "gold": summary["ppo_no_kl"]["gold"]},
                {"method": "DPO", "kl": summary["dpo"]["kl"], "gold": summary["dpo"]["gold"],
                 "label": f"β={dpo_cfg.beta:g}"}]
    for key, method in (("ppo_gold", "PPO gold"), ("rft", "RFT"), ("grpo", "GRPO"),
                        ("grpo_rm", "GRPO RM"), ("rlaif", "RLAIF"), ("online_dpo", "DPO online")):
        if key in summary:
            frontier.append({"method": method, "kl": summary[key]["kl"],
                             "gold": summary[key]["gold"]})
    for name in cfgs:
        if " β=" in name:  # a --sweep run: "ppo β=0.01"
            method, beta = name.split(" ")
            r = results[name]
            frontier.append({"method": method.upper(), "kl": r["sampled"]["kl"],
                             "gold": r["sampled"]["gold"], "label": beta})
    return frontier


def main(argv=None):
    args = parse_args(argv)
    cfgs = stage_configs(args)  # SFT -> RM -> PPO -> PPO β = 0 -> DPO (-> --sweep's runs)
    try:
        plans = plan_stages(args, cfgs)  # --resume: what each stage's folder holds
    except ValueError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        raise SystemExit(2)
    if args.quick:
        print(SMOKE, flush=True)
    if args.overwrite:
        clear_old_run(cfgs, args.out)
    try:
        return run_pipeline(args, cfgs, plans)
    except (DataError, CheckpointError, TokenizerError, NonFiniteError,
            train_rm.PairsError) as e:
        fail(PROG, str(e))


def run_pipeline(args, cfgs: dict, plans: dict) -> dict:
    t_start, results, timings = time.time(), {}, {}
    for name, cfg in cfgs.items():
        run_stage(name, cfg, plans[name], results, timings)
    world = world_stats(args.seed, per_prompt=10 if args.quick else 50)
    models = sft_and_reward_model(args)  # the SFT policy and the reward model, loaded once
    t0 = time.time()
    curve = closed_form_optimum(args, cfgs["ppo"], cfgs["dpo"], models)
    timings["kl_optimum"] = time.time() - t0
    summary = summarize(results, timings, world)
    summary["quick"] = args.quick  # a smoke run: its numbers say the code runs, nothing more
    frontier = frontier_points(summary, cfgs, results)
    summary["frontier"] = frontier
    summary["kl_optimum"] = {"points": curve, "seconds": timings["kl_optimum"],
                             "ppo": next(c for c in curve if c["beta"] == cfgs["ppo"].kl_coef),
                             "dpo": next(c for c in curve if c["beta"] == cfgs["dpo"].beta)}
    for point in (summary["kl_optimum"]["ppo"], summary["kl_optimum"]["dpo"],
                  summary["kl_optimum"]["ppo"]["reward_model"]):
        point["gap_closed"] = gap_closed(summary, point["gold"])
    if args.all:  # the reward model picks the best of n SFT samples: beside PPO at equal KL
        summary["best_of_n"] = best_of_n(args, cfgs["ppo"], models)
        summary["overoptimization"] = overoptimization(args, cfgs, results, models,
                                                       summary["best_of_n"])
    summary["total_seconds"] = time.time() - t_start  # this invocation's (module docstring)
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
    if any(m in s for m in BEYOND + ("rlaif",)):
        print_beyond(s, f)


def print_beyond(s: dict, f) -> None:
    """--all's table: each method's training signal, gold, accuracy, KL, the gap it closes,
    the median seconds of one update phase and the stage's seconds; then RLAIF per judge."""
    print(f"\nbeyond the reward model (β = the PPO stage's; update: median seconds of one "
          f"update phase)\n{'method':<9} {'training signal':<28} {'gold':>6} {'accuracy':>9} "
          f"{'KL':>6} {'gap':>6} {'update':>7} {'seconds':>8}")
    rows = [("PPO", "reward model (human pairs)", "ppo"), ("PPO gold", "gold judge (perfect)",
                                                           "ppo_gold"),
            ("RFT", "verifier: right answer 1/0", "rft"), ("GRPO", "verifier, no critic", "grpo"),
            ("GRPO RM", "reward model, no critic", "grpo_rm"),
            ("RLAIF", "RM on an AI judge's labels", "rlaif"),
            ("DPO onl.", "own pairs, human labels", "online_dpo")]
    for name, signal, key in rows:
        if key in s:
            r = s[key]
            print(f"{name:<9} {signal:<28} {f(r['gold'], '6.3f'):>6} "
                  f"{f(r['accuracy'], '9.3f'):>9} {f(r['kl'], '6.2f'):>6} "
                  f"{f(s['gap_closed'].get(key), '6.2f'):>6} "
                  f"{f(r.get('update_seconds'), '7.2f'):>7} {f(r['seconds'], '8.0f'):>8}")
    if "best_of_n" in s:
        print("best-of-n (the reward model keeps the best of n SFT samples): " + " | ".join(
            f"n={p['n']} KL {p['kl']:.2f} gold {p['gold']:.3f}" for p in s["best_of_n"]["points"]
            if p["n"] > 1))
    for n, r in s.get("overoptimization", {}).get("reward_models", {}).items():
        rl, bon = r["rl"], r["best_of_n"]
        print(f"overoptimization, RM on {n} pairs (test accuracy {r['test_accuracy']:.3f}): "
              f"PPO β={r['beta']:g} gold peaks at {rl['peak']['gold']:.3f} (√KL "
              f"{rl['peak']['d']:.2f}), ends at {rl['last']['gold']:.3f} (√KL "
              f"{rl['last']['d']:.2f}, proxy {rl['last']['proxy']:+.2f}); best-of-n peaks at "
              f"{bon['peak']['gold']:.3f} (n={bon['peak']['n']})")
    for c in s.get("rlaif_curve", []):
        print(f"RLAIF, judge of {c['judge_pairs']} human pairs: judge test accuracy "
              f"{f(c['judge_test_accuracy'], '.3f')}, agrees with the human labels "
              f"{f(c['judge_agreement'], '.3f')} (two humans: {f(c['human_agreement'], '.3f')});"
              f" RM on its labels {f(c['rm_test_accuracy'], '.3f')} (Bayes "
              f"{f(c['bayes_accuracy'], '.3f')}); PPO gold {f(c['gold'], '.3f')}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
