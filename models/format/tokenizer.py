"""Tokenizer: a thin wrapper over a `tokenizers` tokenizer.json, plus the byte string of
every token (token alignment matches generated tokens against characters by bytes)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


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
