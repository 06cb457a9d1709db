"""Talk to any stage: sample answers from a saved policy, with the gold judge's verdict.

    python -m minirlhf.chat out/ppo                                 # type prompts; empty line,
                                                                    # "quit" or Ctrl-D ends
    python -m minirlhf.chat out/sft --prompt "What is 3 plus 4?"    # one answer, then exit
    python -m minirlhf.chat --compare out/sft out/ppo out/dpo       # every stage, one line each
    python -m minirlhf.chat out/ppo --greedy --max-new-tokens 32
    echo "What is the capital of Norway?" | python -m minirlhf.chat out/dpo

A stage is a folder written by a training script (checkpoint.pt + tokenizer), loaded with
`minirlhf.checkpoint.load_stage(path, "gpt")`; the reward model's folder holds no language model
and is refused. When the prompt is one of the built-in world's (`minirlhf.world.lookup`), the
gold judge's score and whether the answer is correct are printed beside it, so the stages of
one pipeline can be compared on the same question (`--compare`).

Sampling is `minirlhf.sampler.generate` at `--temperature` (1 = the policy itself, what PPO
optimised), or greedy; each stage draws from its own generator seeded with `--seed`, so a run
is reproducible and `--compare` gives every stage the same random stream.

Left out on purpose: multi-turn history (the world's prompts are single questions), streaming
output, system prompts.
"""
from __future__ import annotations

import os
import sys

import torch

from minirlhf.checkpoint import CheckpointError, load_stage
from minirlhf.config import OneLineParser
from minirlhf.device import resolve_device
from minirlhf.sampler import generate
from minirlhf.tokenizer import TokenizerError
from minirlhf.training import fail
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
        model, tok, ck = load_stage(path, "gpt", device)
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
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature (1 = the policy itself)")
    ap.add_argument("--greedy", action="store_true", help="always take the most likely token")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="response budget in tokens")
    ap.add_argument("--seed", type=int, default=0, help="seeds each stage's sampling")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                    help="where the models run")
    return ap


def main(argv=None) -> list[dict]:
    """Run the chat; returns every result row (stage, prompt, response, ended, gold, correct)."""
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


if __name__ == "__main__":
    main(sys.argv[1:])
