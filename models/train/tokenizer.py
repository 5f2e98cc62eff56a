"""Byte-level BPE tokenizer for code (HF `tokenizers` format), with FIM special tokens.

    python -m codecomplete.models.train.tokenizer train --shards DIR [DIR ...] --out tokenizer.json
    python -m codecomplete.models.train.tokenizer show tokenizer.json
    python -m codecomplete.models.train.tokenizer from-gguf MODEL.gguf --out tokenizer.json

No normaliser, no added prefix space: decode(encode(text)) == text for any string.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Fixed ids 0..6; fim.py and the engine rely on these names.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|file_sep|>",
    "<|pad|>",
)
VOCAB_SIZE = 16384
MAX_TOKEN_CHARS = 32

# Pre-tokenisation for code, tried left to right at each position:
#  - an identifier (letters, digits, _) with at most one leading space or punctuation mark
#    (" self", ".append", "__init__", "int64");
#  - up to three digits;
#  - a run of punctuation with an optional leading space ("):", "()", "==", "->", '"""');
#  - line breaks with the next line's indentation ("\n    ", "\n\t\t"), so indentation is a token;
#  - spaces before a word, leaving the last one for the word; any other whitespace.
CODE_SPLIT_PATTERN = (
    r"[^\r\n\p{L}\p{N}_]?[\p{L}_][\p{L}\p{N}_]*"
    r"| ?\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}_]+"
    r"|[ \t]*[\r\n]+[ \t]*"
    r"|[ \t]+(?!\S)"
    r"|\s+"
)


def new_tokenizer() -> Tokenizer:
    """An untrained tokenizer with the code pre-tokeniser and byte-level decoding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CODE_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterator[str], vocab_size: int = VOCAB_SIZE, length: int | None = None) -> Tokenizer:
    """Train byte-level BPE on an iterator of documents; special tokens get ids 0..6."""
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=MAX_TOKEN_CHARS,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Special token name -> id."""
    return {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}


def sample_texts(shard_dirs: list[str], max_bytes_by_lang: dict[str, int] | None, seed: int = 0) -> list[str]:
    """Documents from shard folders, shuffled, at most max_bytes_by_lang[lang] bytes per language."""
    from .corpus import iter_documents

    docs = []
    for folder in shard_dirs:
        docs.extend((d["lang"], d["text"]) for d in iter_documents(folder))
    random.Random(seed).shuffle(docs)
    used: dict[str, int] = {}
    out = []
    for lang, text in docs:
        cap = (max_bytes_by_lang or {}).get(lang, 1 << 62)
        if used.get(lang, 0) + len(text) <= cap:
            used[lang] = used.get(lang, 0) + len(text)
            out.append(text)
    print(json.dumps({"sample_bytes_by_lang": used}), file=sys.stderr)
    return out


SHOW_SAMPLES = ("    ", "        ", "\n    ", "\n        ", "def", " self", "):\n", "):", "self.",
                "==", "->", '"""', "()", "return", " return", "import", "\t", "\n\n")


def describe(tok: Tokenizer) -> dict:
    """How a few code fragments tokenize (for checking the vocabulary)."""
    return {repr(s): [tok.id_to_token(i) for i in tok.encode(s).ids] for s in SHOW_SAMPLES}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="tokenizer", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train")
    p.add_argument("--shards", nargs="+", required=True, help="corpus shard folders")
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    p.add_argument("--max-mb-by-lang", default="", help='JSON {"python": 80, "go": 10, ...}')
    p = sub.add_parser("show")
    p.add_argument("path")
    p = sub.add_parser("from-gguf", help="a GGUF's tokenizer (the header suffices: a split file's first piece)")
    p.add_argument("gguf")
    p.add_argument("--out", required=True, help="tokenizer.json to write")
    args = ap.parse_args(argv)
    if args.cmd == "from-gguf":
        from ..format.gguf_import import gguf_tokenizer_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(gguf_tokenizer_json(args.gguf), encoding="utf-8")
        print(json.dumps(describe(Tokenizer.from_file(args.out)), indent=1, ensure_ascii=False))
        return
    if args.cmd == "train":
        caps = {k: int(v * 1e6) for k, v in json.loads(args.max_mb_by_lang or "{}").items()}
        texts = sample_texts(args.shards, caps)
        tok = train_tokenizer(iter(texts), args.vocab_size, length=len(texts))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tok.save(args.out)
        print(json.dumps(describe(tok), indent=1, ensure_ascii=False))
    else:
        print(json.dumps(describe(Tokenizer.from_file(args.path)), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
