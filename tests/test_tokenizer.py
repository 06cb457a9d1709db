"""Properties of minirlhf/tokenizer.py: lossless round trips on any text, special-token spellings
stay text, rank files round-trip and are re-read when rewritten, digits stay single bytes, the chat
template's prompt/response split, GPT-2 mode from a local rank file, and one-line load errors.
"""
import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minirlhf.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError, save_ranks, train_bpe

CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is 12 plus 30? 12 plus 30 is 42.\n"
    "She sells sea shells by the sea shore; the shells she sells are sea shells, I'm sure.\n"
    "Über café naïve — déjà vu. Привет, как дела? 東京は大きい。 3.14159 2718 1000000 \n"
) * 20
SAMPLES = ["What is 7 plus 8?", "the sea shore", "Привет мир", "déjà vu 東京", "  spaces\tand\nlines",
           "emoji 🙂 and 100200300"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=256 + 120)


@given(text=st.text(max_size=80))
def test_decode_inverts_encode_on_any_unicode(tok, text):
    """decode(encode(s)) == s for every string, including characters never seen in training."""
    assert tok.decode(tok.encode(text)) == text


def test_training_learns_merges(tok):
    """The trained table has the asked-for size and compresses its own corpus below 1 byte/token."""
    assert len(tok.enc._mergeable_ranks) == 256 + 120
    assert len(tok.encode(CORPUS)) < 0.5 * len(CORPUS.encode())


@given(parts=st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS + ["<|endoftext|>"]),
                                st.text(max_size=8)), max_size=6))
def test_special_token_spellings_in_text_stay_text(tok, parts):
    """User text spelling "<|end|>", "<|pad|>", ... encodes to ordinary byte tokens (no special id)
    and decodes back to the same text."""
    text = "".join(parts)
    ids = tok.encode(text)
    specials = {tok.bos_id, tok.user_id, tok.assistant_id, tok.end_id, tok.pad_id}
    assert not specials & set(ids)
    assert all(i < len(tok.enc._mergeable_ranks) for i in ids)
    assert tok.decode(ids) == text


def test_saved_ranks_load_back_identically(tok, tmp_path):
    """save -> load gives the same table: same fingerprint, same ids on sample strings."""
    path = str(tmp_path / "tok.tiktoken")
    tok.save(path)
    back = Tokenizer.load(path)
    assert back.fingerprint() == tok.fingerprint()
    assert back.enc._mergeable_ranks == tok.enc._mergeable_ranks
    assert (back.end_id, back.pad_id, back.vocab_size) == (tok.end_id, tok.pad_id, tok.vocab_size)
    for s in SAMPLES:
        assert back.encode(s) == tok.encode(s)


def test_rewritten_rank_file_is_read_again(tok, tmp_path):
    """Loading a path after another table was saved there gives the new table, not a cached one
    (both tables have the same size, so a cache keyed by name or path would collide)."""
    path = str(tmp_path / "tok.tiktoken")
    tok.save(path)
    first = Tokenizer.load(path)
    other = Tokenizer.train("completely different words: zebra yak quokka " * 30, 256 + 120)
    assert other.fingerprint() != first.fingerprint()
    other.save(path)
    second = Tokenizer.load(path)
    assert second.fingerprint() == other.fingerprint()
    assert second.encode("zebra yak quokka") == other.encode("zebra yak quokka")
    assert second.encode("zebra yak quokka") != first.encode("zebra yak quokka")


def test_digits_are_never_merged():
    """Every token containing an ASCII digit is a single byte, on a corpus where merging digits
    would pay (and does, when merge_digits=True)."""
    text = "123 456 123456 2024 1000 " * 50 + "abc abd " * 10
    for merge_digits, want_single in [(False, True), (True, False)]:
        ranks = train_bpe(text, 256 + 40, merge_digits=merge_digits)
        digit_tokens = [t for t in ranks if any(48 <= b <= 57 for b in t)]
        assert all(len(t) == 1 for t in digit_tokens) == want_single
    tok = Tokenizer.from_ranks(train_bpe(text, 256 + 40))
    assert len(tok.encode("1234567890")) == 10


