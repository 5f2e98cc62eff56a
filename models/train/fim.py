"""Fill-in-the-middle layouts (Bavarian et al. 2022), shared by training and the engine.

With sentinel tokens P=<|fim_prefix|>, S=<|fim_suffix|>, M=<|fim_middle|>, E=<|endoftext|>:

    PSM:   P prefix S suffix M middle E
    SPM:   P S suffix M prefix middle E      (Bavarian's SPM variant)
    plain: text E

A document may start with a file header `<|file_sep|>` + tokens of `path + "\\n"`. At
inference the prompt is the same layout cut after the prefix (SPM) or after M (PSM); the
model writes the middle and ends it with E. Splits are at token boundaries: the engine's
token alignment handles cursors inside a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FIM_RATE = 0.5  # share of training documents turned into FIM examples
SPM_RATE = 0.5  # share of FIM examples in SPM order (the rest PSM)


@dataclass(frozen=True)
class FimIds:
    """The special token ids of the layouts (defaults: our tokenizer's fixed ids)."""

    eot: int = 0
    prefix: int = 1
    middle: int = 2
    suffix: int = 3
    pad: int = 4
    file_sep: int = 5

    @classmethod
    def from_config(cls, cfg) -> FimIds:
        """The ids a ModelConfig names (an imported tokenizer's, e.g. Qwen's 151659..)."""
        ids = cls(cfg.eos_ids[0] if cfg.eos_ids else -1, cfg.fim_prefix_id, cfg.fim_middle_id,
                  cfg.fim_suffix_id, cfg.fim_pad_id, cfg.file_sep_id)
        if min(ids.eot, ids.prefix, ids.middle, ids.suffix, ids.file_sep) < 0:
            raise ValueError(f"the config lacks FIM token ids: {ids}")
        return ids

    @classmethod
    def from_tokenizer(cls, tok) -> FimIds:
        """Read the ids from a `tokenizers.Tokenizer` that has our special token names."""
        get = tok.token_to_id
        return cls(get("<|endoftext|>"), get("<|fim_prefix|>"), get("<|fim_middle|>"),
                   get("<|fim_suffix|>"), get("<|fim_pad|>"), get("<|file_sep|>"))


def file_header_text(path: str) -> str:
    """The text tokenized after <|file_sep|> at the start of a document."""
    return path + "\n"


def fim_parts(order: str, prefix: Sequence[int], suffix: Sequence[int], middle: Sequence[int],
              ids: FimIds) -> list[Sequence[int]]:
    """The pieces of a FIM sequence in order (without the final <|endoftext|>)."""
    if order == "psm":
        return [[ids.prefix], prefix, [ids.suffix], suffix, [ids.middle], middle]
    if order == "spm":
        return [[ids.prefix, ids.suffix], suffix, [ids.middle], prefix, middle]
    raise ValueError(f"order must be 'psm' or 'spm', not {order!r}")


def fim_prompt(order: str, prefix: Sequence[int], suffix: Sequence[int], ids: FimIds = FimIds(),
               header: Sequence[int] = ()) -> list[int]:
    """Inference prompt: the model continues it with the middle, then <|endoftext|>."""
    out = [int(t) for t in header]
    for part in fim_parts(order, prefix, suffix, (), ids):
        out.extend(int(t) for t in part)
    return out


def fim_example(order: str, prefix, suffix, middle, ids: FimIds = FimIds()) -> np.ndarray:
    """A training FIM example: the full layout followed by <|endoftext|>."""
    parts = fim_parts(order, prefix, suffix, middle, ids) + [[ids.eot]]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def plain_example(tokens, ids: FimIds = FimIds()) -> np.ndarray:
    """A left-to-right training example: text then <|endoftext|>."""
    return np.concatenate([np.asarray(tokens, dtype=np.int64), [ids.eot]])


def split_points(n_tokens: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two sorted cut positions in 0..n_tokens, uniform (prefix, middle or suffix may be empty)."""
    a, b = sorted(int(x) for x in rng.integers(0, n_tokens + 1, size=2))
    return a, b


def transform(tokens: np.ndarray, rng: np.random.Generator, ids: FimIds = FimIds(),
              fim_rate: float = FIM_RATE, spm_rate: float = SPM_RATE,
              header: np.ndarray | None = None) -> np.ndarray:
    """One document as a training example: FIM (SPM or PSM) with probability fim_rate,
    else plain; `header` (file_sep + path tokens) goes first when given."""
    if rng.random() < fim_rate:
        a, b = split_points(len(tokens), rng)
        order = "spm" if rng.random() < spm_rate else "psm"
        body = fim_example(order, tokens[:a], tokens[b:], tokens[a:b], ids)
    else:
        body = plain_example(tokens, ids)
    if header is not None and len(header):
        return np.concatenate([np.asarray(header, dtype=np.int64), body])
    return body


def parse_example(seq: Sequence[int], ids: FimIds = FimIds()) -> tuple[str, list, list, list]:
    """Inverse of fim_example / plain_example: (order, prefix, middle, suffix) token lists;
    a plain example comes back as ("plain", text, [], [])."""
    seq = [int(t) for t in seq]
    if seq and seq[-1] == ids.eot:
        seq = seq[:-1]
    if seq[:2] == [ids.prefix, ids.suffix]:
        m = seq.index(ids.middle)
        suffix, rest = seq[2:m], seq[m + 1:]
        # SPM cannot tell prefix from middle by itself; callers pass the prefix length.
        return "spm", rest, [], suffix
    if seq[:1] == [ids.prefix]:
        s, m = seq.index(ids.suffix), seq.index(ids.middle)
        return "psm", seq[1:s], seq[m + 1:], seq[s + 1:m]
    return "plain", seq, [], []
