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


def write_tiny_qwen_gguf(path: str | Path, dim: int = 64, n_layers: int = 4, n_heads: int = 4, n_kv_heads: int = 2,
                         ffn_dim: int = 128, vocab_size: int = 512, seed: int = 0, text: str = SAMPLE_CODE) -> Path:
    """A Qwen2-shaped GGUF (q/k/v biases, grouped-query attention, a separate output
    matrix, Qwen's pre-tokenizer name and FIM token names) with random float32 weights:
    a stand-in teacher for tests of pruning and distillation. Needs the `gguf` package."""
    import json

    import gguf

    path = Path(path)
    tok = json.loads(train_test_tokenizer(path.with_suffix(".tokenizer.json"), vocab_size, text).read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(512)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    rng = np.random.default_rng(seed)
    hd = dim // n_heads

    def normal(*shape, std=0.08):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    embedding = normal(len(tokens), dim, std=0.3)
    w.add_tensor("token_embd.weight", embedding)
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        w.add_tensor(p + "attn_q.weight", normal(n_heads * hd, dim))
        w.add_tensor(p + "attn_q.bias", normal(n_heads * hd))
        w.add_tensor(p + "attn_k.weight", normal(n_kv_heads * hd, dim))
        w.add_tensor(p + "attn_k.bias", normal(n_kv_heads * hd))
        w.add_tensor(p + "attn_v.weight", normal(n_kv_heads * hd, dim))
        w.add_tensor(p + "attn_v.bias", normal(n_kv_heads * hd))
        w.add_tensor(p + "attn_output.weight", normal(dim, n_heads * hd))
        w.add_tensor(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        w.add_tensor(p + "ffn_gate.weight", normal(ffn_dim, dim))
        w.add_tensor(p + "ffn_up.weight", normal(ffn_dim, dim))
        w.add_tensor(p + "ffn_down.weight", normal(dim, ffn_dim))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("output.weight", embedding + normal(len(tokens), dim, std=0.01))  # the file's head, nearly tied
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
