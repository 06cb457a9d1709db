"""Talk to any stage: sample answers from a saved policy, with the gold judge's verdict.

    python -m minirlhf.chat out/ppo                                 # type prompts; empty line,
                                                                    # "quit" or Ctrl-D ends
    python -m minirlhf.chat out/sft --prompt "What is 3 plus 4?"    # one answer, then exit
    python -m minirlhf.chat --compare out/sft out/ppo out/dpo       # every stage, one line each
    python -m minirlhf.chat out/ppo --greedy --max-new-tokens 32
    echo "What is the capital of Norway?" | python -m minirlhf.chat out/dpo

    python -m minirlhf.chat score out/rm --prompt "What is the capital of France?" \
                                         --response "Paris."        # its reward (and gold score)
    python -m minirlhf.chat score out/rm --data out/rm/prefs_test.jsonl   # each line's rewards
    head -3 out/rm/prefs.jsonl | python -m minirlhf.chat score out/rm    # JSONL on stdin

A stage is a folder written by a training script (checkpoint.pt + tokenizer), loaded with
`minirlhf.checkpoint.load_stage(path, "gpt")`; the reward model's folder holds no language model
and is refused: `score` reads it instead. When the prompt is one of the built-in world's
(`minirlhf.world.lookup`), the gold judge's score and whether the answer is correct are printed
beside it, so the stages of one pipeline can be compared on the same question (`--compare`).

Sampling is `minirlhf.sampler.generate` at `--temperature` (1 = the policy itself, what PPO
optimised), or greedy; each stage draws from its own generator seeded with `--seed`, so a run
is reproducible and `--compare` gives every stage the same random stream.

`score RM` prints the reward model's reward r_φ(x, y) of given responses, read at the last real
token as train_rm.py trains it (the checkpoint's rewards, centred as training left them), with the
gold judge's score beside it for built-in world prompts. --data FILE (or --pairs FILE; "-" or no
flag with piped input reads stdin) holds JSONL lines of either kind (minirlhf/data.py
`read_scored`): {"prompt", "response"} gets its reward; a preference line {"prompt", "chosen",
"rejected"} gets both rewards and whether the reward model prefers the chosen response, and a
last line counts how often it does. A bad line stops with one line naming FILE:LINE. (A stage
folder named `score` is given as ./score.)

Left out on purpose: multi-turn history (the world's prompts are single questions), streaming
output, system prompts.
"""
from __future__ import annotations

import os
import sys

import torch

from minirlhf.checkpoint import CheckpointError, load_stage
from minirlhf.config import OneLineParser, finite_float
from minirlhf.data import DataError, read_scored
from minirlhf.device import resolve_device
from minirlhf.sampler import generate
from minirlhf.tokenizer import TokenizerError
from minirlhf.training import fail, pad_batch
from minirlhf.world import World, correct, gold_reward, lookup

PROG = "python -m minirlhf.chat"


class PromptError(ValueError):
    """A prompt the model cannot answer (too long for its block size)."""


def answer(model, tok, prompt: str, *, temperature: float, max_new_tokens: int,
           generator: torch.Generator | None) -> tuple[str, bool]:
    """One sampled response to `prompt` -> (text without the end token, whether it ended).

    temperature 0 is greedy. The budget is cut to what fits in the model's block size.
    """
    ids = tok.render_prompt(prompt)
    room = model.config.block_size - len(ids)
    if room < 1:
        raise PromptError(f"the prompt is {len(ids)} tokens; this model reads at most "
                          f"{model.config.block_size} (prompt and response together)")
    gen = generate(model, [ids], min(max_new_tokens, room), eos_id=tok.end_id,
                   pad_id=tok.pad_id, temperature=temperature, generator=generator)
    return tok.decode(gen.responses()[0]), bool(gen.ended[0])


def judge(prompt: str, text: str, ended: bool) -> dict | None:
    """The gold judge's verdict for a built-in world prompt; None for any other prompt."""
    try:
        p = lookup(prompt)
    except ValueError:
        return None
    return {"gold": gold_reward(p, text, ended), "correct": correct(p, text), "answer": p.answer}


def verdict_text(result: dict) -> str:
    parts = []
    if result["gold"] is not None:
        parts.append(f"gold {result['gold']:+.2f} {'correct' if result['correct'] else 'wrong'}")
    if not result["ended"]:
        parts.append("no end token")
    return " | ".join(parts)


