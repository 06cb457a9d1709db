"""JSONL data files: read and validate SFT, preference and prompt files; write them atomically.

    from minirlhf.data import read_sft, read_prefs, read_prompts, read_scored, write_jsonl
    rows = read_sft("data/sft.jsonl", tokenizer=tok, max_len=72)   # [{"prompt", "completion"}]
    pairs = read_prefs("data/prefs.jsonl")                 # [{"prompt", "chosen", "rejected"}]
    prompts = read_prompts("data/prompts.jsonl")                    # [{"prompt"}]
    scored = read_scored("data/score.jsonl")                        # responses or pairs to score
    write_jsonl("out/samples.jsonl", rows)                          # all rows or no file at all

Formats (one JSON object a line, TRL's field names):
    SFT          {"prompt": str, "completion": str}
             or  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    preferences  {"prompt": str, "chosen": str, "rejected": str}
    prompts      {"prompt": str}
    to score     {"prompt": str, "response": str} ("completion" too) or a preference line, either
                 kind on any line (python -m minirlhf.chat score)
A `messages` line is turned into prompt/completion because the model's chat format is single-turn:
the last message must be the assistant's and is the completion; the contents of all earlier turns
(at least one of them from the user), in order and joined by a newline, are the prompt; roles are
dropped. Extra fields (an id, a source) are ignored, so TRL-style files load unchanged.

Anthropic HH lines, {"chosen": dialogue, "rejected": dialogue} with whole dialogues
"\\n\\nHuman: ...\\n\\nAssistant: ...", are recognised by having no 'prompt' and are read by all
three readers: the prompt is the dialogue up to and including the last "\\n\\nAssistant:" (earlier
turns stay in it, and the GPT-2 template uses such a prompt as it is), the response the final
answer (`split_dialogue`, `split_hh_pair`). Preferences: both dialogues must agree up to there.
SFT: `chosen` is the demonstration. TL;DR-style files (summarize-from-feedback as TRL ships it)
are prompt/chosen/rejected lines; responses that start with a space or newline keep it.

Validation: every line is checked before anything is returned, and the first bad line raises
`DataError` with a one-line message "path:line: what is wrong" (file-level problems: "path: ...").
Checked: UTF-8, JSON syntax, an object, each field present, a string, not empty or whitespace
only, valid Unicode (JSON can escape a lone surrogate, "\ud800", which no text holds);
for preferences chosen != rejected; for messages the roles and the last turn. Blank lines
are skipped (editors and `cat a b > c` leave them; they carry no record), but line numbers still
count them, so a message points at the line an editor shows. A UTF-8 byte-order mark is accepted.

Lengths: given `tokenizer` and `max_len`, each record is measured as the model will see it,
`len(tokenizer.render(prompt, response)[0])` (preferences: the longer of chosen and rejected;
prompt files: `len(tokenizer.render_prompt(prompt))`). A record over `max_len` is an error naming
the line and both lengths, or, with `truncate=True`, is *skipped*, and one line on stderr says how
many were. Skipping, not cutting: a cut response teaches the model to stop mid-sentence, and a
left-cut prompt asks a different question. (The argument keeps the common name `truncate`.)

Left out: streaming huge files (a file is validated whole before use), gzip, parquet, multi-turn
training targets.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import sys
from typing import Any, Callable, Iterable, Iterator

from minirlhf.errors import DataError, WriteError, write_failure
from minirlhf.tokenizer import ASSISTANT, HUMAN  # the turn markers of Anthropic HH dialogues

ROLES = ("system", "user", "assistant")
STDIN = "<stdin>"  # the path name of standard input (`read_scored("-")`)


def _json_type(v: Any) -> str:
    """The JSON name of a Python value from json.loads, for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return "a string"


