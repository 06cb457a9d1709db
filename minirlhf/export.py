"""Export a stage to a Hugging Face GPT-2 folder, so the model can leave the project.

    python -m minirlhf.export out/ppo --hf out/ppo-hf
    python -c "import transformers as t; m = t.GPT2LMHeadModel.from_pretrained('out/ppo-hf')"

The folder holds what `transformers` reads for GPT-2: config.json, model.safetensors (written
by `minirlhf.gpt2.write_safetensors`, so the `safetensors` package is not needed) and the
tokenizer files (vocab.json, merges.txt, tokenizer_config.json with the chat template,
special_tokens_map.json). minirlhf's GPT is GPT-2's architecture, so this is `gpt2.load_gpt2`
run backwards: the names are the same, the Conv1D weights are transposed back, and the
embedding's padding rows are dropped. `python -m minirlhf.chat gpt2:out/ppo-hf` loads the export
again. Left out: reward and value models (a scalar head has no GPT-2 class with a bias) and
weights in half precision.
"""
from __future__ import annotations

import json
import os

from .checkpoint import load_stage
from .config import OneLineParser
from .errors import CheckpointError
from .gpt2 import hf_config, hf_state_dict, write_safetensors
from .tokenizer import TokenizerError
from .training import fail

PROG = "python -m minirlhf.export"


def export_hf(stage: str, out: str, overwrite: bool = False) -> list[str]:
    """Write the stage's language model and tokenizer to `out` as a Hugging Face GPT-2 folder;
    returns the paths written. Refuses a reward model and a non-empty `out` (unless
    `overwrite`)."""
    model, tok, _ = load_stage(stage, "gpt")
    if not model.config.bias:
        raise CheckpointError(f"{stage}: a model without biases has no Hugging Face GPT-2 form")
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out) and not overwrite):
        raise ValueError(f"--hf {out}: exists and is not an empty folder (add --overwrite to "
                         f"write into it)")
    os.makedirs(out, exist_ok=True)
    files = {"config.json": json.dumps(hf_config(model.config, tok.bos_id, tok.end_id), indent=2),
             **tok.hf_files()}
    written = []
    for name, text in files.items():
        path = os.path.join(out, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        written.append(path)
    weights = os.path.join(out, "model.safetensors")
    write_safetensors(hf_state_dict(model), weights)
    return written + [weights]


def main(argv=None) -> list[str]:
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", help="a stage folder written by train_sft.py, train_ppo.py or "
                                  "train_dpo.py")
    ap.add_argument("--hf", required=True, metavar="OUT_DIR",
                    help="the Hugging Face folder to write")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    args = ap.parse_args(argv)
    try:
        paths = export_hf(args.stage, args.hf, args.overwrite)
    except (CheckpointError, TokenizerError, ValueError, OSError) as e:
        fail(PROG, str(e))
    print(f"wrote {args.hf}: " + ", ".join(os.path.basename(p) for p in paths))
    return paths


if __name__ == "__main__":
    main()
