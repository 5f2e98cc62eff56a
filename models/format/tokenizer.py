"""Tokenizer: a thin wrapper over a `tokenizers` tokenizer.json, plus the byte string of
every token (token alignment matches generated tokens against characters by bytes)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer

# Our tokenizers' pre-tokeniser (models/train/tokenizer.py trains with it), tried left to
# right at each position: an identifier with at most one leading space or punctuation mark;
# up to three digits; a run of punctuation with an optional leading space; line breaks with
# the next line's indentation; spaces before a word, leaving the last one for the word; any
# other whitespace.
CODE_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}_]?[\p{L}_][\p{L}\p{N}_]*"
    r"| ?\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}_]+"
    r"|[ \t]*[\r\n]+[ \t]*"
    r"|[ \t]+(?!\S)"
    r"|\s+"
)
# Qwen2's pre-tokeniser (and Llama 3's, with numbers of up to three digits), as their
# tokenizer.json files give it
QWEN2_SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPLIT_PATTERN = QWEN2_SPLIT_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# Where a text may be cut and its two parts encoded apart, by pre-tokeniser:
#  "blank": before the first non-blank character of a line. CODE_SPLIT_PATTERN's line-break
#    piece takes every blank after the line break and ends there (so does its last
#    alternative, any whitespace), and no other piece holds a line break.
#  "break": right after the last line break of a run of whitespace that a non-blank
#    character ends. Qwen2's line-break piece (\s*[\r\n]+) ends at a run's last line break,
#    a punctuation piece takes all the line breaks right after it, and no other piece holds
#    one; the blanks after it start new pieces.
LINE_CUTS = {CODE_SPLIT_PATTERN: "blank", QWEN2_SPLIT_PATTERN: "break", LLAMA3_SPLIT_PATTERN: "break"}
REUSE_MIN_CHARS = 256  # encode_reusing re-encodes texts sharing less than this with the last one whole


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """Encode/decode plus per-token bytes; knows nothing of models."""

    def __init__(self, hf: _HFTokenizer, special_tokens: dict[str, int] | None = None):
        self._tok = hf
        self.special_tokens = dict(special_tokens or {})
        model = json.loads(hf.to_str())
        self._model_json = model
        for entry in model.get("added_tokens", []):
            if entry.get("special"):
                self.special_tokens.setdefault(entry["content"], entry["id"])

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        return cls(_HFTokenizer.from_file(str(path)))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids for text, with no special tokens added; sentinel strings in text stay text.
        Through encode_batch, which releases the GIL while it works (encode holds it): a
        keystroke's prompt is kilobytes of text, milliseconds of encoding that a batching
        engine's scheduler thread, or a language server's event loop, would otherwise wait out."""
        try:
            return self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        except (TypeError, ValueError):  # lone surrogates (e.g. from JSON escapes) are not text
            clean = text.encode("utf-8", errors="replace").decode("utf-8")
            return self._tok.encode_batch([clean], add_special_tokens=False)[0].ids

    @cached_property
    def line_cut(self) -> str | None:
        """Where encode(a + b) == encode(a) + encode(b) holds for this tokenizer (LINE_CUTS:
        "blank" for ours, "break" for Qwen2's and Llama 3's), or None: not known, so
        encode_reusing encodes whole. Besides the pre-tokeniser's pattern that takes a
        normaliser that is none or NFC (nothing composes with a line break or a blank),
        BPE without dropout merging within pieces, and no added token that strips the
        whitespace around it."""
        m = self._model_json
        pre = m.get("pre_tokenizer") or {}
        parts = pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else []
        model = m.get("model") or {}
        normalizer = m.get("normalizer")
        if not (normalizer is None or normalizer.get("type") == "NFC"):
            return None
        if not (model.get("type") == "BPE" and not model.get("dropout") and len(parts) == 2
                and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated"
                and not parts[0].get("invert") and parts[1].get("type") == "ByteLevel"
                and parts[1].get("use_regex") is False
                and not any(t.get("lstrip") or t.get("rstrip") for t in m.get("added_tokens", []))):
            return None
        return LINE_CUTS.get((parts[0].get("pattern") or {}).get("Regex"))

    @cached_property
    def _token_lengths(self) -> np.ndarray:
        return np.array([len(b) for b in self.token_bytes], dtype=np.int64)

    def encode_reusing(self, text: str, last: tuple[str, list[int]] | None) -> list[int]:
        """encode(text), where `last` is an earlier text and its encode(): the ids of the
        part before the last line start (line_cut's) inside what the two texts share are
        kept, and only the rest is encoded (a keystroke's prompt re-encodes its own line,
        not kilobytes). The same ids as encode(text); tokenizers with no known line cut,
        and texts sharing little with the last, are encoded whole."""
        cut_rule = self.line_cut
        if last is None or cut_rule is None:
            return self.encode(text)
        old, ids = last
        shared = _common_prefix_len(old, text)
        if shared < REUSE_MIN_CHARS:
            return self.encode(text)
        cut = _cut_before(text, shared, cut_rule)
        if cut < REUSE_MIN_CHARS // 2:
            return self.encode(text)
        lengths = np.cumsum(self._token_lengths[np.asarray(ids, dtype=np.int64)]) if ids else np.zeros(0, np.int64)
        old_bytes = len(old.encode("utf-8", errors="replace"))
        if not len(lengths) or lengths[-1] != old_bytes:  # a special token's text in it: no byte map
            return self.encode(text)
        target = len(text[:cut].encode("utf-8", errors="replace"))
        k = int(np.searchsorted(lengths, target))
        if k >= len(lengths) or lengths[k] != target:  # no token ends there (cannot happen): whole
            return self.encode(text)
        return list(ids[: k + 1]) + self.encode(text[cut:])

    def decode(self, ids: list[int]) -> str:
        return self.bytes_of(ids).decode("utf-8", errors="replace")

    def bytes_of(self, ids) -> bytes:
        tb = self.token_bytes
        return b"".join(tb[i] for i in ids)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (special tokens: empty)."""
        size = self.vocab_size
        out: list[bytes] = [b""] * size
        vocab = self._tok.get_vocab(with_added_tokens=True)
        special = set(self.special_tokens.values())
        model_type = self._model_json.get("model", {}).get("type", "BPE")
        byte_level = _uses_byte_level(self._model_json)
        for piece, idx in vocab.items():
            if idx >= size or idx in special:
                continue
            out[idx] = _piece_to_bytes(piece, byte_level, model_type)
        return out


def _uses_byte_level(model_json: dict) -> bool:
    def has(obj) -> bool:
        if not obj:
            return False
        if obj.get("type") == "ByteLevel":
            return True
        return any(has(x) for x in obj.get("pretokenizers", []) + obj.get("decoders", []))
    return has(model_json.get("pre_tokenizer")) or has(model_json.get("decoder"))


def _piece_to_bytes(piece: str, byte_level: bool, model_type: str) -> bytes:
    if byte_level:
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        except KeyError:  # an added (non-special) token stored as plain text
            return piece.encode("utf-8")
    # SentencePiece-style vocabularies (Llama 2, CodeLlama): ▁ is a space, <0xNN> a byte
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def _common_prefix_len(a: str, b: str) -> int:
    """The length of the longest common prefix (a binary search over slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cut_before(text: str, end: int, rule: str) -> int:
    """The last offset p < end where LINE_CUTS' `rule` allows a cut, whatever follows `end`
    (0 where there is none). Both rules look at the last line break whose run of whitespace
    a non-blank character ends before `end`: "blank" cuts at that character when the run
    after the line break is spaces and tabs only; "break" cuts right after the line break.
    (Line breaks are tried from `end` backwards, so the first one that passes is the last
    of its run.)"""
    blank = rule == "blank"

    def in_run(ch: str) -> bool:
        return ch in " \t" if blank else ch.isspace()

    newline = end
    while True:
        newline = max(text.rfind("\n", 0, newline), text.rfind("\r", 0, newline))
        if newline < 0:
            return 0
        q = newline + 1
        while q < end and in_run(text[q]):
            q += 1
        if q < end and not text[q].isspace():
            return q if blank else newline + 1