def _short(s: str, n: int = 40) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def _lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; raises DataError on the first bad one.
    path "<stdin>" reads standard input."""
    try:  # bytes: a bad byte becomes our error, not a UnicodeDecodeError
        source = (contextlib.nullcontext(sys.stdin.buffer) if path == STDIN
                  else open(path, "rb"))
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except IsADirectoryError:
        raise DataError(path, "is a directory, not a JSONL file") from None
    except OSError as e:
        raise DataError(path, f"cannot open: {e.strerror}") from None
    with source as f:
        # Iterating a binary file splits on b"\n" only; str.splitlines would also split inside
        # strings at U+2028 or U+0085, which JSON allows unescaped.
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]                                   # a byte-order mark, not data
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                      f"{e.start + 1})", lineno) from None
            if not text.strip(" \t\r\n"):                       # JSON's whitespace only
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, f"bad JSON: {e.msg} (column {e.colno})", lineno) from None
            except RecursionError:
                raise DataError(path, "bad JSON: nested too deeply", lineno) from None
            if not isinstance(obj, dict):
                raise DataError(path, f"expected a JSON object, got {_json_type(obj)}", lineno)
            yield lineno, obj


def _string(path: str, lineno: int, obj: dict, key: str, where: str = "") -> str:
    """obj[key] if it is a non-blank string, else a DataError naming the field."""
    name = f"{where}{key}"
    if key not in obj:
        have = ", ".join(_short(k) for k in list(obj)[:6]) or "none"
        raise DataError(path, f"missing field '{name}' (fields present: {have})", lineno)
    v = obj[key]
    if not isinstance(v, str):
        raise DataError(path, f"field '{name}' must be a string, got {_json_type(v)}", lineno)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # the tokenizer would silently turn it into U+FFFD
        raise DataError(path, f"field '{name}' is not valid Unicode (an unpaired surrogate "
                              f"\\u{ord(v[e.start]):04x})", lineno) from None
    if not v.strip():
        raise DataError(path, f"field '{name}' is empty" if not v else
                        f"field '{name}' is only whitespace", lineno)
    return v


def split_dialogue(text: str) -> tuple[str, str]:
    """An Anthropic HH dialogue -> (prompt, response).

    The prompt runs to the end of the last "\\n\\nAssistant:", earlier turns included; the response
    is that final assistant turn with its leading spaces stripped (the GPT-2 template puts one
    space back). ValueError if there is no assistant turn or a human turn follows the last one.
    """
    i = text.rfind(ASSISTANT)
    if i < 0:
        raise ValueError(f"it has no {ASSISTANT!r} turn")
    prompt, response = text[:i + len(ASSISTANT)], text[i + len(ASSISTANT):].lstrip(" ")
    if HUMAN in response:
        raise ValueError(f"it ends with a {HUMAN!r} turn, not with the assistant's answer")
    return prompt, response


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Two HH dialogues -> (prompt, chosen, rejected): the prompt is their longest shared prefix
    that ends at the last "\\n\\nAssistant:", so the responses are the two final answers."""
    prompt, chosen_answer = split_dialogue(chosen)
    rejected_prompt, rejected_answer = split_dialogue(rejected)
    if rejected_prompt != prompt:
        raise ValueError(f"'chosen' and 'rejected' differ before their last {ASSISTANT!r} turn "
                         f"(an HH pair shares the dialogue up to the final answer)")
    return prompt, chosen_answer, rejected_answer


def _hh_field(path: str, lineno: int, obj: dict, key: str) -> tuple[str, str]:
    """split_dialogue(obj[key]) with file:line errors; a line without 'prompt' is read as HH."""
    text = _string(path, lineno, obj, key)
    try:
        prompt, response = split_dialogue(text)
    except ValueError as e:
        raise DataError(path, f"missing field 'prompt', and '{key}' is not an Anthropic HH "
                              f"dialogue: {e}", lineno) from None
    if not response.strip():
        raise DataError(path, f"the final assistant turn of '{key}' is empty", lineno)
    return prompt, response


