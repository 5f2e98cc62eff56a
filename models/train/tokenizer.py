"""Byte-level BPE tokenizer for code (HF `tokenizers` format), with FIM special tokens.

    python -m codecomplete.models.train.tokenizer train --shards DIR [DIR ...] --out tokenizer.json
    python -m codecomplete.models.train.tokenizer show tokenizer.json
    python -m codecomplete.models.train.tokenizer from-gguf MODEL.gguf --out tokenizer.json
    python -m codecomplete.models.train.tokenizer check-gguf MODEL.gguf DIRS... [--limit 300]

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

from codecomplete.models.format.tokenizer import CODE_SPLIT_PATTERN

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
# the pre-tokeniser (CODE_SPLIT_PATTERN, described where it is defined): line breaks with the
# next line's indentation are one piece, so indentation is a token and a keystroke's prompt
# re-encodes only its own line (Tokenizer.encode_reusing)


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


def compare_gguf_tokenizers(gguf_path: str | Path, texts: list[str]) -> dict:
    """Ids of each text from the tokenizers that must agree on a GGUF's vocabulary: the
    engine's (built from the GGUF's metadata), `tokenizers` reading from-gguf's
    tokenizer.json (what prepare.py runs on the GPU machine), and, where transformers is
    installed, its Qwen2Tokenizer built from the same vocabulary and merges (its own
    pre-tokenizer regex and normaliser: an independent construction)."""
    from ..format.gguf_import import (
        GGUFFile,
        build_gguf_tokenizer,
        gguf_token_facts,
        gguf_tokenizer_json,
    )
    from ..format.tokenizer import Tokenizer as OurTokenizer

    with GGUFFile(gguf_path) as gf:
        meta = gf.metadata
        ours = OurTokenizer(build_gguf_tokenizer(meta, gguf_token_facts(meta).ids()))
    from_json = Tokenizer.from_str(gguf_tokenizer_json(gguf_path))
    encoders = {"engine": ours.encode, "tokenizer.json": lambda t: from_json.encode(t, add_special_tokens=False).ids}
    try:
        from tokenizers import AddedToken
        from transformers import Qwen2Tokenizer

        tokens = meta["tokenizer.ggml.tokens"]
        types = meta["tokenizer.ggml.token_type"]
        hf = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)},
                            merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]])
        # the control tokens as special added tokens, as in Qwen's own tokenizer.json: their
        # text inside a file becomes the token (both other tokenizers do the same)
        hf.add_tokens([AddedToken(t, special=True, normalized=False) for i, t in enumerate(tokens) if int(types[i]) == 3])
        encoders["transformers"] = lambda t: hf.encode(t, add_special_tokens=False)
    except ImportError:
        pass
    differ = {name: 0 for name in encoders if name != "engine"}
    tokens_total = 0
    for text in texts:
        ids = {name: enc(text) for name, enc in encoders.items()}
        tokens_total += len(ids["engine"])
        for name in ids:
            if name != "engine":
                differ[name] += ids[name] != ids["engine"]
        if ours.decode(ids["engine"]) != text and not any(t in text for t in ours.special_tokens):
            differ.setdefault("round_trip", 0)
            differ["round_trip"] += 1
    with_specials = sum(any(t in text for t in ours.special_tokens) for text in texts)
    return {"texts": len(texts), "tokens": tokens_total, "compared_with_engine": list(differ),
            "texts_that_differ": differ, "texts_with_special_token_text": with_specials}


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
    p = sub.add_parser("check-gguf", help="do the engine's, tokenizer.json's and transformers' ids agree")
    p.add_argument("gguf")
    p.add_argument("paths", nargs="+", help="source files or folders")
    p.add_argument("--limit", type=int, default=300)
    args = ap.parse_args(argv)
    if args.cmd == "check-gguf":
        from ..evaluate_loss import iter_files

        texts = []
        for suffix in (".py", ".c", ".h", ".js", ".ts", ".go", ".rs", ".java", ".md", ".txt", ".rst"):
            for path in (f for p in args.paths for f in iter_files([p], suffix)):
                try:
                    texts.append(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError):
                    continue
        texts = [texts[i] for i in sorted(random.Random(0).sample(range(len(texts)), min(args.limit, len(texts))))]
        print(json.dumps(compare_gguf_tokenizers(args.gguf, texts), indent=1))
        return
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
