"""Tokenizers: our own byte-level BPE trainer, wrapped as a `tiktoken.Encoding`, plus GPT-2's.

    tok = Tokenizer.train(text, vocab_size=512)      # built-in world: BPE trained on its text
    tok.save("out/tokenizer.tiktoken"); tok = Tokenizer.load("out/tokenizer.tiktoken")
    tok = Tokenizer.gpt2()                            # tiktoken's GPT-2 encoding (by name)
    tok = Tokenizer.gpt2("path/to/gpt2.tiktoken")     # the same from a local rank file (offline)
    tok = Tokenizer.gpt2("gpt2/vocab.json")           # ... or from a Hugging Face download
    ids, n_prompt = tok.render("What is 2 plus 3?", "2 plus 3 is 5.")

The trainer is the textbook algorithm (Sennrich et al. 2016, byte-level as in GPT-2): split text
into pre-tokens with GPT-2's regex, count each *distinct* pre-token once with its frequency, then
repeatedly merge the most frequent adjacent pair, updating only the words that contain it. Digits
are never merged, so numbers stay one token per digit (arithmetic is easier to learn that way).
The result is a table of "mergeable ranks" (bytes -> id) that tiktoken encodes with directly.

The chat template. World tokenizers own five special tokens:
    <|bos|> <|user|> prompt <|assistant|> response <|end|>      (<|pad|> pads batches)
GPT-2 has one special token, so its template is text (the Anthropic HH form):
    "\\n\\nHuman: prompt\\n\\nAssistant:" response <|endoftext|>
(a prompt that already ends with "\\n\\nAssistant:", a whole HH dialogue so far, is kept as it is).
User text that spells a special token ("<|end|>") is always encoded as plain text, never as the
control token. Left out: normalisation, byte fallback tricks, sentencepiece.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
from collections import Counter, defaultdict

import regex
import tiktoken

from .errors import TokenizerError, replacing

# GPT-2's pre-tokenisation pattern: contractions, letters, numbers, punctuation, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|bos|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"  # GPT-2 chat template: HH turn markers
MAX_RANK = 2**20  # ranks (token ids) run below this: four times the largest vocabularies in use


def train_bpe(text: str, vocab_size: int, merge_digits: bool = False) -> dict[bytes, int]:
    """Train byte-level BPE; returns mergeable ranks {token bytes: id}, ids 0..vocab_size-1.

    The 256 single bytes come first, then one new token per merge, in merge order (tiktoken
    applies merges by rank, so this order *is* the merge list).
    """
    if vocab_size < 256:
        raise TokenizerError(f"vocab_size {vocab_size} is below the 256 byte tokens")
    word_freq = Counter(regex.findall(GPT2_PATTERN, text))  # each distinct pre-token once
    words = [list(w.encode("utf-8")) for w in word_freq]    # token ids per distinct word
    freqs = list(word_freq.values())
    vocab = [bytes([b]) for b in range(256)]                # id -> bytes
    is_digit = [bytes([b]).isdigit() for b in range(256)]  # ASCII 0-9 only: chr(0xB2) is '²'

    pair_count: Counter = Counter()               # (a, b) -> weighted count over all words
    where: dict = defaultdict(set)                # (a, b) -> indices of words containing it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freqs[i]
            where[pair].add(i)

    def mergeable(pair):
        return merge_digits or not (is_digit[pair[0]] or is_digit[pair[1]])

    # A max-heap of (-count, pair) with lazy deletion: when a pair's count changes we push the
    # new count and skip stale entries on the way out. This keeps each merge cheap.
    heap = [(-c, p) for p, c in pair_count.items() if mergeable(p)]
    heapq.heapify(heap)
    while len(vocab) < vocab_size:
        best = None
        while heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) == -neg > 0:
                best = pair  # the most frequent pair; ties go to the smaller ids
                break
        if best is None:
            break  # nothing left to merge: the text is fully compressed
        new_id = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        is_digit.append(is_digit[best[0]] or is_digit[best[1]])
        changed = set()
        for i in where.pop(best):
            w, f = words[i], freqs[i]
            for pair in zip(w, w[1:]):            # forget this word's old pairs
                pair_count[pair] -= f
                changed.add(pair)
            merged, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(w[j])
                    j += 1
            words[i] = merged
            for pair in zip(merged, merged[1:]):  # count its new ones
                pair_count[pair] += f
                where[pair].add(i)
                changed.add(pair)
        del pair_count[best]
        for pair in changed - {best}:
            if mergeable(pair) and pair_count[pair] > 0:
                heapq.heappush(heap, (-pair_count[pair], pair))
    return {tok: i for i, tok in enumerate(vocab)}


def save_ranks(ranks: dict[bytes, int], path: str) -> None:
    """tiktoken's rank-file format: one 'base64(token) rank' line per token; atomic write."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as tmp:
        with open(tmp, "w") as f:
            for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
            f.flush()
            os.fsync(f.fileno())