def _sft_record(path: str, lineno: int, obj: dict) -> dict[str, str]:
    if not {"prompt", "completion", "messages"} & set(obj) and "chosen" in obj:
        prompt, completion = _hh_field(path, lineno, obj, "chosen")  # HH: imitate the chosen
        return {"prompt": prompt, "completion": completion}
    if "messages" not in obj:
        if "prompt" not in obj and "completion" not in obj:
            raise DataError(path, "missing field 'prompt' (an SFT line has 'prompt' and "
                                  "'completion', or 'messages')", lineno)
        return {"prompt": _string(path, lineno, obj, "prompt"),
                "completion": _string(path, lineno, obj, "completion")}
    if "prompt" in obj or "completion" in obj:
        raise DataError(path, "has both 'messages' and 'prompt'/'completion'; use one format",
                        lineno)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        got = "an empty list" if isinstance(msgs, list) else _json_type(msgs)
        raise DataError(path, f"field 'messages' must be a non-empty list of "
                              f"{{role, content}} objects, got {got}", lineno)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(path, f"messages[{i}] must be an object, got {_json_type(m)}", lineno)
        role = _string(path, lineno, m, "role", f"messages[{i}].")
        if role not in ROLES:
            raise DataError(path, f"messages[{i}] has role {_short(role)}; the roles are "
                                  f"{', '.join(ROLES)}", lineno)
        _string(path, lineno, m, "content", f"messages[{i}].")
    if msgs[-1]["role"] != "assistant":
        raise DataError(path, f"the last message must be the assistant's (it is the completion), "
                              f"not the {msgs[-1]['role']}'s", lineno)
    if not any(m["role"] == "user" for m in msgs[:-1]):
        raise DataError(path, "no user message before the assistant's reply", lineno)
    return {"prompt": "\n".join(m["content"] for m in msgs[:-1]),
            "completion": msgs[-1]["content"]}


def _prefs_record(path: str, lineno: int, obj: dict) -> dict[str, str]:
    if "prompt" not in obj and "chosen" in obj and "rejected" in obj:  # HH: whole dialogues
        for key in ("chosen", "rejected"):
            _hh_field(path, lineno, obj, key)            # each a string and a dialogue
        try:
            prompt, chosen, rejected = split_hh_pair(obj["chosen"], obj["rejected"])
        except ValueError as e:
            raise DataError(path, str(e), lineno) from None
        obj = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    row = {k: _string(path, lineno, obj, k) for k in ("prompt", "chosen", "rejected")}
    if row["chosen"] == row["rejected"]:
        raise DataError(path, "'chosen' and 'rejected' are the same text; the pair says nothing",
                        lineno)
    return row


def _prompt_record(path: str, lineno: int, obj: dict) -> dict[str, str]:
    if "prompt" not in obj and "chosen" in obj:  # HH: the dialogue up to the final answer
        return {"prompt": _hh_field(path, lineno, obj, "chosen")[0]}
    return {"prompt": _string(path, lineno, obj, "prompt")}


def _scored_record(path: str, lineno: int, obj: dict) -> dict:
    if "chosen" in obj or "rejected" in obj:
        row = _prefs_record(path, lineno, obj)
    else:
        key = "completion" if "response" not in obj and "completion" in obj else "response"
        row = {"prompt": _string(path, lineno, obj, "prompt"),
               "response": _string(path, lineno, obj, key)}
    return {**row, "line": lineno}


