"""JSONL readers and the atomic writer: every malformed line is refused with "path:line: problem",
valid files round-trip, and a failed write leaves no file (and no temporary file) behind."""
import json
import os

import pytest
from hypothesis import given, strategies as st

from minirlhf.data import DataError, read_prefs, read_prompts, read_sft, write_jsonl

GOOD = {  # a valid line for each reader, and the fields it must have
    read_sft: ({"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."},
               ("prompt", "completion")),
    read_prefs: ({"prompt": "Add 1 and 2.", "chosen": "1 plus 2 is 3.", "rejected": "4."},
                 ("prompt", "chosen", "rejected")),
    read_prompts: ({"prompt": "Which is larger, 3 or 5?"}, ("prompt",)),
}
readers = pytest.mark.parametrize("reader", list(GOOD), ids=lambda r: r.__name__)


class CharTokenizer:
    """One id per character; the chat format adds 3 tokens around the prompt, 1 after the reply."""

    def render_prompt(self, prompt: str) -> list[int]:
        return [1, 2] + [ord(c) for c in prompt] + [3]

    def render(self, prompt: str, response: str) -> tuple[list[int], int]:
        ids = self.render_prompt(prompt)
        return ids + [ord(c) for c in response] + [4], len(ids)


def write_lines(tmp_path, lines, name="data.jsonl"):
    """Lines are JSON-able objects, raw strings, or raw bytes; returns the path as a str."""
    path = tmp_path / name
    raw = b""
    for line in lines:
        if isinstance(line, bytes):
            raw += line + b"\n"
        elif isinstance(line, str):
            raw += line.encode("utf-8") + b"\n"
        else:
            raw += json.dumps(line).encode("utf-8") + b"\n"
    path.write_bytes(raw)
    return str(path)


def refused(reader, path, lineno, *words, **kw) -> DataError:
    """Reading must fail with a one-line message that starts "path:lineno: " and says `words`."""
    with pytest.raises(DataError) as info:
        reader(path, **kw)
    msg = str(info.value)
    assert msg.startswith(f"{path}:{lineno}: "), msg
    assert "\n" not in msg
    assert info.value.lineno == lineno
    for w in words:
        assert w in msg, msg
    return info.value


@readers
def test_bad_json(tmp_path, reader):
    good = GOOD[reader][0]
    path = write_lines(tmp_path, [good, good, '{"prompt": "a",', good])
    refused(reader, path, 3, "bad JSON")


@readers
@pytest.mark.parametrize("line", ['["prompt", "x"]', '"just a string"', "42", "null", "true"])
def test_not_an_object(tmp_path, reader, line):
    path = write_lines(tmp_path, [GOOD[reader][0], line])
    refused(reader, path, 2, "expected a JSON object")


@readers
def test_missing_field(tmp_path, reader):
    good, fields = GOOD[reader]
    for field in fields:
        row = {k: v for k, v in good.items() if k != field}
        path = write_lines(tmp_path, [good, row])
        refused(reader, path, 2, "missing field", f"'{field}'")


@readers
@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_field(tmp_path, reader, value):
    good, fields = GOOD[reader]
    for field in fields:
        path = write_lines(tmp_path, [{**good, field: value}])
        refused(reader, path, 1, f"'{field}'", "empty" if value == "" else "whitespace")


@readers
@pytest.mark.parametrize("value, name", [(3, "number"), (2.5, "number"), (["a"], "list"),
                                         (None, "null"), (True, "boolean"), ({"a": 1}, "object")])
def test_wrong_type(tmp_path, reader, value, name):
    good, fields = GOOD[reader]
    for field in fields:
        path = write_lines(tmp_path, [good, good, {**good, field: value}])
        refused(reader, path, 3, f"'{field}'", "must be a string", name)


@readers
def test_not_utf8(tmp_path, reader):
    good = GOOD[reader][0]
    bad = json.dumps(good).encode("utf-8")[:-2] + b"\xe9\xff" + json.dumps(good).encode()[-2:]
    path = write_lines(tmp_path, [good, bad])
    refused(reader, path, 2, "not valid UTF-8", "0xe9")