def test_non_digit_bytes_can_merge():
    """Only ASCII digits are held back: UTF-8 continuation bytes that happen to be digits in
    Latin-1 (0xB2 '²', 0xB3, 0xB9) still merge, so Cyrillic 'в' (D0 B2) becomes one token."""
    tok = Tokenizer.train("в в в вв ввв " * 40, 256 + 4)
    assert len(tok.encode("в")) == 1


@given(prompt=st.text(max_size=30), response=st.text(max_size=30))
def test_render_splits_prompt_and_response(tok, prompt, response):
    """render(prompt, response) = render_prompt(prompt) + encode(response) + [end]: n_prompt marks
    the split, the response decodes back, and end=False drops only the end token."""
    ids, n_prompt = tok.render(prompt, response)
    assert ids[:n_prompt] == tok.render_prompt(prompt)
    assert ids[:2] == [tok.bos_id, tok.user_id] and ids[n_prompt - 1] == tok.assistant_id
    assert ids[-1] == tok.end_id
    assert tok.decode(ids[n_prompt:-1]) == response
    assert tok.render(prompt, response, end=False) == (ids[:-1], n_prompt)


def tiny_gpt2_ranks() -> dict[bytes, int]:
    """A GPT-2-shaped table: the 256 bytes, a few merges, and GPT-2's ids for "Hello", " world"."""
    ranks = {bytes([b]): b for b in range(256)}
    merges = [b"He", b"ll", b"llo", b" w", b"or", b"ld", b"orld"]
    ranks.update({m: 256 + i for i, m in enumerate(merges)})
    ranks.update({b"Hello": 15496, b" world": 995})
    return ranks


def test_gpt2_mode_from_a_local_rank_file(tmp_path):
    """Tokenizer.gpt2(path) encodes with the file's ranks: "Hello world" -> GPT-2's [15496, 995];
    its single special token <|endoftext|> (50256) ends and pads."""
    path = str(tmp_path / "gpt2.tiktoken")
    save_ranks(tiny_gpt2_ranks(), path)
    tok = Tokenizer.gpt2(path)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.end_id == tok.pad_id == 50256
    assert tok.encode("<|endoftext|>") != [50256]
    ids, n_prompt = tok.render("Hello", "world")
    assert tok.decode(ids[:n_prompt]) == "\n\nHuman: Hello\n\nAssistant:"
    assert ids[n_prompt:] == [995, 50256]


def test_gpt2_real_encoding_if_available():
    """tiktoken's own GPT-2 encoding (when cached offline) gives the well-known ids."""
    try:
        tok = Tokenizer.gpt2()
    except TokenizerError as e:
        assert "offline" in str(e)
        pytest.skip("tiktoken's gpt2 encoding is not available offline")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.end_id == 50256


def test_missing_rank_file_names_the_file(tmp_path):
    """A missing rank file is a TokenizerError naming the path."""
    path = str(tmp_path / "nowhere.tiktoken")
    for load in (Tokenizer.load, Tokenizer.gpt2):
        with pytest.raises(TokenizerError, match="nowhere.tiktoken"):
            load(path)


@pytest.mark.parametrize("bad", ["not-base64!! 5", "QQ==", "QQ== five", "QQ== 1 2"])
def test_malformed_rank_line_names_file_and_line(tmp_path, bad):
    """A malformed line is a TokenizerError naming the file and the line number."""
    path = str(tmp_path / "bad.tiktoken")
    good = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(3))
    with open(path, "w") as f:
        f.write(good + bad + "\n")
    with pytest.raises(TokenizerError, match=f"{path}:4:"):
        Tokenizer.load(path)