def _read(path, record: Callable[[str, int, dict], dict], measure: Callable[[Any, dict], int],
          tokenizer, max_len: int | None, truncate: bool) -> list[dict[str, str]]:
    """The shared reader: validate every line, measure lengths, skip or refuse long ones."""
    path = os.fspath(path)
    if max_len is not None and tokenizer is None:
        raise ValueError("max_len needs a tokenizer to measure lengths with")
    rows, n_lines, skipped = [], 0, 0
    for lineno, obj in _lines(path):
        row = record(path, lineno, obj)
        n_lines += 1
        if max_len is not None:
            try:
                n = measure(tokenizer, row)
            except ValueError as e:  # e.g. a tokenizer refusing some text
                raise DataError(path, f"cannot tokenize: {e}", lineno) from None
            if n > max_len:
                if not truncate:
                    raise DataError(path, f"{n} tokens, longer than max_len={max_len}; shorten "
                                          f"it or pass truncate=True to skip such lines", lineno)
                skipped += 1
                continue
        rows.append(row)
    if n_lines == 0:
        raise DataError(path, "no records (the file is empty or has only blank lines)")
    if skipped:
        print(f"{path}: skipped {skipped} of {n_lines} records longer than max_len={max_len} "
              f"tokens", file=sys.stderr)
    if not rows:
        raise DataError(path, f"all {n_lines} records are longer than max_len={max_len} tokens")
    return rows


def read_sft(path, tokenizer=None, max_len: int | None = None,
             truncate: bool = False) -> list[dict[str, str]]:
    """[{"prompt", "completion"}] from a prompt/completion or messages JSONL file."""
    return _read(path, _sft_record,
                 lambda tok, r: len(tok.render(r["prompt"], r["completion"])[0]),
                 tokenizer, max_len, truncate)


def read_prefs(path, tokenizer=None, max_len: int | None = None,
               truncate: bool = False) -> list[dict[str, str]]:
    """[{"prompt", "chosen", "rejected"}]; a pair is as long as its longer response."""
    return _read(path, _prefs_record,
                 lambda tok, r: max(len(tok.render(r["prompt"], r[k])[0])
                                    for k in ("chosen", "rejected")),
                 tokenizer, max_len, truncate)


def read_prompts(path, tokenizer=None, max_len: int | None = None,
                 truncate: bool = False) -> list[dict[str, str]]:
    """[{"prompt"}] for RL; the length is the rendered prompt alone (the response comes later)."""
    return _read(path, _prompt_record, lambda tok, r: len(tok.render_prompt(r["prompt"])),
                 tokenizer, max_len, truncate)


def hold_out(rows: list[dict], seed: int, fraction: float = 0.05) -> tuple[list, list]:
    """(kept, held out): the rows of a `fraction` of the distinct prompts (at least one) drawn
    by seed, so no held-out prompt is ever trained on. With a single prompt nothing is held."""
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    if len(prompts) < 2:
        return rows, rows
    order = random.Random(seed).sample(prompts, len(prompts))
    held = set(order[:max(1, int(len(prompts) * fraction))])
    return ([r for r in rows if r["prompt"] not in held],
            [r for r in rows if r["prompt"] in held])


def read_scored(path, tokenizer=None, max_len: int | None = None) -> list[dict]:
    """Responses and pairs to score with a reward model, each line either kind:
    [{"prompt", "response", "line"} or {"prompt", "chosen", "rejected", "line"}], "line" being
    the line number. A pair is as long as its longer response. "-" reads standard input (named
    <stdin> in errors)."""
    path = STDIN if path == "-" else path
    return _read(path, _scored_record,
                 lambda tok, r: max(len(tok.render(r["prompt"], r[k])[0])
                                    for k in ("response", "chosen", "rejected") if k in r),
                 tokenizer, max_len, False)


def write_jsonl(path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically; returns how many. On any failure no file is left behind.

    Temporary file in the same directory (so the rename cannot cross file systems), flush and
    fsync, then os.replace: a reader sees the old file or the whole new one, never half of one.
    Strict JSON (no NaN/Infinity), UTF-8 text; parent directories are created. A failed write
    (a full disk) raises WriteError naming the file.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        # os.open with 0o666 lets the umask decide permissions, as open() would (mkstemp: 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise WriteError(f"{path}: could not write it ({write_failure(e)})") from None
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                if not isinstance(row, dict):
                    raise TypeError(f"write_jsonl: row {n} is {type(row).__name__}, not a dict")
                f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):  # a full disk: one line naming the file, as every write's
            raise WriteError(f"{path}: could not write it ({write_failure(e)})") from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX; not on Windows)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return n
