"""Training batches: documents from prepare.py's token files, FIM-transformed and packed.

Each (rank, loader worker) walks its own share of a shuffled document order, cuts long
documents into pieces of at most `seq_len` tokens, turns each piece into a plain or FIM
example (fim.transform, optionally after a `<|file_sep|>path` header) and packs the
examples back to back into rows of seq_len + 1 tokens (inputs and shifted targets).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .fim import FIM_RATE, SPM_RATE, FimIds, transform

HEADER_RATE = 0.5  # share of pieces that start with the file-path header


@dataclass
class DocStore:
    """Memory-mapped documents of one split."""

    tokens: np.ndarray  # meta.json's token_dtype (uint16 files predate it), all documents back to back
    offsets: np.ndarray  # int64, n_docs + 1
    path_tokens: np.ndarray
    path_offsets: np.ndarray

    @classmethod
    def open(cls, data_dir: str | Path, split: str) -> DocStore:
        d = Path(data_dir)
        dtype = np.dtype(load_meta(d).get("token_dtype", "uint16"))
        return cls(
            np.memmap(d / f"{split}.bin", dtype=dtype, mode="r"),
            np.load(d / f"{split}.idx.npy"),
            np.memmap(d / f"{split}.path.bin", dtype=dtype, mode="r"),
            np.load(d / f"{split}.path.idx.npy"),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], dtype=np.int64)

    def path(self, i: int) -> np.ndarray:
        return np.asarray(self.path_tokens[self.path_offsets[i]:self.path_offsets[i + 1]], dtype=np.int64)


def load_meta(data_dir: str | Path) -> dict:
    return json.loads((Path(data_dir) / "meta.json").read_text())


@dataclass
class PackConfig:
    seq_len: int = 2048
    batch_size: int = 32  # rows per yielded batch
    fim_rate: float = FIM_RATE
    spm_rate: float = SPM_RATE
    header_rate: float = HEADER_RATE
    seed: int = 0


def iter_examples(store: DocStore, cfg: PackConfig, ids: FimIds, stream_id: int, n_streams: int,
                  rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Training examples of this stream's documents, epoch after epoch, forever."""
    epoch = 0
    while True:
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(store))[stream_id::n_streams]
        for i in order:
            tokens = store.doc(int(i))
            for start in range(0, max(len(tokens), 1), cfg.seq_len):
                header = None
                if rng.random() < cfg.header_rate:
                    header = np.concatenate([[ids.file_sep], store.path(int(i))])
                yield transform(tokens[start:start + cfg.seq_len], rng, ids, cfg.fim_rate,
                                cfg.spm_rate, header)
        epoch += 1


def iter_rows(examples: Iterator[np.ndarray], seq_len: int) -> Iterator[np.ndarray]:
    """Pack examples back to back into rows of seq_len + 1 tokens."""
    buf, size = [], 0
    for ex in examples:
        buf.append(ex)
        size += len(ex)
        while size >= seq_len + 1:
            flat = np.concatenate(buf)
            yield flat[: seq_len + 1]
            rest = flat[seq_len + 1:]
            buf, size = [rest], len(rest)


class PackedBatches(torch.utils.data.IterableDataset):
    """Endless (batch_size, seq_len + 1) int64 batches for one rank, split over loader workers."""

    def __init__(self, data_dir: str | Path, split: str, cfg: PackConfig, ids: FimIds,
                 rank: int = 0, world_size: int = 1):
        self.data_dir, self.split, self.cfg, self.ids = str(data_dir), split, cfg, ids
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        stream_id = self.rank * n_workers + worker
        n_streams = self.world_size * n_workers
        store = DocStore.open(self.data_dir, self.split)
        rng = np.random.default_rng([self.cfg.seed, 1 + stream_id])
        rows = iter_rows(iter_examples(store, self.cfg, self.ids, stream_id, n_streams, rng),
                         self.cfg.seq_len)
        while True:
            batch = np.stack([next(rows) for _ in range(self.cfg.batch_size)])
            yield torch.from_numpy(batch)


def fixed_batches(data_dir: str | Path, split: str, cfg: PackConfig, ids: FimIds, n_batches: int,
                  rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """The same n_batches every time (for validation)."""
    it = iter(PackedBatches(data_dir, split, cfg, ids, rank, world_size))
    return [next(it) for _ in range(n_batches)]