def load_ranks(path: str) -> dict[bytes, int]:
    """Read a rank file directly (tiktoken's own loader caches by path, which goes stale when a
    file at the same path is rewritten). Every line must hold a token and a rank below
    MAX_RANK, each token and rank once, and every byte must be a token: a huge rank (tiktoken's
    OverflowError, or an embedding of that many rows), a token or rank given twice, or a missing
    byte (tiktoken panics on text holding it) is refused in one line."""
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: tokenizer rank file not found")
    ranks, line_of = {}, {}  # token -> rank; rank -> its line
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                tok, rank = base64.b64decode(tok, validate=True), int(rank)
            except Exception:
                raise TokenizerError(f"{path}:{n}: not a tiktoken rank line "
                                     f"(expected 'base64 rank')") from None
            problem = (f"rank {rank} is out of range (0 to {MAX_RANK - 1})"
                       if not 0 <= rank < MAX_RANK else
                       f"rank {rank} is given twice (line {line_of[rank]} too)"
                       if rank in line_of else
                       f"token {tok!r} is listed twice" if tok in ranks else None)
            if problem:
                raise TokenizerError(f"{path}:{n}: {problem}")
            ranks[tok], line_of[rank] = rank, n
    if not ranks:
        raise TokenizerError(f"{path}: rank file is empty")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: byte 0x{missing[0]:02x} is not a token (a byte-level BPE "
                             f"table holds all 256 bytes; {len(missing)} missing)")
    return ranks


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's vocab.json spells each byte as a printable character: printable bytes other than
    space stand for themselves, the 68 others (in byte order) for chr(256), chr(257), ..."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def load_hf_vocab(path: str, specials=("<|endoftext|>",)) -> dict[bytes, int]:
    """Mergeable ranks from a Hugging Face GPT-2 `vocab.json` (OpenAI's encoder.json): its ids
    are the BPE ranks, so no merges file is needed. `specials` are left out (GPT-2 has one,
    <|endoftext|>; a world tokenizer exported by `minirlhf.export` has SPECIAL_TOKENS)."""
    try:
        vocab = json.load(open(path, encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: GPT-2 vocab.json not found") from None
    except (ValueError, OSError) as e:
        raise TokenizerError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    byte_of = gpt2_byte_decoder()
    try:
        ranks = {bytes(byte_of[c] for c in tok): int(i) for tok, i in vocab.items()
                 if tok not in specials}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TokenizerError(f"{path}: not a GPT-2 vocab.json (token -> id in GPT-2's byte "
                             f"spelling)") from None
    check_complete(ranks, path)
    return ranks


def check_complete(ranks: dict[bytes, int], path: str) -> None:
    """Refuse a token table with holes: its ids must be 0..N-1, each once, and every single
    byte must be a token (else a sampled id, or some text, would have no bytes to decode to)."""
    ids = sorted(ranks.values())
    if ids != list(range(len(ids))):
        gap = next((i for i, r in enumerate(ids) if i != r), len(ids))
        raise TokenizerError(f"{path}: incomplete token table: id {gap} is missing or repeated "
                             f"(ids must run 0..{len(ids) - 1})")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{path}: incomplete token table: byte {missing[0]} has no token "
                             f"({len(missing)} of the 256 bytes missing)")


def gpt2_byte_encoder() -> dict[int, str]:
    """The inverse of `gpt2_byte_decoder`: byte -> the character vocab.json spells it with."""
    return {b: c for c, b in gpt2_byte_decoder().items()}


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of a byte-level BPE, in rank order, from its table of ranks alone.

    A token of rank r was made by merging two tokens of lower rank. Which two: encode its bytes
    with the merges of rank < r only (the textbook loop: merge the lowest-ranked adjacent pair
    until none is left); exactly two parts remain. This is what Hugging Face's merges.txt lists.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {rank}) is not a merge of two tokens "
                                 f"of lower rank: not a byte-level BPE table")
        merges.append((parts[0], parts[1]))
    return merges