def test_empty_rank_file_is_refused(tmp_path):
    """An empty rank file is a TokenizerError, not an empty tokenizer."""
    path = tmp_path / "empty.tiktoken"
    path.write_text("\n")
    with pytest.raises(TokenizerError, match="empty"):
        Tokenizer.load(str(path))


def test_train_command_writes_a_tokenizer_of_your_text(tmp_path, capsys):
    """`python -m minirlhf.tokenizer train` reads a JSONL file's text fields (prompt,
    completion, chosen, rejected, messages), trains the project's BPE on them and writes a rank
    file that loads back as the same tokenizer; a text file is read as it is."""
    import json
    from minirlhf.tokenizer import corpus_text, main
    rows = [{"prompt": "Spell it backwards: level", "completion": "level"},
            {"prompt": "p", "chosen": "good answer", "rejected": "bad answer"},
            {"messages": [{"role": "user", "content": "hi there"},
                          {"role": "assistant", "content": "hello again"}]}]
    data = tmp_path / "own.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows * 20) + "\n\n")
    text = corpus_text(str(data))
    for piece in ("Spell it backwards: level", "good answer", "bad answer", "hello again"):
        assert piece in text
    assert '"prompt"' not in text  # the field names are not text to learn
    tok = main(["train", "--data", str(data), "--vocab-size", "280", "--out", str(tmp_path / "t")])
    back = Tokenizer.load(str(tmp_path / "t" / "tokenizer.tiktoken"))
    assert back.fingerprint() == tok.fingerprint() and back.vocab_size == 280 + 5
    assert back.decode(back.encode("Spell it backwards: level")) == "Spell it backwards: level"
    assert len(back.encode("good answer")) < len("good answer".encode())  # merges were learned
    plain = tmp_path / "notes.txt"
    plain.write_text("plain words, plain text\n" * 30)
    assert corpus_text(str(plain)) == plain.read_text()


@pytest.mark.parametrize("args, words", [
    (["--data", "/no/such.jsonl"], "file not found"),
    (["--data", "BAD", "--vocab-size", "100"], "at least 256"),
    (["--data", "NOTJSON"], ":2: not a JSON line"),
])
def test_train_command_errors_are_one_line(tmp_path, capsys, args, words):
    from minirlhf.tokenizer import main
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    args = [str(bad) if a in ("BAD", "NOTJSON") else a for a in args]
    with pytest.raises(SystemExit) as e:
        main(["train", *args, "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "t").exists()  # nothing written


def test_an_incomplete_vocab_json_is_refused_in_one_line(tmp_path):
    """A vocab.json with a hole in its ids, or without a token for some byte, is refused at
    load (a sampled id, or some text, would have nothing to decode to)."""
    import json
    from minirlhf.tokenizer import gpt2_byte_encoder
    spell = gpt2_byte_encoder()
    vocab = {spell[b]: b for b in range(256)}
    vocab[spell[10] + spell[10]] = 256
    for broken, words in (({**vocab, spell[32] + spell[97]: 258}, "id 257 is missing"),
                          ({k: v for k, v in vocab.items() if v != 7} | {"xx": 7},
                           "byte 7 has no token")):
        path = tmp_path / "vocab.json"
        path.write_text(json.dumps({**broken, "<|endoftext|>": 50256}))
        with pytest.raises(TokenizerError, match=words) as e:
            Tokenizer.gpt2(str(path))
        assert "\n" not in str(e.value)
    path.write_text(json.dumps({**vocab, "<|endoftext|>": 50256}))
    assert Tokenizer.gpt2(str(path)).decode([104, 105]) == "hi"


def test_decoding_an_id_the_table_lacks_gives_a_replacement_character(tok):
    """A model's embedding may be larger than its tokenizer's table (GPT-2 pads it to 50304
    rows): an id without bytes decodes to U+FFFD in its place, the rest as usual."""
    ids = tok.encode("sea shore")
    assert tok.decode(ids + [10**6] + ids) == "sea shore\ufffdsea shore"
