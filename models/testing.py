"""Tiny random-weight model folders for tests and examples (numpy only; the torch helpers
for random 7B-shaped models import torch when called)."""

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


# Qwen2.5-Coder's special token ids (its tokenizer's added tokens)
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660,
                    "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662, "<|repo_name|>": 151663, "<|file_sep|>": 151664}


def qwen7b_shape_config(**overrides) -> ModelConfig:
    """A ModelConfig of Qwen2.5-Coder-7B's shape: 28 layers, width 3584, 28 query and 4 kv
    heads of 128, FFN 18944, vocab 152064, q/k/v biases, RoPE theta 1e6, Qwen's FIM ids
    (PSM). overrides: any field (n_layers=4 for a shorter model of the same width)."""
    ids = QWEN_SPECIAL_IDS
    fields = dict(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, head_dim=128, ffn_dim=18944,
                  max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True, tie_embeddings=False,
                  eos_ids=[ids["<|endoftext|>"], ids["<|fim_pad|>"], ids["<|file_sep|>"]], pad_id=ids["<|fim_pad|>"],
                  fim_prefix_id=ids["<|fim_prefix|>"], fim_middle_id=ids["<|fim_middle|>"],
                  fim_suffix_id=ids["<|fim_suffix|>"], fim_pad_id=ids["<|fim_pad|>"], file_sep_id=ids["<|file_sep|>"],
                  fim_order="psm", align_back_off="fixed")
    return ModelConfig(**{**fields, **overrides})


def random_torch_model(cfg: ModelConfig, device: str = "cuda", dtype: str = "bf16", seed: int = 0, std: float = 0.02):
    """A Transformer with random weights made where it runs: built on the meta device, given
    storage on `device` in `dtype`, filled in place (no full-size host copy, no fp32 copy:
    a 7B shape is 15 GB in bf16). Norm weights are one."""
    import torch

    from .model import Transformer

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype=torch_dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)
    return model.requires_grad_(False).eval()


def standin_tokenizer(cfg: ModelConfig):
    """A byte-level tokenizer whose ids fit cfg: ids 0..255 are the bytes (no merges), the
    config's special ids hold Qwen's special tokens, every other id a placeholder that
    no text encodes to. For random-weight models, which need a vocabulary of the right
    size, not a good one."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from .format.tokenizer import Tokenizer, _bytes_to_unicode

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    special = {tid: name for name, tid in QWEN_SPECIAL_IDS.items() if tid < cfg.vocab_size}
    for tid in range(256, cfg.vocab_size):
        vocab[special.get(tid, f"<|standin_{tid}|>")] = tid
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special.values()])
    return Tokenizer(tok)


def gguf_tokenizer(path: str | Path, vocab_size: int):
    """The tokenizer of a GGUF file (e.g. Qwen2.5-Coder's), padded to vocab_size, without
    reading its weights."""
    from .format.gguf_import import GGUFFile, build_gguf_tokenizer, gguf_token_facts
    from .format.hf_import import pad_tokenizer_to
    from .format.tokenizer import Tokenizer

    with GGUFFile(path) as gf:
        hf_tok = build_gguf_tokenizer(gf.metadata, gguf_token_facts(gf.metadata).ids())
    pad_tokenizer_to(hf_tok, vocab_size)
    return Tokenizer(hf_tok)


def random_7b_runtime(device: str = "cuda", gguf: str | Path | None = None, seed: int = 0, dtype: str = "bf16",
                      config_overrides: dict | None = None, **runtime_kwargs):
    """A torch runtime over a random Qwen2.5-Coder-7B-shaped model built on `device`, with
    the GGUF's tokenizer when `gguf` is given, else standin_tokenizer. runtime_kwargs go
    to TorchRuntime (batch_attention, cuda_graphs, max_batch_rows, ...)."""
    from codecomplete.runtime.torch import TorchRuntime

    cfg = qwen7b_shape_config(**(config_overrides or {}))
    tokenizer = gguf_tokenizer(gguf, cfg.vocab_size) if gguf else standin_tokenizer(cfg)
    model = random_torch_model(cfg, device, dtype, seed)
    return TorchRuntime.from_model(model, tokenizer, device=device, precision=dtype, **runtime_kwargs)


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
