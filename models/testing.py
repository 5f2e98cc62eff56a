"""Tiny random-weight model folders for tests and examples (numpy only, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .format.config import ModelConfig, preset
from .format.folder import ModelFolder, param_shapes, save_model_folder

SPECIAL_TOKENS = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                  "<|fim_pad|>", "<|file_sep|>", "<|pad|>"]

SAMPLE_CODE = '''import os
import sys


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5


def print_values(values):
    for value in values:
        print(value)
    return len(values)


function add(a, b) {
    return a + b;
}

int main(void) {
    printf("hello, world\\n");
    return 0;
}
'''


def random_weights(cfg: ModelConfig, seed: int = 0, std: float = 0.08) -> dict[str, np.ndarray]:
    """Random weights large enough that the logits are not flat (tests need real argmaxes)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return out


def train_test_tokenizer(path: str | Path, vocab_size: int = 512, text: str = SAMPLE_CODE) -> Path:
    """A byte-level BPE tokenizer with our special tokens, trained on a few lines of code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text] * 4, trainer=trainer)
    path = Path(path)
    tok.save(str(path))
    return path


def make_test_model(path: str | Path, preset_name: str = "test-tiny", seed: int = 0, int8: bool = True,
                    fim_order: str = "spm", **overrides) -> ModelFolder:
    """Write a complete model folder with random weights and a tiny tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_file = train_test_tokenizer(path / "tokenizer.json")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = preset(preset_name, vocab_size=tok.get_vocab_size(), eos_ids=[ids["<|endoftext|>"]],
                 fim_prefix_id=ids["<|fim_prefix|>"], fim_middle_id=ids["<|fim_middle|>"],
                 fim_suffix_id=ids["<|fim_suffix|>"], fim_pad_id=ids["<|fim_pad|>"],
                 file_sep_id=ids["<|file_sep|>"], pad_id=ids["<|pad|>"], fim_order=fim_order, **overrides)
    return save_model_folder(path, cfg, random_weights(cfg, seed), tok_file, int8=int8)