class Tokenizer:
    """A tiktoken Encoding plus the chat template. `kind` is "world" or "gpt2"."""

    def __init__(self, enc: tiktoken.Encoding, kind: str, source: str):
        self.enc, self.kind, self.source = enc, kind, source
        if kind == "world":
            ids = [enc._special_tokens[s] for s in SPECIAL_TOKENS]
            self.bos_id, self.user_id, self.assistant_id, self.end_id, self.pad_id = ids
        else:  # GPT-2 has a single special token; it serves as end and padding
            eot = enc._special_tokens["<|endoftext|>"]
            self.bos_id = self.end_id = self.pad_id = eot
            self.user_id = self.assistant_id = None
        self.vocab_size = enc.n_vocab

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], source: str = "memory") -> "Tokenizer":
        n = max(ranks.values()) + 1
        specials = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name=f"minirlhf-{len(ranks)}", pat_str=GPT2_PATTERN,
                                mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc, "world", source)

    @classmethod
    def train(cls, text: str, vocab_size: int = 512) -> "Tokenizer":
        """vocab_size counts the mergeable tokens; the 5 special tokens come on top."""
        return cls.from_ranks(train_bpe(text, vocab_size))

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        return cls.from_ranks(load_ranks(path), source=os.path.abspath(path))

    @classmethod
    def gpt2(cls, rank_file: str | None = None) -> "Tokenizer":
        """GPT-2's encoding: from a local file when given (a tiktoken rank file, or a Hugging Face
        `vocab.json`), else tiktoken's by name."""
        if rank_file is not None:
            is_json = rank_file.endswith(".json")
            ranks = load_hf_vocab(rank_file) if is_json else load_ranks(rank_file)
            enc = tiktoken.Encoding(name="gpt2-local", pat_str=GPT2_PATTERN,
                                    mergeable_ranks=ranks,
                                    special_tokens={"<|endoftext|>": 50256})
            return cls(enc, "gpt2", os.path.abspath(rank_file))
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cached copy
            raise TokenizerError(
                "the GPT-2 encoding is not available offline: put GPT-2's vocab.json (part of "
                "the Hugging Face download) or a *.tiktoken rank file in the gpt2:DIR folder "
                f"[{type(e).__name__}]") from None
        return cls(enc, "gpt2", "gpt2")

    def hf_files(self) -> dict[str, str]:
        """The tokenizer as the files Hugging Face's GPT-2 tokenizers read: vocab.json and
        merges.txt (byte-level BPE in GPT-2's byte spelling, ids = our ranks), with the special
        tokens and the chat template (a Jinja template that renders `render_prompt`'s layout)
        in tokenizer_config.json and special_tokens_map.json. {file name: text}."""
        spell = gpt2_byte_encoder()
        word = lambda b: "".join(spell[x] for x in b)  # noqa: E731
        ranks = self.enc._mergeable_ranks
        vocab = {word(t): r for t, r in ranks.items()}
        vocab.update(self.enc._special_tokens)
        merges = "#version: 0.2\n" + "".join(f"{word(a)} {word(b)}\n"
                                              for a, b in bpe_merges(ranks))
        specials = sorted(self.enc._special_tokens, key=self.enc._special_tokens.get)
        end = self.enc.decode([self.end_id])
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
                  "model_max_length": 1024, "bos_token": self.enc.decode([self.bos_id]),
                  "eos_token": end, "pad_token": self.enc.decode([self.pad_id]),
                  "unk_token": end, "additional_special_tokens": specials,
                  "chat_template": self.chat_template()}
        tokens_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token",
                                             "unk_token", "additional_special_tokens")}
        return {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": merges,
                "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
                "special_tokens_map.json": json.dumps(tokens_map, indent=2)}

    def chat_template(self) -> str:
        """A Jinja chat template that renders a single-turn chat as `render` does."""
        if self.kind == "world":
            user, end = "<|bos|><|user|>{{ m['content'] }}<|assistant|>", "<|end|>"
            answer = "{{ m['content'] }}"
        else:
            user, end = f"{HUMAN} {{{{ m['content'] }}}}{ASSISTANT}", "<|endoftext|>"
            answer = " {{ m['content'] }}"
        return ("{% for m in messages %}{% if m['role'] == 'user' %}" + user +
                "{% else %}" + answer + end + "{% endif %}{% endfor %}")

    def save(self, path: str) -> None:
        """The token table as a rank file (GPT-2's too: Tokenizer.gpt2(path) reads it back)."""
        save_ranks(self.enc._mergeable_ranks, path)

    def fingerprint(self) -> str:
        """A short hash of the token table: a checkpoint remembers which tokenizer it used."""
        h = hashlib.sha1()
        for tok, rank in sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1]):
            h.update(tok + rank.to_bytes(4, "little"))
        return h.hexdigest()[:16]

    def reference(self) -> dict:
        return {"kind": self.kind, "source": self.source, "vocab_size": self.vocab_size,
                "fingerprint": self.fingerprint()}

    # --- text <-> ids -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text to ids; special-token spellings inside the text stay text."""
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids) -> str:
        """ids -> text. An id without bytes in the table (a model may sample any id of its
        embedding, which can be larger than a stand-in table) reads as U+FFFD, not a crash."""
        ids = list(ids)
        try:
            return self.enc.decode(ids)
        except KeyError:  # an id the table lacks: U+FFFD in its place
            parts = []
            for i in ids:
                try:
                    parts.append(self.enc.decode_single_token_bytes(i))
                except KeyError:
                    parts.append("\ufffd".encode())
            return b"".join(parts).decode("utf-8", "replace")

    # --- chat template ------------------------------------------------------------------
    def render_prompt(self, prompt: str) -> list[int]:
        """The tokens a policy sees before it answers (ends where the response begins).

        GPT-2: a prompt that already ends with "\\n\\nAssistant:" (an Anthropic HH dialogue, its
        earlier turns included) is used as it is, so the markers are never doubled."""
        if self.kind == "world":
            return [self.bos_id, self.user_id] + self.encode(prompt) + [self.assistant_id]
        if prompt.endswith(ASSISTANT):
            return self.encode(prompt)
        return self.encode(f"{HUMAN} {prompt}{ASSISTANT}")

    def render(self, prompt: str, response: str, end: bool = True) -> tuple[list[int], int]:
        """prompt + response (+ end token) -> (ids, n_prompt); ids[n_prompt:] is the response.

        GPT-2: one space joins "Assistant:" and the response, unless the response already starts
        with whitespace (TL;DR-style data often starts with " " or a newline)."""
        p = self.render_prompt(prompt)
        text = response if self.kind == "world" or response[:1].isspace() else " " + response
        return p + self.encode(text) + ([self.end_id] if end else []), len(p)