def respond(stages: list[dict], prompt: str, args) -> list[dict]:
    """Answer `prompt` with every stage and print: the answer and its verdict for one stage,
    one line per stage (newlines shown as \\n) for several."""
    results = []
    for s in stages:
        text, ended = answer(s["model"], s["tok"], prompt, temperature=args.temperature,
                             max_new_tokens=args.max_new_tokens, generator=s["generator"])
        v = judge(prompt, text, ended)
        results.append({"stage": s["label"], "prompt": prompt, "response": text, "ended": ended,
                        "gold": v and v["gold"], "correct": v and v["correct"]})
    if len(stages) == 1:
        r = results[0]
        print(r["response"])
        if verdict_text(r):
            print(f"  [{verdict_text(r)}]")
    else:
        width = max(len(s["label"]) for s in stages)
        for r in results:
            shown = r["response"].replace("\n", "\\n")
            tail = f"   [{verdict_text(r)}]" if verdict_text(r) else ""
            print(f"  {r['stage']:<{width}} | {shown}{tail}")
    sys.stdout.flush()
    return results


def labels_for(paths: list[str]) -> list[str]:
    """Each folder's last name (out/ppo -> ppo); the paths as given if two names collide."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def load_stages(paths: list[str], device, seed: int) -> list[dict]:
    stages = []
    for path, label in zip(paths, labels_for(paths)):
        try:
            model, tok, ck = load_stage(path, "gpt", device)
        except CheckpointError as e:
            if "holds a 'scalar' model" not in str(e):
                raise
            raise CheckpointError(f"{e} (a reward model: score responses with it, "
                                  f"{PROG} score {path} --prompt P --response R)") from None
        model.eval()
        stages.append({"label": label, "path": path, "model": model, "tok": tok,
                       "step": ck.get("step"),
                       "generator": torch.Generator(device=device).manual_seed(seed)})
    return stages


def build_parser() -> OneLineParser:
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", nargs="?", help="a stage folder, e.g. out/ppo")
    ap.add_argument("--compare", nargs="+", metavar="STAGE",
                    help="several stage folders, answered side by side")
    ap.add_argument("--prompt", help="answer this one prompt and exit")
    ap.add_argument("--temperature", type=finite_float, default=1.0,
                    help="sampling temperature (1 = the policy itself)")
    ap.add_argument("--greedy", action="store_true", help="always take the most likely token")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="response budget in tokens")
    ap.add_argument("--seed", type=int, default=0, help="seeds each stage's sampling")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                    help="where the models run")
    return ap


def main(argv=None) -> list[dict]:
    """Run the chat; returns every result row (stage, prompt, response, ended, gold, correct).
    `score` (first argument) scores responses with a reward model instead (`score_main`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    if (args.stage is None) == (args.compare is None):
        ap.error("give one stage folder, or --compare with several")
    if args.max_new_tokens < 1 or args.temperature < 0:
        ap.error("--max-new-tokens must be >= 1 and --temperature >= 0")
    if args.greedy:
        args.temperature = 0.0
    paths = [args.stage] if args.stage is not None else args.compare
    try:
        device = resolve_device(args.device)
        stages = load_stages(paths, device, args.seed)
    except (CheckpointError, TokenizerError, ValueError) as e:
        fail(PROG, str(e))

    if args.prompt is not None:
        try:
            return respond(stages, args.prompt, args)
        except PromptError as e:
            fail(PROG, str(e))

    for s in stages:
        print(f"{s['label']}: {s['path']} (step {s['step']}, {s['model'].num_params():,d} "
              f"parameters, {s['tok'].kind} tokenizer)")
    examples = [p.text for p in World(0).test_prompts[::40][:3]]
    print("built-in world prompts get the gold judge's score, e.g. " + " | ".join(examples))
    print('an empty line, "quit" or Ctrl-D ends')
    results = []
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not sys.stdin.isatty():
            print(line)  # piped input is not echoed by a terminal: keep the transcript readable
        if not line.strip() or line.strip().lower() in ("quit", "exit"):
            break
        try:
            results += respond(stages, line, args)
        except PromptError as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
    return results


# ----------------------------------------------------------------------------------------------
# score: the reward model's reward of given responses
# ----------------------------------------------------------------------------------------------

def build_score_parser() -> OneLineParser:
    ap = OneLineParser(prog=f"{PROG} score",
                       description="Print a reward model's reward of responses (and pairs).")
    ap.add_argument("rm", help="a reward model's stage folder, e.g. out/rm")
    ap.add_argument("--prompt", help="the prompt of one response to score (with --response)")
    ap.add_argument("--response", help="the response to score")
    ap.add_argument("--data", "--pairs", dest="data", metavar="FILE",
                    help='JSONL of {"prompt", "response"} or {"prompt", "chosen", "rejected"} '
                         'lines; "-" reads stdin (the default when input is piped)')
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                    help="where the reward model runs")
    return ap