def test_chosen_equals_rejected(tmp_path):
    path = write_lines(tmp_path, [GOOD[read_prefs][0],
                                  {"prompt": "Add 1 and 2.", "chosen": "3.", "rejected": "3."}])
    refused(read_prefs, path, 2, "'chosen' and 'rejected' are the same")


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": "Hi?"}, {"role": "robot", "content": "Hello."}],
     ["role", "robot"]),
    ([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": ""}],
     ["'messages[1].content'", "empty"]),
    ([{"role": "user", "content": "Hi?"}], ["last message", "assistant"]),
    ([{"role": "assistant", "content": "Hello."}], ["no user message"]),
    ([{"role": "system", "content": "Be nice."}, {"role": "assistant", "content": "Hi."}],
     ["no user message"]),
    ([{"role": "user", "content": "Hi?"}, "Hello."], ["messages[1] must be an object"]),
    ([{"content": "Hi?"}, {"role": "assistant", "content": "Hello."}], ["'messages[0].role'"]),
    ([], ["non-empty list", "empty list"]),
    ("Hi?", ["non-empty list", "a string"]),
])
def test_bad_messages(tmp_path, messages, words):
    path = write_lines(tmp_path, [GOOD[read_sft][0], {"messages": messages}])
    refused(read_sft, path, 2, *words)


def test_messages_and_prompt_together_is_refused(tmp_path):
    line = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "prompt": "a"}
    refused(read_sft, write_lines(tmp_path, [line]), 1, "both 'messages'")


