"""Dataclass configs -> command-line flags, with the help text taken from the field comments.

    @dataclass
    class SFTConfig:
        lr: float = 3e-3        # peak learning rate of AdamW
        device: Literal["auto", "cpu", "cuda"] = "auto"   # where to train

    cfg = parse_config(SFTConfig, argv, prog="train_sft.py")   # --lr 1e-3 --device cpu

Every field becomes `--field-name` (underscores -> dashes); bools become `--flag / --no-flag`;
`Literal[...]` fields list their choices; `X | None` fields accept `none`; float fields refuse nan
and ±inf (no setting here means anything there). A config class may define `check(self)` raising
ValueError for values that parse but make no sense (a negative learning rate); `check_ranges`
words the common cases.
Unknown flags, unparsable values and failed checks print one line `prog: error: ...` and exit 2 —
never a traceback. No config files or frameworks on purpose: the dataclass is the whole story.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
import types
import typing


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block), like the rest of our errors."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def field_comments(cls) -> dict[str, str]:
    """Map field name -> the comment written after it in the class source. A comment may go on
    over the next lines when they hold only a comment starting in the same column:

        epochs: int = 1      # passes over each rollout (one beat two:
                             # docs/results.md, "PPO")
    """
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        name, column = None, -1
        for line in source.splitlines():
            field = re.match(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", line)
            if field:
                name, column = field.group(1), line.rindex("#", 0, field.start(2))
                comments[name] = field.group(2).strip()
            elif name and re.match(r"^\s*#", line) and line.index("#") == column:
                comments[name] += " " + line[column + 1:].strip()  # the comment goes on
            else:
                name = None
    return comments


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not finite")
    return value


finite_float.__name__ = "finite float"  # argparse says "invalid finite float value: 'nan'"


def _parser_for(type_):
    """A string -> value converter and choices for one field type."""
    origin = typing.get_origin(type_)
    args = typing.get_args(type_)
    if origin is typing.Literal:
        return str, list(args)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        base, choices = _parser_for(inner)

        def optional(s):
            return None if s.lower() == "none" else base(s)
        optional.__name__ = getattr(base, "__name__", "value")
        return optional, choices
    if type_ is float:
        return finite_float, None
    if type_ in (int, str):
        return type_, None
    raise TypeError(f"config fields must be int, float, str, bool, Literal or X | None, "
                    f"not {type_}")


def build_parser(cls, prog: str, description: str = "") -> OneLineParser:
    parser = OneLineParser(prog=prog, description=description,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = comments.get(f.name, "").replace("%", "%%")  # argparse %-formats help ("5% of")
        type_ = hints[f.name]
        if type_ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_)
            continue
        conv, choices = _parser_for(type_)
        parser.add_argument(flag, dest=f.name, type=conv, choices=choices, default=default,
                            help=help_, metavar=None if choices else f.name.upper())
    return parser


def parse_config(cls, argv=None, prog: str | None = None, description: str = "",
                 parser: OneLineParser | None = None):
    """Parse argv into an instance of the dataclass `cls` (see the module docstring)."""
    parser = parser or build_parser(cls, prog or sys.argv[0], description)
    ns = parser.parse_args(argv)
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in vars(ns).items() if k in names})
    check_config(cfg, parser.prog)
    return cfg


def check_ranges(cfg, positive=(), non_negative=()) -> None:
    """For a config's check(): ValueError naming the first flag outside its range."""
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if hasattr(cfg, "seed") and not 0 <= cfg.seed < 2**32:
        raise ValueError("--seed must be in [0, 2**32)")  # numpy's seeding range


def check_config(cfg, prog: str):
    try:
        if hasattr(cfg, "check"):
            cfg.check()
    except ValueError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        raise SystemExit(2)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def format_config(cfg) -> str:
    """The config as aligned 'name = value' lines, printed at the start of every run."""
    d = config_to_dict(cfg)
    width = max(len(k) for k in d)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in d.items())