@torch.no_grad()
def rewards(rm, tok, texts: list[tuple[str, str]], device, batch_size: int = 64) -> list[float]:
    """r_φ(x, y) of each (prompt, response), read at the last real token (train_rm.py)."""
    out = []
    for i in range(0, len(texts), batch_size):
        seqs = [tok.render(x, y)[0] for x, y in texts[i:i + batch_size]]
        tokens, attn_mask, _ = pad_batch(seqs, [0] * len(seqs), tok.pad_id, device)  # (B, T)
        out += rm.score(tokens, attn_mask).float().tolist()                        # (B,)
    return out


def score_rows(rm, tok, rows: list[dict], device) -> list[dict]:
    """Each row ({"prompt", "response"} or {"prompt", "chosen", "rejected"}) with its rewards
    and, on built-in world prompts, the gold judge's scores (None elsewhere)."""
    keys = [[k for k in ("response", "chosen", "rejected") if k in r] for r in rows]
    texts = [(r["prompt"], r[k]) for r, ks in zip(rows, keys) for k in ks]
    scores = iter(rewards(rm, tok, texts, device))
    out = []
    for r, ks in zip(rows, keys):
        row = dict(r)
        for k in ks:
            suffix = "" if k == "response" else f"_{k}"
            v = judge(r["prompt"], r[k], True) or {}  # a whole response is given: it ended
            row[f"reward{suffix}"] = next(scores)
            row[f"gold{suffix}"], row[f"correct{suffix}"] = v.get("gold"), v.get("correct")
        if "chosen" in r:
            row["prefers_chosen"] = row["reward_chosen"] > row["reward_rejected"]
        out.append(row)
    return out


def score_text(row: dict) -> str:
    """One printed line for a scored row."""
    if "reward" in row:
        gold = ("" if row["gold"] is None else
                f" | gold {row['gold']:+.2f} {'correct' if row['correct'] else 'wrong'}")
        return f"reward {row['reward']:+.3f}{gold}"
    verdict = "prefers chosen" if row["prefers_chosen"] else "prefers rejected"
    text = (f"chosen {row['reward_chosen']:+.3f}, rejected {row['reward_rejected']:+.3f}: "
            f"{verdict} (margin {row['reward_chosen'] - row['reward_rejected']:+.3f})")
    if row["gold_chosen"] is not None:
        text += f" | gold {row['gold_chosen']:+.2f} vs {row['gold_rejected']:+.2f}"
    return text


def rows_to_score(args, tok, block_size: int) -> list[dict]:
    """--prompt and --response as one row, or the rows of --data (`read_scored`)."""
    if args.data is not None:
        return read_scored(args.data, tok, block_size)
    n = len(tok.render(args.prompt, args.response)[0])
    if n > block_size:
        raise PromptError(f"prompt and response are {n} tokens; this reward model reads at most "
                          f"{block_size}")
    return [{"prompt": args.prompt, "response": args.response}]


def score_main(argv: list[str]) -> list[dict]:
    """`python -m minirlhf.chat score RM ...`: print and return each scored row."""
    ap = build_score_parser()
    args = ap.parse_args(argv)
    if (args.prompt is None) != (args.response is None):
        ap.error("--prompt and --response go together")
    if args.prompt is not None and args.data is not None:
        ap.error("give --prompt and --response, or --data FILE, not both")
    if args.prompt is None and args.data is None:
        if sys.stdin.isatty():
            ap.error("give --prompt and --response, --data FILE, or JSONL lines on stdin")
        args.data = "-"
    try:
        device = resolve_device(args.device)
        rm, tok, _ = load_stage(args.rm, "scalar", device)
        scored = score_rows(rm.eval(), tok, rows_to_score(args, tok, rm.config.block_size), device)
    except (CheckpointError, TokenizerError, DataError, PromptError, ValueError) as e:
        fail(f"{PROG} score", str(e))
    name = "<stdin>" if args.data == "-" else args.data
    for row in scored:
        print(score_text(row) if args.data is None else f"{name}:{row['line']}  {score_text(row)}")
    pairs = [r for r in scored if "chosen" in r]
    if pairs:
        k = sum(r["prefers_chosen"] for r in pairs)
        print(f"{len(pairs)} pair{'s' * (len(pairs) > 1)}: the reward model prefers the chosen "
              f"response in {k} ({k / len(pairs):.1%})")
    return scored


if __name__ == "__main__":
    main(sys.argv[1:])