def test_messages_become_prompt_and_completion(tmp_path):
    """Earlier turns' contents joined by newlines are the prompt; the last (assistant) turn the
    completion; a plain two-turn chat reads exactly like prompt/completion."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."},
            {"role": "assistant", "content": "3."}, {"role": "user", "content": "And 2 and 2?"},
            {"role": "assistant", "content": "4."}]
    two = [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "3."}]
    rows = read_sft(write_lines(tmp_path, [{"messages": chat}, {"messages": two}]))
    assert rows == [{"prompt": "Be brief.\nAdd 1 and 2.\n3.\nAnd 2 and 2?", "completion": "4."},
                    {"prompt": "Add 1 and 2.", "completion": "3."}]


@readers
def test_over_length_is_refused_with_both_lengths(tmp_path, reader):
    good = GOOD[reader][0]
    long = {k: v + " and more" * 10 if k != "prompt" or reader is read_prompts else v
            for k, v in good.items()}
    path = write_lines(tmp_path, [good, "", long])
    tok = CharTokenizer()
    measure = {read_sft: lambda r: len(tok.render(r["prompt"], r["completion"])[0]),
               read_prefs: lambda r: max(len(tok.render(r["prompt"], r[k])[0])
                                         for k in ("chosen", "rejected")),
               read_prompts: lambda r: len(tok.render_prompt(r["prompt"]))}[reader]
    n_good, n_long = measure(good), measure(long)
    max_len = n_good  # the good line fits exactly: the limit is inclusive
    refused(reader, path, 3, f"{n_long} tokens", f"max_len={max_len}",
            tokenizer=tok, max_len=max_len)
    # Without a limit, or with a large one, everything loads.
    assert len(reader(path, tokenizer=tok)) == 2
    assert len(reader(path, tokenizer=tok, max_len=n_long)) == 2


@readers
def test_truncate_skips_long_lines_and_says_how_many(tmp_path, reader, capsys):
    good = GOOD[reader][0]
    long = {k: v * 20 for k, v in good.items()}
    path = write_lines(tmp_path, [long, good, long])
    rows = reader(path, tokenizer=CharTokenizer(), max_len=100, truncate=True)
    assert rows == [good]
    assert "skipped 2 of 3 records" in capsys.readouterr().err
    # All lines too long: nothing to train on is an error, not an empty list.
    path = write_lines(tmp_path, [long], name="all_long.jsonl")
    with pytest.raises(DataError, match="all 1 records are longer"):
        reader(path, tokenizer=CharTokenizer(), max_len=100, truncate=True)


def test_max_len_without_tokenizer_is_a_usage_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        read_prompts(write_lines(tmp_path, [{"prompt": "a"}]), max_len=5)


@readers
def test_missing_file_and_directory(tmp_path, reader):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as info:
        reader(path)
    assert str(info.value) == f"{path}: file not found"
    with pytest.raises(DataError, match="is a directory"):
        reader(str(tmp_path))


@readers
def test_empty_file_and_blank_lines(tmp_path, reader):
    """Blank lines are skipped but counted, so errors point at the line an editor shows."""
    for lines in ([], ["", "  ", "\t"]):
        path = write_lines(tmp_path, lines)
        with pytest.raises(DataError, match="no records") as info:
            reader(path)
        assert str(info.value).startswith(f"{path}: ")
    good = GOOD[reader][0]
    path = write_lines(tmp_path, ["", good, " ", "", good, "", "[1]"])
    refused(reader, path, 7, "expected a JSON object")
    path = write_lines(tmp_path, ["", good, "\r", good, ""])
    assert reader(path) == [good, good]


def test_byte_order_mark_is_accepted(tmp_path):
    path = write_lines(tmp_path, [b"\xef\xbb\xbf" + json.dumps({"prompt": "a"}).encode()])
    assert read_prompts(path) == [{"prompt": "a"}]


def test_error_message_stays_one_line(tmp_path):
    path = write_lines(tmp_path, [{"messages": [{"role": "user", "content": "a"},
                                                {"role": "bad\nrole", "content": "b"}]}])
    refused(read_sft, path, 1, "bad\\nrole")


# ----- hypothesis: bad lines anywhere, round trips of any text

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=5),
                           lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=3), c, max_size=3), max_leaves=8)
not_strings = json_values.filter(lambda v: not isinstance(v, str))
non_blank = st.text(st.characters(exclude_categories=("Cs",)), min_size=1,
                    max_size=30).filter(lambda s: s.strip() != "")


def not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@st.composite
def bad_line(draw, reader):
    """A line `reader` must refuse: non-object JSON, a field removed, a field not a string or
    blank, or bytes that are not UTF-8."""
    good, fields = GOOD[reader]
    kind = draw(st.sampled_from(["non-object", "missing", "wrong type", "blank field", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=20).filter(not_utf8).map(
            lambda b: b.replace(b"\n", b"\xff")))
    if kind == "non-object":
        return json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict))))
    field = draw(st.sampled_from(fields))
    if kind == "missing":
        row = {k: v for k, v in good.items() if k != field}
    elif kind == "wrong type":
        row = {**good, field: draw(not_strings)}
    else:
        row = {**good, field: draw(st.text(alphabet=" \t\n\r", max_size=4))}
    return json.dumps(row)


@given(st.data(), st.integers(0, 6), st.integers(0, 3))
def test_any_bad_line_is_refused_at_its_line_number(tmp_path_factory, data, before, after):
    """Whatever the bad line and wherever it sits among good ones, the error names its line."""
    reader = data.draw(st.sampled_from(list(GOOD)))
    good = GOOD[reader][0]
    line = data.draw(bad_line(reader))
    path = write_lines(tmp_path_factory.mktemp("bad"), [good] * before + [line] + [good] * after)
    refused(reader, path, before + 1)


@given(st.lists(st.tuples(non_blank, non_blank, non_blank).filter(lambda t: t[1] != t[2]),
                min_size=1, max_size=5))
def test_prefs_round_trip_any_text(tmp_path_factory, triples):
    """write_jsonl then read_prefs returns exactly the rows, for any Unicode text (U+2028, quotes,
    newlines and the spelling of special tokens included)."""
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]
    rows[0]["prompt"] += "\u2028<|end|>\x85\"\n"
    path = tmp_path_factory.mktemp("rt") / "sub" / "prefs.jsonl"
    assert write_jsonl(path, rows) == len(rows)
    assert read_prefs(path) == rows


def test_sft_and_prompts_round_trip(tmp_path):
    rows = [{"prompt": "What is 2 plus 3?", "completion": "2 plus 3 is 5."},
            {"prompt": "Ünïcødé 🙂?", "completion": "Yes."}]
    write_jsonl(tmp_path / "s.jsonl", rows)
    assert read_sft(tmp_path / "s.jsonl") == rows
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in rows])
    assert read_prompts(tmp_path / "p.jsonl") == [{"prompt": r["prompt"]} for r in rows]
    assert read_sft(tmp_path / "s.jsonl", tokenizer=CharTokenizer(), max_len=1000) == rows


# ----- the atomic writer

@pytest.mark.parametrize("bad_row", [{"x": object()}, {"x": float("nan")}, ["not", "a dict"],
                                     {"x": "\ud800"}])
def test_failed_write_leaves_no_file(tmp_path, bad_row):
    path = tmp_path / "out" / "data.jsonl"
    with pytest.raises((TypeError, ValueError)):
        write_jsonl(path, [{"x": 1}, bad_row, {"x": 2}])
    assert not path.exists()
    assert os.listdir(tmp_path / "out") == []  # no temporary file either


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"prompt": "old"}])
    before = path.read_bytes()

    def rows():
        yield {"prompt": "new"}
        raise RuntimeError("the producer crashed halfway")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["data.jsonl"]


def test_write_creates_parents_and_writes_one_object_a_line(tmp_path):
    path = tmp_path / "a" / "b" / "rows.jsonl"
    assert write_jsonl(path, ({"i": i, "s": "é"} for i in range(3))) == 3
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and [json.loads(l) for l in lines[:-1]] == [{"i": i, "s": "é"}
                                                                        for i in range(3)]
    assert sorted(os.listdir(path.parent)) == ["rows.jsonl"]
