"""Properties of minirlhf/config.py: flags generated from a dataclass, help text taken from the
field comments, and every user mistake reported as one `prog: error: ...` line with exit code 2.
"""
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minirlhf.config import build_parser, field_comments, parse_config


@dataclass
class DemoConfig:
    steps: int = 10             # optimizer steps to take
    lr: float = 3e-3            # peak learning rate of AdamW
    out_dir: str = "out/demo"   # where checkpoints and logs go
    compile: bool = False       # wrap the model in torch.compile (CUDA only)
    device: Literal["auto", "cpu", "cuda"] = "auto"   # where to train
    max_len: int | None = None  # truncate sequences to this many tokens
    temperature: Optional[float] = 1.0  # sampling temperature, none for greedy

    def check(self):
        if self.lr <= 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")


COMMENTS = {
    "steps": "optimizer steps to take",
    "lr": "peak learning rate of AdamW",
    "out_dir": "where checkpoints and logs go",
    "compile": "wrap the model in torch.compile (CUDA only)",
    "device": "where to train",
    "max_len": "truncate sequences to this many tokens",
    "temperature": "sampling temperature, none for greedy",
}


def parse(argv):
    return parse_config(DemoConfig, argv, prog="demo.py")


def test_help_shows_each_field_comment(capsys):
    """--help lists every flag with its field comment as help text, and exits 0."""
    assert field_comments(DemoConfig) == COMMENTS
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"])
    assert exit_.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for name, comment in COMMENTS.items():
        assert "--" + name.replace("_", "-") in help_text
        assert comment in help_text


def test_no_flags_give_the_defaults():
    """An empty command line is the dataclass's defaults."""
    assert parse([]) == DemoConfig()


def test_flags_parse_to_typed_values():
    """Each kind of field parses from its flag to a value of its type."""
    cfg = parse(["--steps", "5", "--lr", "1e-4", "--out-dir", "runs/x", "--compile",
                 "--device", "cpu", "--max-len", "64", "--temperature", "none"])
    assert cfg == DemoConfig(steps=5, lr=1e-4, out_dir="runs/x", compile=True, device="cpu",
                             max_len=64, temperature=None)
    assert type(cfg.steps) is int and type(cfg.lr) is float
    assert parse(["--no-compile", "--max-len", "None"]).compile is False
    assert parse(["--max-len", "none"]).max_len is None
    assert parse(["--temperature", "0.5"]).temperature == 0.5


@given(steps=st.integers(-10**6, 10**6), lr=st.floats(1e-12, 1e6), text=st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
    .filter(lambda s: s != "--"))  # argparse (3.11) drops a bare "--" even as "--flag=--"
def test_values_round_trip_through_their_flags(steps, lr, text):
    """str(value) given to a flag parses back to the same int, float or string."""
    cfg = parse([f"--steps={steps}", f"--lr={lr!r}", f"--out-dir={text}"])
    assert (cfg.steps, cfg.lr, cfg.out_dir) == (steps, lr, text)


@pytest.mark.parametrize("argv, mentions", [
    (["--bogus", "1"], "--bogus"),                  # unknown flag
    (["--lr", "abc"], "--lr"),                      # not a float
    (["--steps", "1.5"], "--steps"),                # not an int
    (["--device", "gpu"], "gpu"),                   # not one of the Literal choices
    (["--max-len", "many"], "--max-len"),           # neither an int nor none
    (["--steps"], "--steps"),                       # missing value
    (["--lr", "-1"], "--lr must be positive"),      # parses, but check() refuses it
    (["--lr=0"], "--lr must be positive"),
])
def test_bad_command_lines_give_one_error_line(capsys, argv, mentions):
    """A user mistake exits with code 2 and exactly one stderr line 'demo.py: error: ...' that
    names the problem (no usage block, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith("demo.py: error: ")
    assert mentions in err


def test_unsupported_field_type_is_a_type_error():
    """A field type the CLI cannot express is refused when the parser is built."""
    @dataclass
    class Bad:
        layers: list = None  # a list has no flag syntax

    with pytest.raises(TypeError, match="config fields must be"):
        build_parser(Bad, prog="bad.py")


def test_every_scripts_field_comment_reaches_its_help_whole():
    """A field comment of the scripts' configs that goes on over the next lines is read whole
    into --help only when those lines start in the comment's own column: every comment-only
    line right after a field is either such a continuation or a section heading (column 4)."""
    import inspect
    import re
    import train_dpo
    import train_ppo
    import train_rm
    import train_sft
    for cls in (train_sft.SFTConfig, train_rm.RMConfig, train_ppo.PPOConfig,
                train_dpo.DPOConfig):
        column, name, lines = None, None, inspect.getsource(cls).splitlines()
        for line in lines:
            field = re.match(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", line)
            if field:
                name, column = field.group(1), line.rindex("#", 0, field.start(2))
            elif name and re.match(r"^\s*#", line):
                assert line.index("#") in (column, 4), (cls.__name__, name, line)
                if line.index("#") == 4:
                    name = None
            else:
                name = None
    comments = field_comments(train_ppo.PPOConfig)  # three- and five-line comments, whole
    assert comments["reward"].endswith("| gold: the gold judge (world only)")
    assert comments["advantage"].endswith("group and grpo have no value model")