# ----------------------------------------------------------------------------------------------
# Command line: train a tokenizer on your own text
# ----------------------------------------------------------------------------------------------

TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected")


def corpus_text(path: str) -> str:
    """The text a tokenizer is trained on: a .jsonl file's text fields (prompt, completion,
    chosen, rejected, and every message's content), one per line; any other file as it is."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except FileNotFoundError:
        raise TokenizerError(f"--data {path}: file not found") from None
    except (UnicodeDecodeError, OSError) as e:
        raise TokenizerError(f"--data {path}: not a readable UTF-8 text file "
                             f"({type(e).__name__})") from None
    if not path.endswith(".jsonl"):
        return raw
    parts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise TokenizerError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(row, dict):
            raise TokenizerError(f"{path}:{n}: not a JSON object")
        parts += [row[k] for k in TEXT_FIELDS if isinstance(row.get(k), str)]
        parts += [m["content"] for m in row.get("messages") or []
                  if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return "\n".join(parts)


def main(argv=None) -> Tokenizer:
    """python -m minirlhf.tokenizer train --data FILE [FILE ...] --vocab-size N --out DIR"""
    import argparse
    import sys
    prog = "python -m minirlhf.tokenizer"
    ap = argparse.ArgumentParser(prog=prog, description="Train the project's byte-level BPE on "
                                 "your own text; train_sft.py --tokenizer DIR starts from it.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a tokenizer and write DIR/tokenizer.tiktoken")
    t.add_argument("--data", nargs="+", required=True,
                   help="JSONL files (their text fields) or plain text files")
    t.add_argument("--vocab-size", type=int, default=512,
                   help="mergeable tokens, at least 256 (the 5 special tokens come on top)")
    t.add_argument("--out", required=True, help="folder for tokenizer.tiktoken")
    args = ap.parse_args(argv)
    try:
        if args.vocab_size < 256:
            raise TokenizerError(f"--vocab-size {args.vocab_size}: at least 256 (the bytes)")
        text = "\n".join(corpus_text(p) for p in args.data)
        if not text.strip():
            raise TokenizerError("--data: the files hold no text to train on")
        tok = Tokenizer.train(text, args.vocab_size)
        path = os.path.join(args.out, "tokenizer.tiktoken")
        tok.save(path)
    except (TokenizerError, OSError) as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        raise SystemExit(2)
    n = len(tok.encode(text))
    print(f"wrote {path}: {tok.vocab_size} tokens ({len(tok.enc._mergeable_ranks)} BPE + 5 "
          f"special); the training text is {len(text.encode()):,} bytes = {n:,} tokens "
          f"({len(text.encode()) / max(n, 1):.2f} bytes per token)")
    return tok


if __name__ == "__main__":
    main()
