"""Tokenize corpus shards into flat token files (uint16, or uint32 for a vocabulary
over 65,535 such as Qwen's) with per-document offsets.

    python -m codecomplete.models.train.prepare --corpus DIR [DIR ...] --tokenizer tokenizer.json --out DATA

Writes, for split in (train, val):
  {split}.bin        tokens of all documents, back to back (no separators), in
                     meta.json's token_dtype
  {split}.idx.npy    int64 offsets, n_docs + 1 (document i is bin[idx[i]:idx[i+1]])
  {split}.path.bin / {split}.path.idx.npy   tokens of file_header_text(path), same layout
  {split}.lang.npy   uint8 language index (meta.json "langs")
and meta.json, plus manifest.json (the corpus manifests merged, with token counts).
About 0.5% of documents (chosen by a hash of the path and text, plus the first one)
form the val split.
Documents are deduplicated across all folders by content hash. Encoding runs in
parallel on all cores (the tokenizers library's thread pool).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .corpus import iter_documents, merge_manifests
from .fim import file_header_text

VAL_EVERY = 200  # one document in VAL_EVERY goes to val (0.5%)
BATCH_DOCS = 2048
SPLITS = ("train", "val")


class SplitWriter:
    """Appends documents of one split to its .bin / .idx files."""

    def __init__(self, out: Path, split: str, dtype: np.dtype = np.dtype(np.uint16)):
        self.dtype = dtype
        self.tokens = open(out / f"{split}.bin", "wb")
        self.paths = open(out / f"{split}.path.bin", "wb")
        self.offsets, self.path_offsets, self.langs = [0], [0], []
        self.out, self.split = out, split

    def add(self, ids: list[int], path_ids: list[int], lang: int) -> None:
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.paths.write(np.asarray(path_ids, dtype=self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.path_offsets.append(self.path_offsets[-1] + len(path_ids))
        self.langs.append(lang)

    def close(self) -> dict:
        self.tokens.close()
        self.paths.close()
        np.save(self.out / f"{self.split}.idx.npy", np.asarray(self.offsets, dtype=np.int64))
        np.save(self.out / f"{self.split}.path.idx.npy", np.asarray(self.path_offsets, dtype=np.int64))
        np.save(self.out / f"{self.split}.lang.npy", np.asarray(self.langs, dtype=np.uint8))
        return {"docs": len(self.langs), "tokens": self.offsets[-1]}


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: half the bytes for a small vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_val(doc: dict) -> bool:
    h = hashlib.sha1((doc["path"] + "\0" + doc["text"]).encode()).digest()
    return int.from_bytes(h[:4], "little") % VAL_EVERY == 0


def prepare(corpus_dirs: list[str], tokenizer_path: str, out: str | Path) -> dict:
    """Tokenize every shard of the corpus folders; returns meta.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(tokenizer_path)
    dtype = token_dtype(tok.get_vocab_size())
    writers = {s: SplitWriter(out, s, dtype) for s in SPLITS}
    langs: dict[str, int] = {}
    seen: set[bytes] = set()
    tokens_by_source: Counter = Counter()
    tokens_by_lang: Counter = Counter()
    duplicates = 0
    start = time.time()

    def flush(batch: list[dict]) -> None:
        encoded = tok.encode_batch([d["text"] for d in batch], add_special_tokens=False)
        headers = tok.encode_batch([file_header_text(d["path"]) for d in batch], add_special_tokens=False)
        for doc, enc, head in zip(batch, encoded, headers, strict=True):
            lang = langs.setdefault(doc["lang"], len(langs))
            to_val = is_val(doc) or not writers["val"].langs  # val is never empty
            writers["val" if to_val else "train"].add(enc.ids, head.ids, lang)
            tokens_by_source[doc["source"]] += len(enc.ids)
            tokens_by_lang[doc["lang"]] += len(enc.ids)
        batch.clear()

    batch: list[dict] = []
    n_docs = 0
    for folder in corpus_dirs:
        for doc in iter_documents(folder):
            digest = hashlib.sha1(doc["text"].encode()).digest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            batch.append(doc)
            n_docs += 1
            if len(batch) >= BATCH_DOCS:
                flush(batch)
            if n_docs % 50_000 == 0:
                print(json.dumps({"docs": n_docs, "s": round(time.time() - start, 1)}), file=sys.stderr)
    flush(batch)
    splits = {s: w.close() for s, w in writers.items()}
    meta = {
        "tokenizer_sha1": hashlib.sha1(Path(tokenizer_path).read_bytes()).hexdigest(),
        "vocab_size": tok.get_vocab_size(),
        "token_dtype": dtype.name,
        "splits": splits,
        "langs": sorted(langs, key=langs.get),
        "tokens_by_lang": dict(tokens_by_lang.most_common()),
        "duplicates_dropped": duplicates,
        "seconds": round(time.time() - start, 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.copy(tokenizer_path, out / "tokenizer.json")
    _write_manifest(corpus_dirs, out, meta, tokens_by_source)
    return meta


def _write_manifest(corpus_dirs: list[str], out: Path, meta: dict, tokens_by_source: Counter) -> None:
    """Merge the corpus manifests and add token counts per source and language."""
    sources, shards, skipped, held = [], [], Counter(), Counter()
    for folder in corpus_dirs:
        m = merge_manifests(folder)
        sources += m["sources"]
        shards += m["shards"]
        skipped.update(m["skipped"])
        held.update(m["held_out_files_dropped"])
    for s in sources:
        s["tokens"] = tokens_by_source.get(s["name"], 0)
    by_lang: Counter = Counter()
    for s in sources:
        by_lang.update(s["bytes_by_lang"])
    total_bytes = sum(by_lang.values())
    total_tokens = sum(meta["tokens_by_lang"].values())
    manifest = {
        "sources": sorted(sources, key=lambda s: -s["bytes"]),
        "totals": {
            "files": sum(s["files"] for s in sources),
            "bytes": total_bytes,
            "tokens": total_tokens,
            "bytes_per_token": round(total_bytes / max(total_tokens, 1), 3),
            "bytes_by_lang": dict(by_lang.most_common()),
            "share_by_lang": {k: round(v / max(total_bytes, 1), 4) for k, v in by_lang.most_common()},
            "tokens_by_lang": meta["tokens_by_lang"],
            "splits": meta["splits"],
        },
        "skipped": dict(skipped),
        "held_out_files_dropped": dict(held),
        "duplicates_dropped_across_parts": meta["duplicates_dropped"],
        "held_out_policy": "shared/HOLDOUT.md: by package name and any vendored copy (path components)",
        "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", nargs="+", required=True, help="shard folders")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    meta = prepare(args.corpus, args.tokenizer, args.out)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
